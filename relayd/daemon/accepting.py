"""The public listeners' accept loops, never taking more sockets than descriptors allow.

relayd does not use ``trio.serve_listeners`` for its public port: when the
process runs out of file descriptors, that loop retries ``accept()`` every
0.1 s and logs each retry with its traceback, while the admin listener, out
of descriptors too, answers nothing. Here:

* **A budget of descriptors.** :func:`descriptor_budget` takes the process's
  open-file limit, less the descriptors already open when serving begins,
  less :data:`RESERVED_DESCRIPTORS` kept back for everything else relayd opens
  later (the admin listener's connections, the files a reload reads,
  ``/proc`` for ``/metrics``, the cluster's broker link). While that many
  public sockets are open, the loops do not accept: new connections wait in
  the kernel's backlog (the kernel refuses them when it is full), and the
  admin listener keeps answering ``/healthz`` and ``/metrics``. A socket
  counts until its handler has closed it.
* **Accept failing anyway** for want of resources (``EMFILE``, ``ENFILE``,
  ``ENOBUFS``, ``ENOMEM``: another process's descriptors, the system's
  limit) makes the loop wait :data:`ACCEPT_RETRY_S` and try again.
* Either way the loop logs ``listener.paused`` once when it stops accepting
  (and again if the reason changes), not for each retry, and again only after
  it has accepted; the line budget of :mod:`relayd.telemetry.log` bounds even
  that.
* **A backlog taken at once.** On a plain TCP listener the loop accepts on
  the listener's descriptor itself (:func:`_borrowed`), every client waiting
  in the backlog without a wait in between (trio's ``SocketListener.accept``
  yields to the scheduler after each), and yields once every
  :data:`ACCEPT_BURST` clients so that a backlog that refills as fast as it
  is taken cannot keep everyone else from running; it waits for the listener
  only once the backlog is empty. A client that failed in the backlog
  (``ECONNABORTED`` and the others Linux's accept(2) says to retry) is passed
  over and counts toward the burst. ``TCP_NODELAY`` and ``TCP_NOTSENT_LOWAT``
  are set on the listener, and every client that connects after that inherits
  them; the clients already waiting when the loop starts (socket activation's
  first, or anyone who connected while relayd started) get them one by one,
  until the loop first finds the backlog empty. TLS listeners go through
  trio's ``accept``.

Task layout: :func:`serve_public` runs one accept loop per listener and starts
each handler in the caller's nursery. Resource handling: it closes the
listeners when cancelled; each accepted stream is the handler's to close, and
counts until the handler says it is closed.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, cast

import structlog
import trio

from relayd.config import LimitsSettings
from relayd.daemon.transport import Accepted, tune

__all__ = [
    "ACCEPT_BURST",
    "ACCEPT_RETRY_S",
    "OUT_OF_RESOURCES",
    "RESERVED_DESCRIPTORS",
    "Sockets",
    "check_budget",
    "descriptor_budget",
    "public_sockets",
    "serve_public",
]

#: Descriptors the public listeners leave for the rest of relayd: the admin
#: listener's connections (a scraper, a health check, an operator's curl),
#: the files a reload reads, /proc for /metrics, the cluster's broker link.
RESERVED_DESCRIPTORS: Final = 64
#: Seconds between accept attempts after the kernel refused one for want of
#: resources: trio's own figure, short enough to notice a freed descriptor soon.
ACCEPT_RETRY_S: Final = 0.1
#: Clients accepted from a backlog without a wait before the loop yields to the
#: scheduler once: the connections accepted so far start in the next round (with,
#: as trio may order a round, the loop's next burst).
ACCEPT_BURST: Final = 32
#: The errors that say "no resources for a new socket now", not "the listener is broken".
OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: The errors by which accept() reports a client that failed in the backlog (reset,
#: unreachable, refused by a firewall rule): Linux's accept(2) says to treat them as
#: EAGAIN and accept again. The same list as trio's ``SocketListener.accept``.
_CLIENT_FAILED: Final = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
)
_BUDGET: Final = "open-file budget"
#: The name of every connection's task: one string for all (trio would
#: otherwise make one per task from the handler's repr).
CONNECTION_TASK: Final = "relayd.connection"

#: Serves one accepted client (a plain TCP socket, or a TLS stream), closes it,
#: then calls the function it is given (the socket counts until then); it must
#: not raise but Cancelled. Its third argument is the peer's address as accept()
#: gave it, when it did (plain TCP).
Handler = Callable[[Accepted, Callable[[], None], Any], Awaitable[object]]
Listener = trio.abc.Listener[trio.abc.Stream]


def descriptor_budget(reserved: int = RESERVED_DESCRIPTORS) -> tuple[int, int]:
    """How many public sockets relayd may hold, and the open-file limit it is from.

    Call it once the listening sockets are open: they are counted among the
    descriptors already in use.

    Returns:
        ``(budget, limit)``: the soft ``RLIMIT_NOFILE`` less the descriptors
        open now and ``reserved``, at least 1; and the soft limit itself.
    """
    limit, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limit == resource.RLIM_INFINITY:
        limit = 1 << 30
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: count nothing rather than guess
        in_use = 0
    return max(1, limit - in_use - reserved), limit


def public_sockets(limits: LimitsSettings, log: structlog.typing.FilteringBoundLogger) -> Sockets:
    """The public sockets' budget, from the open-file limit; a warning if it is short.

    Call it once the listening sockets are open, as :func:`descriptor_budget`.
    """
    budget, limit = descriptor_budget()
    sockets = Sockets(budget, limit)
    check_budget(limits, sockets, log)
    return sockets


def check_budget(
    limits: LimitsSettings, sockets: Sockets, log: structlog.typing.FilteringBoundLogger
) -> None:
    """Warn (``server.descriptors``) if the caps need more public sockets than the budget.

    At start, and at a reload that changes the caps: accepting pauses at the budget
    (``listener.paused``), so the caps would never be reached.
    """
    needed = limits.max_connections + limits.max_handshakes
    if sockets.budget < needed:
        log.warning(
            "server.descriptors",
            open_files_limit=sockets.limit,
            budget=sockets.budget,
            needed=needed,
        )


class Sockets:
    """The public sockets open now, against their budget.

    Args:
        budget: the most public sockets open at once.
        limit: the open-file limit the budget is from.
    """

    __slots__ = ("_freed", "budget", "limit", "open")

    def __init__(self, budget: int, limit: int = 0) -> None:
        self.budget = budget
        self.limit = limit
        self.open = 0
        self._freed = trio.lowlevel.ParkingLot()

    @property
    def full(self) -> bool:
        """True while no socket may be accepted."""
        return self.open >= self.budget

    async def wait_for_room(self) -> None:
        """Wait until a socket may be accepted."""
        while self.full:
            await self._freed.park()

    def opened(self) -> None:
        """Count a socket just accepted."""
        self.open += 1

    def closed(self) -> None:
        """Count a socket as closed, and wake a loop waiting for room."""
        self.open -= 1
        self._freed.unpark()


async def serve_public(
    handler: Handler,
    listeners: Sequence[Listener],
    *,
    handler_nursery: trio.Nursery,
    sockets: Sockets,
    log: structlog.typing.FilteringBoundLogger,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on every listener, within ``sockets``' budget, until cancelled.

    Args:
        handler: serves one accepted stream (the gate), closes it, then calls
            the function it is given.
        listeners: where to accept; closed when this is cancelled.
        handler_nursery: where handlers run.
        sockets: the public sockets' count and budget, shared by the loops.
        log: for ``listener.paused``.
        task_status: started once every loop is accepting.

    Raises:
        OSError: ``accept()`` failed for another reason than resources.
    """
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, handler, listener, handler_nursery, sockets, log)
        task_status.started()


async def _accept_loop(
    handler: Handler,
    listener: Listener,
    handler_nursery: trio.Nursery,
    sockets: Sockets,
    log: structlog.typing.FilteringBoundLogger,
) -> None:
    paused: str | None = None  # why the loop is not accepting, once it has said so
    # One bound method for every handler: each connection's task holds it for
    # as long as it lasts, and a method bound afresh would be 64 bytes each.
    closed = sockets.closed
    async with listener:
        plain = _borrowed(listener)
        # Clients queued before the listener was tuned did not inherit its options:
        # the loop tunes each until it first finds the backlog empty.
        untuned = plain is not None
        stream: Accepted | None
        burst = 0  # accepted since the loop last let other tasks run
        try:
            while True:
                if sockets.full:
                    if paused != _BUDGET:
                        paused = _BUDGET
                        _paused(log, paused, sockets)
                    await sockets.wait_for_room()
                    _still_open(listener, plain)
                try:
                    if plain is None:
                        stream, peer = await listener.accept(), None
                    else:
                        stream, peer = _accept_now(plain, untuned)
                except BlockingIOError:  # nobody waiting in the backlog
                    assert plain is not None
                    burst = 0
                    untuned = False
                    # A close of the listener wakes this wait (ClosedResourceError).
                    await trio.lowlevel.wait_readable(plain)
                    continue
                except OSError as exc:
                    if exc.errno in _CLIENT_FAILED:
                        stream = None
                    elif exc.errno in OUT_OF_RESOURCES:
                        reason = f"accept failed: {errno.errorcode[exc.errno]}"
                        if paused != reason:
                            paused = reason
                            _paused(log, paused, sockets)
                        await trio.sleep(ACCEPT_RETRY_S)
                        _still_open(listener, plain)
                        continue
                    else:
                        raise
                if stream is not None:
                    paused = None
                    sockets.opened()
                    # The handler's task is the connection's for as long as it lasts:
                    # no wrapper's frame waits with it.
                    handler_nursery.start_soon(handler, stream, closed, peer, name=CONNECTION_TASK)
                burst += 1  # a failed client too: a run of them must not keep the loop going
                if burst == ACCEPT_BURST:
                    # A backlog that refills as fast as it is taken must not keep the
                    # connections accepted so far (and everyone else) from running.
                    burst = 0
                    await trio.lowlevel.checkpoint()
                    _still_open(listener, plain)
        finally:
            if plain is not None:
                plain.detach()  # the descriptor is the listener's, closed with it


def _borrowed(listener: Listener) -> socket.socket | None:
    """The standard library's socket on a plain TCP listener's descriptor, else None.

    trio's ``SocketListener.accept`` drops the address ``accept()`` returns, so
    the gate would ask the kernel for it again (``getpeername``); it wraps the
    socket twice (trio's socket, a ``SocketStream``), which the transport does
    without; and it yields to the scheduler after every accept, where a loop
    that finds its next client waiting needs no wait. So the loop accepts on the
    listener's descriptor itself, through a socket object that borrows it (the
    caller detaches it before the listener is closed). The listener is
    :func:`~relayd.daemon.transport.tune`'d here: every client that connects
    from now on inherits its options (the loop tunes those queued before).
    """
    if type(listener) is not trio.SocketListener:  # final in trio: no subclass to miss
        return None
    sock = listener.socket
    tune(sock)
    plain = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
    # Non-blocking whatever socket.setdefaulttimeout() says: an accept() that waited
    # would stop every task.
    plain.setblocking(False)
    return plain


def _still_open(listener: Listener, plain: socket.socket | None) -> None:
    """Raise if the listener was closed while the loop waited for something else.

    A close during the wait for a client wakes that wait; one during a wait for
    room, a retry's pause or the burst's yield does not, and the descriptor's
    number may be another socket's by now: the borrowed socket must not accept on it.

    Raises:
        trio.ClosedResourceError: the listener is closed (as trio's accept raises).
    """
    if plain is not None and cast(trio.SocketListener, listener).socket.fileno() != plain.fileno():
        raise trio.ClosedResourceError("the listener was closed")


def _accept_now(plain: socket.socket, untuned: bool) -> tuple[socket.socket, Any]:
    """The next client in the backlog, non-blocking, and its address; no wait.

    Args:
        plain: the borrowed listening socket.
        untuned: give the client the listener's options (it may have been queued
            before the listener had them).

    Raises:
        BlockingIOError: nobody is waiting.
        OSError: accept() failed: a client that failed in the backlog
            (``_CLIENT_FAILED``: accept again), for want of resources
            (``OUT_OF_RESOURCES``), or the listener is broken.
    """
    client, peer = plain.accept()
    client.setblocking(False)
    if untuned:
        tune(client)
    return client, peer


def _paused(log: structlog.typing.FilteringBoundLogger, reason: str, sockets: Sockets) -> None:
    log.warning("listener.paused", reason=reason, open=sockets.open, budget=sockets.budget)

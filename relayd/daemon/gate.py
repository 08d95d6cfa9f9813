"""Accepted TCP streams to running connections: handshake, policy, and the connection boundary.

:class:`Gate` is the handler the accept loops (:mod:`relayd.daemon.accepting`)
call once per accepted stream, in the server's connections nursery. For each
stream it:

1. counts it as a handshake in progress
   (:class:`~relayd.policy.admission.Handshakes`), or, over ``max_handshakes``
   or ``max_handshakes_per_ip``, closes it at once without reading from it;
2. reads the HTTP request head within ``handshake_timeout_s`` and at most
   ``max_header_bytes`` long (:class:`~relayd.daemon.request_head.HeadReading`);
3. counts it against the established connections
   (:class:`~relayd.policy.admission.Capacity`), and accepts it in the chosen
   dialect, or refuses it with an HTTP status (:func:`~relayd.wire.handshake.validate`,
   :func:`~relayd.policy.admission.decide`,
   :class:`~relayd.daemon.authentication.Authentication`), logging
   ``handshake.rejected``; once accepted it is no longer a handshake: it
   becomes routable (:meth:`~relayd.daemon.connection.Connection.greet`), then
   the ``101`` and its welcome frame go out in one write;
4. runs the :class:`~relayd.daemon.connection.Connection` until it ends;
5. closes the TCP connection gracefully (:class:`~relayd.daemon.transport.Transport`),
   and only then stops counting it, so that the limits bound descriptors too.

Bytes a client sends after its request and before the response (its first
frames, in the same TCP segment) are kept and handed to the connection, which
parses them like any others, under the same limits: a 4 MiB first frame
against a 64 KiB limit is answered with close 1009 every time.

**The connection boundary.** Nothing raised while serving one stream may reach
the shared nursery: that would cancel every other connection and the
listener. So the whole per-stream task is guarded: expected closes end
quietly, anything else is logged as ``error`` with its traceback and the
client gets close code 1011 (or HTTP 500, before the handshake was answered);
the stream is always closed in ``finally``.
"""

from __future__ import annotations

import binascii
import dataclasses
import itertools
import os
from collections.abc import Callable, Collection
from typing import Any, Final

import structlog
import trio

from relayd.config import LimitsSettings
from relayd.daemon.addresses import ip_of, peer_address, socket_address
from relayd.daemon.authentication import Authentication
from relayd.daemon.closing import CLOSE_TIMEOUT_S
from relayd.daemon.connection import Connection
from relayd.daemon.live import LiveLimits
from relayd.daemon.poller import ReadPoller
from relayd.daemon.request_head import HeadReading
from relayd.daemon.transport import Accepted, Transport, discard
from relayd.errors import CloseCode
from relayd.policy.admission import Accept, Capacity, Handshakes, decide
from relayd.policy.auth import Authenticator
from relayd.routing.interface import Router
from relayd.telemetry.log import info_line
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from relayd.wire.handshake import Refusal, accept_response, refusal_response

__all__ = ["Gate", "new_client_id"]

#: Bytes of randomness in a client id (128 bits): unguessable, so ids cannot be forged.
_ID_BYTES: Final = 16
#: Random bytes read from the kernel at once, 256 ids' worth: one ``getrandom``
#: system call per 256 connections, rather than one per connection.
_RANDOM_BLOCK: Final = 256 * _ID_BYTES
#: base64's alphabet to the URL-safe one, as base64.urlsafe_b64encode translates it.
_URL_SAFE: Final = bytes.maketrans(b"+/", b"-_")


def _nothing() -> None:
    pass


class _RandomBytes:
    """The kernel's random bytes (``os.urandom``, what ``secrets`` reads), read in blocks.

    Each byte is handed out once, in the order read: ids drawn from here are as
    unguessable as ``secrets.token_urlsafe``'s. Only the trio thread draws
    (the gate's); a forked child forgets the parent's block rather than hand
    out the same bytes.
    """

    __slots__ = ("_at", "_block")

    def __init__(self) -> None:
        self._block = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        """``n`` random bytes never handed out before (``n`` at most :data:`_RANDOM_BLOCK`)."""
        at = self._at
        if at + n > len(self._block):
            self._block, at = os.urandom(_RANDOM_BLOCK), 0
        self._at = at + n
        return self._block[at : at + n]

    def forget(self) -> None:
        """Drop the bytes read but not handed out."""
        self._block, self._at = b"", 0


_random: Final = _RandomBytes()
os.register_at_fork(after_in_child=_random.forget)


def new_client_id() -> str:
    """A fresh, unguessable, URL-safe client id (128 random bits, 22 characters).

    What ``secrets.token_urlsafe(16)`` makes, from a block of random bytes read
    for many ids at once.
    """
    encoded = binascii.b2a_base64(_random.take(_ID_BYTES), newline=False)
    return encoded.translate(_URL_SAFE).rstrip(b"=").decode()


class Gate:
    """Turns accepted streams into connections, within the daemon's limits.

    Args:
        router: where connections register and send.
        limits: the limits in force.
        log: the daemon's logger.
        events: where connections record the messages they refuse.
        echo_route: serve the diagnostic echo route at ``/echo``.
        allowed_origins: browser origins allowed; empty allows all.
        authenticator: checks each handshake's token and names the client;
            None serves everyone under a fresh random id.
        stats: the counters to add to (connections, refusals).
        new_id: makes client ids (replaceable in tests).
    """

    def __init__(
        self,
        router: Router,
        limits: LimitsSettings,
        log: structlog.typing.FilteringBoundLogger,
        *,
        events: MessageEvents,
        echo_route: bool = False,
        allowed_origins: Collection[str] = (),
        authenticator: Authenticator | None = None,
        stats: Stats | None = None,
        new_id: Callable[[], str] = new_client_id,
    ) -> None:
        self.stats = stats or Stats()
        self._allowed_origins = frozenset(allowed_origins)
        self._echo_route = echo_route
        self._router = router
        self.limits = LiveLimits(limits)
        self._events = events
        self._log = log
        self._new_id = new_id
        self._numbers = itertools.count(1)
        self.capacity = Capacity(limits.max_connections, limits.max_connections_per_ip)
        self.handshakes = Handshakes(limits.max_handshakes, limits.max_handshakes_per_ip)
        self._auth = Authentication(authenticator, limits, self.stats)
        self.connections: set[Connection] = set()
        self._heads = HeadReading()
        #: Reads the plain TCP connections' sockets, while the server runs it; None:
        #: each reader waits for its socket itself.
        self.poller: ReadPoller | None = None

    def reconfigure(
        self,
        limits: LimitsSettings,
        *,
        allowed_origins: Collection[str] = (),
        authenticator: Authenticator | None = None,
    ) -> None:
        """Apply reloadable settings to new handshakes and, where it makes sense, open ones.

        :mod:`relayd.daemon.live` lists which limits reach open connections.
        """
        self.limits.current = limits
        self.capacity.max_total = limits.max_connections
        self.capacity.max_per_ip = limits.max_connections_per_ip
        self.handshakes.max_total = limits.max_handshakes
        self.handshakes.max_per_ip = limits.max_handshakes_per_ip
        self._auth.reconfigure(authenticator, limits)
        self._allowed_origins = frozenset(allowed_origins)

    @property
    def authenticating(self) -> bool:
        """Whether handshakes are authenticated now (ids are then subjects, maybe shared)."""
        return self._auth.authenticator is not None

    def open_totals(self) -> tuple[int, int, int]:
        """Open connections, and the bytes they have received and sent so far."""
        connections = self.connections
        return (
            len(connections),
            sum(c.bytes_in for c in connections),
            sum(c.bytes_out for c in connections),
        )

    def drain(self) -> None:
        """Refuse handshakes with 503, in progress or new, and drain every open connection."""
        self._heads.drain()
        for connection in self.connections:
            connection.drain()

    async def handed_off(self) -> None:
        """Return once every open connection's reader has handed what it read to the router.

        For the server's drain, after :meth:`drain` stopped the readers and
        before the router closes: what a client sent and relayd read is routed
        and answered, not dropped. The caller bounds the wait (the drain's
        ``shutdown_grace_s``).
        """
        # A reader whose read came in before the stop hands it over in its next step:
        # let it take that step (a poller's read handed to its task waits as a hand-off).
        await trio.lowlevel.checkpoint()
        for connection in list(self.connections):
            await connection.handed_off()

    async def __call__(
        self, stream: Accepted, released: Callable[[], None] = _nothing, peer: Any = None
    ) -> None:
        """Serve one accepted stream to the end and close it; never raises (but Cancelled).

        One coroutine from the accept to the close: an open connection waits
        in it (and in the frames under it) for as long as it lasts, and each
        frame costs some 300 bytes.

        Args:
            stream: the accepted client, a plain TCP socket or a stream;
                closed here, whatever happens.
            released: called once ``stream`` is closed (the accept loops count
                the socket until then).
            peer: the client's address as ``accept()`` gave it, if it did (a
                plain TCP socket); else it is asked of the stream.
        """
        transport: Transport | None = None
        attempt: _Attempt | None = None
        try:
            attempt = self._admit(stream, peer)
            if attempt is None:
                return
            transport = Transport(stream)
            try:
                # The handshake's request, headers and reader are gone (with
                # its frame) by the time the connection runs, possibly for days.
                connection = await self._handshake(transport, attempt)
                if connection is not None:
                    self.connections.add(connection)
                    self.stats.connections_total += 1
                    try:
                        if self._heads.draining:
                            connection.drain()
                        await connection.run()
                    finally:
                        self.connections.discard(connection)
            except* Exception as group:
                await self._fail(transport, attempt, group)
        finally:
            try:
                if transport is None:
                    await discard(stream)
                else:
                    await transport.close()
            finally:
                try:
                    if attempt is not None:
                        self._release(attempt)
                finally:
                    released()

    def _admit(self, stream: Accepted, peer: Any) -> _Attempt | None:
        """Count ``stream`` as a handshake in progress; None if it is not to be served."""
        address = peer_address(stream) if peer is None else socket_address(peer)
        # A TLS stream reset before its address could be looked at: nobody to serve.
        # (A plain TCP one comes with accept()'s address, even if reset in the queue:
        # it is counted like any client that leaves before its request.)
        if address is None:
            return None
        conn, ip = next(self._numbers), ip_of(address)
        over = self.handshakes.admit(ip)
        if over is not None:
            # Unread and at once: one address (or all of them) sending
            # nothing or half a request holds no more than its share.
            self._dropped(conn, address, over)
            return None
        return _Attempt(conn=conn, address=address, ip=ip)

    def _release(self, attempt: _Attempt) -> None:
        # After the close: a socket lingering for its last bytes still holds
        # a descriptor, so it still counts.
        if attempt.handshaking:
            self.handshakes.closed(attempt.ip)
        if attempt.counted:
            self.capacity.closed(attempt.ip)

    async def _fail(
        self, transport: Transport, attempt: _Attempt, group: BaseExceptionGroup[Exception]
    ) -> None:
        leaf = _first_leaf(group)
        self._log.error(
            "error",
            conn=attempt.conn,
            peer=attempt.address,
            summary=f"{type(leaf).__name__}: {leaf}",
            exc_info=group,
        )
        if attempt.accepted:
            await transport.send_close(
                CloseCode.INTERNAL_ERROR, "internal error", timeout_s=CLOSE_TIMEOUT_S
            )
        elif not attempt.answered:
            self.stats.count_refusal(500)
            await transport.send_within(refusal_response(500, "internal error"), CLOSE_TIMEOUT_S)

    async def _handshake(self, transport: Transport, attempt: _Attempt) -> Connection | None:
        """Read, decide and answer the handshake; the connection to run if accepted."""
        conn, address = attempt.conn, attempt.address
        # The request is read under the limits in force as it began to arrive.
        read = await self._heads.read(transport, self.limits.current)
        if isinstance(read, str):
            self._gone(conn, address, read)
            return None
        if isinstance(read, Refusal):
            await self._refuse(transport, attempt, read)
            return None
        request, early = read
        headers = request.headers
        # The connection starts with the limits in force now, not those of when its
        # request began (a reload may have come meanwhile): its Connection reads the
        # same ones below, with no wait between, so that the 101 announces the message
        # size its parser enforces (Relayd-Max-Message-Bytes).
        limits = self.limits.current
        self.capacity.opened(attempt.ip)  # decide() counts this connection in
        attempt.counted = True
        decision: Accept | Refusal = decide(
            draining=self._heads.draining,
            capacity=self.capacity,
            client_ip=attempt.ip,
            offered_subprotocols=request.subprotocols,
            path=request.target,
            echo_route=self._echo_route,
            origin=headers.get("origin"),
            allowed_origins=self._allowed_origins,
        )
        client_id = None
        authenticator = self._auth.authenticator
        if isinstance(decision, Accept) and authenticator is not None:
            identity = self._auth.identify(authenticator, attempt.ip, request)
            if isinstance(identity, Refusal):
                decision = identity
            else:
                client_id = identity.subject
        if not isinstance(decision, Accept):
            self.capacity.closed(attempt.ip)
            attempt.counted = False
            await self._refuse(transport, attempt, decision)
            return None
        client_id = client_id or self._new_id()
        connection = Connection(
            transport,
            early=early,
            conn=conn,
            client_id=client_id,
            dialect=decision.dialect,
            echo=decision.echo,
            router=self._router,
            tasks=_nursery_of_this_task(),
            limits=self.limits,
            events=self._events,
            log=self._log,
            stats=self.stats,
            poller=self.poller,
        )
        # Decided: from here it counts as a connection (capacity), no longer as a
        # handshake, whose limits bound reading and judging requests, not a
        # router's wait to make it routable (the cluster's waits for Redis).
        self.handshakes.closed(attempt.ip)
        attempt.handshaking = False
        try:
            welcome = await connection.greet()
            response = accept_response(
                request.key,
                decision.subprotocol,
                max_message_bytes=limits.max_message_bytes,
                messages_per_second=limits.messages_per_second,
                message_burst=limits.message_burst,
            )
            attempt.answered = True
            # The 101 and the welcome in one write: one TCP segment, and the
            # client has its id with the handshake's answer.
            sent = await transport.send_within(response + welcome, CLOSE_TIMEOUT_S)
        except BaseException:
            # Cancelled while waiting (a forced stop), or a bug: either way, what was
            # routed to it meanwhile is lost, and said so.
            if lost := connection.abandon():
                self._gone(conn, address, "the handshake response was cut short", lost)
            raise
        if not sent:
            lost = connection.abandon()
            self._gone(conn, address, "the client went away during the handshake response", lost)
            return None
        attempt.accepted = True
        info_line(
            self._log,
            "connection.open",
            conn=conn,
            id=client_id,
            peer=address,
            origin=headers.get("origin"),
            # A StrEnum member's str() is its value, without Enum.value's Python property.
            dialect="echo" if decision.echo else str(decision.dialect),
            user_agent=headers.get("user-agent"),
        )
        return connection

    async def _refuse(self, transport: Transport, attempt: _Attempt, refusal: Refusal) -> None:
        self.stats.count_refusal(refusal.status, refusal.kind)
        self._log.info(
            "handshake.rejected",
            conn=attempt.conn,
            peer=attempt.address,
            status=refusal.status,
            reason=refusal.reason,
        )
        attempt.answered = True
        await transport.send_within(
            refusal_response(refusal.status, refusal.reason), CLOSE_TIMEOUT_S
        )

    def _gone(self, conn: int, address: str, reason: str, undelivered: int = 0) -> None:
        # Port probes and health checks do this all day: count it, log it at
        # debug level only; unless messages routed to the client meanwhile
        # were lost with it (they were acknowledged as delivered).
        self.stats.count_refusal(0)
        if undelivered:
            self._log.info(
                "handshake.rejected",
                conn=conn,
                peer=address,
                status=None,
                reason=reason,
                undelivered=undelivered,
            )
        else:
            self._log.debug(
                "handshake.rejected", conn=conn, peer=address, status=None, reason=reason
            )

    def _dropped(self, conn: int, address: str, limit: str) -> None:
        self.stats.dropped[limit] += 1
        self._log.info(
            "handshake.rejected", conn=conn, peer=address, status=None, reason=_DROPPED[limit]
        )


_DROPPED: Final = {
    "max_handshakes": "too many handshakes in progress",
    "max_handshakes_per_ip": "too many handshakes in progress from this address",
}


@dataclasses.dataclass(slots=True)
class _Attempt:
    """One accepted stream, as the boundary needs to know it."""

    conn: int
    address: str
    ip: str
    answered: bool = False  # an HTTP response went out (or began to)
    accepted: bool = False  # the 101 went out: the WebSocket is open
    handshaking: bool = True  # counted in Gate.handshakes
    counted: bool = False  # counted in Gate.capacity


def _nursery_of_this_task() -> trio.Nursery:
    # The gate runs as a task of the server's connections nursery (or a
    # test's): the connection's writer tasks run there beside it.
    nursery = trio.lowlevel.current_task().parent_nursery
    assert nursery is not None  # only trio.run's first task has none
    return nursery


def _first_leaf(error: BaseException) -> BaseException:
    # Nurseries wrap errors in groups, possibly nested; the log names the
    # first real exception, and the traceback shows the whole group.
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error

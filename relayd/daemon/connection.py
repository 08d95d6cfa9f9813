"""One accepted WebSocket connection: its reader, writer and timers.

Data path through here: the reader (:class:`~relayd.daemon.reader.Reader`)
takes what one read brought, parses every frame in it, judges each
message (:class:`~relayd.daemon.intake.Intake`) and hands the lot to the
router as one batch; the router offers other clients' messages to this
connection with :meth:`Connection.deliver`, into its outbox
(:class:`~relayd.routing.outbox.Outbox`); the writer takes everything waiting
since its last write and writes it with one ``send_all``.

Task layout: :meth:`Connection.run` runs in the connection's task (the accept
loop starts it; the gate runs in it), and waits for everything it starts::

    run
    ├── reader    socket -> router (runs in run's own task; on plain TCP the
    │             server's poller reads for it while it waits, and wakes it only
    │             for what needs a wait); also the timers
    │             (:class:`~relayd.policy.timers.Timers`: keepalive, idle, slow
    │             consumer) as deadlines on its wait for the socket
    └── writer    outbox -> socket (:class:`~relayd.daemon.writer.Writer`), while
                  there is more to write than the socket takes at once; a lone
                  message for an idle connection is written without a task, by
                  the task that queued it

The writer task runs in the nursery ``run``'s own task runs in (``tasks``: the
server's connections nursery), not in a nursery of its own, which would cost
every idle connection a cancel scope (about 1.1 KB); ``run`` bounds it, cancels
it if it ends early, waits for it before it returns, and raises its bugs as its
own. An idle connection is one task and one cancel scope (docs/benchmarks.md
has its cost in bytes).

How it ends is decided once, by :class:`~relayd.wire.lifecycle.Lifecycle`, whose
table says, for each way of ending, whether the outbox is flushed or dropped,
which close frame goes out, and whether relayd then waits for the client's.
This class carries those answers out: it stops the reader, leaves the routing
table, flushes or discards the outbox, and bounds each step: a flush for a
policy close, a write in progress and a closing handshake each get
:data:`~relayd.daemon.closing.CLOSE_TIMEOUT_S`; the server bounds a whole drain
with ``shutdown_grace_s``. The closing handshake and the ``connection.close``
event are :mod:`relayd.daemon.closing`'s.

Error handling: :meth:`Connection.run` raises only what is a bug in relayd;
the gate catches that at the connection boundary, logs it and closes with
1011 (:mod:`relayd.daemon.gate`). The transport itself is the gate's to close.
"""

from __future__ import annotations

from typing import Final

import structlog
import trio

from relayd.daemon.closing import CLOSE_TIMEOUT_S, closing_handshake, log_close
from relayd.daemon.intake import Intake
from relayd.daemon.live import LiveLimits
from relayd.daemon.poller import ReadPoller
from relayd.daemon.reader import Reader
from relayd.daemon.transport import Transport
from relayd.daemon.writer import Writer
from relayd.errors import RouterClosed
from relayd.policy.ratelimit import FramePacer
from relayd.policy.timers import Timers
from relayd.routing.interface import Router
from relayd.routing.outbox import Offer, Outbox
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from relayd.wire.dialects import Dialect, welcome_payload
from relayd.wire.frames import FrameParser
from relayd.wire.lifecycle import Lifecycle
from relayd.wire.server_frames import text_frame

__all__ = ["Connection"]

# Read as globals: an enum member read from its class goes through the enum
# type's __getattr__ (some 700 instructions on CPython 3.11), once per message here.
_QUEUED: Final = Offer.QUEUED


class Connection:
    """One client's connection, from the welcome frame to the close frame.

    It is the :class:`~relayd.routing.interface.Peer` the router sees, and it
    owns its outbox. Memory: an idle connection holds this object (slots, no
    ``__dict__``), its outbox, parser, intake, timers, writer and lifecycle,
    and one task; keep it lean.

    Args:
        transport: the client's stream, handshake done; its owner closes it.
        early: bytes the client sent after its handshake request, before the
            response (RFC 6455 forbids it, but it happens); parsed first.
        conn: the connection's number in this process, for logs.
        client_id: the id the client is addressed by.
        dialect: the dialect chosen at the handshake.
        echo: serve the diagnostic echo route: no id, not routable, every
            message comes back to its sender through the router and writer.
        router: where messages go.
        tasks: the nursery :meth:`run` is called in; its writer tasks run there too.
        limits: the limits in force, read at each use (a reload may replace them).
        events: where the outcomes of messages refused here are recorded.
        log: a logger already bound with nothing connection-specific.
        stats: the counters to add to (refusals, closes, bytes).
        poller: the server's, which reads a plain TCP socket while the reader
            waits for it; None: the reader waits itself.

    Attributes:
        started: when it opened, on trio's clock.
    """

    __slots__ = (
        "_echo",
        "_lifecycle",
        "_live",
        "_log",
        "_reader",
        "_registered",
        "_router",
        "_stats",
        "_tasks",
        "_timers",
        "_transport",
        "_writer",
        "client_id",
        "conn",
        "dialect",
        "outbox",
        "started",
    )

    def __init__(
        self,
        transport: Transport,
        *,
        early: bytes = b"",
        conn: int,
        client_id: str,
        dialect: Dialect,
        echo: bool = False,
        router: Router,
        tasks: trio.Nursery,
        limits: LiveLimits,
        events: MessageEvents,
        log: structlog.typing.FilteringBoundLogger,
        stats: Stats,
        poller: ReadPoller | None = None,
    ) -> None:
        self._transport = transport
        self._router = router
        self._tasks = tasks
        # Routable once registered; the echo route never is (it has no id to announce).
        self._registered = False
        self._echo = echo
        self._live = limits
        current = limits.current
        self._log = log
        self._stats = stats
        self.client_id = client_id
        self.dialect = dialect
        self.conn = conn
        # Sized once, for the connection's life.
        self.outbox = Outbox(current.outbox_messages)
        self._lifecycle = Lifecycle()
        now = self.started = trio.current_time()
        self._timers = Timers(current, now)
        self._writer = Writer(transport, self.outbox, self._lifecycle, self._timers, self)
        self._reader = Reader(
            self,
            transport=transport,
            early=early,
            # The frame size cap is fixed for the connection's life: it bounds
            # the memory its parser may hold. A reload that lowers
            # max_message_bytes reaches it as message_too_large instead.
            parser=FrameParser(current.max_message_bytes),
            # Fixed for the connection's life, like the parser it paces.
            pacer=FramePacer(current.frames_per_second, current.frame_burst, now),
            intake=Intake(self, limits, events, stats, echo=echo),
            router=router,
            outbox=self.outbox,
            writer=self._writer,
            timers=self._timers,
            lifecycle=self._lifecycle,
            limits=limits,
            log=log,
            poller=poller,
        )

    @property
    def bytes_in(self) -> int:
        """Bytes received from the client so far."""
        return self._reader.bytes_in

    @property
    def bytes_out(self) -> int:
        """Bytes sent to the client so far."""
        return self._writer.bytes_out

    # -- the router's side: the Peer interface -----------------------------------

    def deliver(self, frame: bytes) -> bool:
        """Offer a message from another client; never waits (see ``Peer.deliver``)."""
        offered = self.outbox.offer(frame)
        if offered is _QUEUED:
            self._writer.wake()
            return True
        if offered is Offer.FULL:
            # Full within a routing batch, whose write waits for its end: written now
            # if the socket takes it, the delivery is queued after all.
            if self._writer.make_room() and self.outbox.offer(frame) is _QUEUED:
                return True
            # The router must not wait: this only starts the slow-consumer clock.
            deadline = self._timers.refused(trio.current_time())
            if deadline is not None:
                self._reader.alarm(deadline)
        return False

    def reply(self, frame: bytes | None) -> None:
        """Fill a reserved reply slot (see ``Peer.reply``)."""
        if self.outbox.reply(frame):
            self._writer.wake()
        else:
            self._writer.slots_freed()

    def detach(self) -> None:
        """The router routes nothing more here: a draining writer can finish."""
        self.outbox.close()
        self._writer.slots_freed()

    def disconnect(self, code: int, reason: str) -> None:
        """Close for policy at the server API's request (logged as ``closed_by: "api"``)."""
        self.close_soon(code, reason, closed_by="api")

    # -- control, from other tasks ---------------------------------------------

    def drain(self) -> None:
        """Shut down gracefully: read no more, flush the outbox, close with 1001.

        The router detaches the connection once it has delivered what it
        accepted; the writer flushes the outbox and :meth:`run` closes.
        """
        if self._lifecycle.drain():
            self._reader.stop()
            if self._echo:  # never routed, so no router detaches it
                self.detach()

    async def handed_off(self) -> None:
        """Return once what the reader read is with the router (see ``Reader.handed_off``)."""
        await self._reader.handed_off()

    def close_soon(self, code: int, reason: str, *, closed_by: str = "server") -> None:
        """Close for policy: read no more, flush what is decided, then close with ``code``."""
        if not self._lifecycle.close_for_policy(code, reason, closed_by):
            return
        self._reader.stop()
        self._leave()
        self.outbox.close()
        self._finish_writing_by(trio.current_time() + CLOSE_TIMEOUT_S)
        self._writer.wake()  # a writer flushes, or ends at once if nothing is left

    def client_gone(self) -> None:
        """The writer found the client gone: nothing more is read or written."""
        # The reader may be waiting for the socket, or for room to route what
        # it read (that goes on to the router; its replies are dropped).
        self._lifecycle.end()
        self._reader.stop()
        self.outbox.discard()
        self._writer.slots_freed()

    def _leave(self) -> None:
        if self._registered:
            self._registered = False
            self._router.unregister(self)

    def _finish_writing_by(self, deadline: float) -> None:
        # What a close bounds: the writer's task, and the reader's wait to
        # hand off what it read.
        self._writer.finish_by(deadline)
        self._reader.finish_by(deadline)

    # -- the connection's life -------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until either side closes it, then log ``connection.close``.

        The gate has made it routable (:meth:`greet`), written its ``101`` and
        welcome, and logged ``connection.open``.

        Raises:
            Exception: only on a bug; the caller logs it and closes with 1011.
        """
        lifecycle = self._lifecycle
        try:
            writer = self._writer
            writer.attach(self._tasks)
            failure: BaseException | None = None
            try:
                if lifecycle.reading:
                    await self._reader.run()
                lifecycle.end()  # if still open, the stream ended without a close frame
                if lifecycle.flushing:
                    writer.wake()  # a writer stays until the outbox settles
                else:
                    # Nobody left to write to: drop what is queued and let a
                    # write in progress finish, briefly.
                    self._leave()
                    self.outbox.discard()
                    if writer.running:
                        self._finish_writing_by(trio.current_time() + CLOSE_TIMEOUT_S)
                        writer.wake()
            except BaseException as exc:
                failure = exc
                writer.stop()  # as its own nursery would have: it ends with its connection
                raise
            finally:
                # A writer still flushing goes on; none is started from now
                # on, whatever the router still answers.
                writer.detach()
                await self._writer_ended()
                writer.raise_crash(failure)
            # Written out, or given up: what the router still answers is dropped.
            self.outbox.discard()
            await closing_handshake(self._transport, lifecycle, self._reader, self._writer)
        except BaseException as exc:
            if _holds_a_bug(exc):
                # The caller's boundary logs the error and sends this close
                # code; the close event must already say so.
                lifecycle.crash()
            raise
        finally:
            lifecycle.end()  # still open here: it was cut short (the client left, or a forced stop)
            self._leave()
            self.outbox.discard()
            log_close(self, lifecycle, self._reader, self._writer, self._log, self._stats)
            # The reader, its intake and the writer point back to this
            # connection: without these links cut, a closed connection (some 25
            # objects, its socket's among them) would wait for a cyclic
            # collection to be freed, and make one come sooner.
            self._reader.forget_owner()
            self._writer.forget_owner()

    async def _writer_ended(self) -> None:
        """Wait for the writer task to end, within its bounds; at once if cancelled meanwhile."""
        writer = self._writer
        try:
            await writer.join()
        except BaseException:
            writer.stop()
            # Cancelled, it ends at its next checkpoint: the transport is not
            # closed under it.
            with trio.CancelScope(shield=True):
                await writer.join()
            raise

    async def greet(self) -> bytes:
        """Become routable; the welcome frame the caller sends right after the ``101``.

        Routable first, then announced: a message sent to the id the moment
        the client learns it must find it (on any node). The caller writes the
        ``101`` and this frame in one write, then calls :meth:`run`; or, if the
        client is gone by then (or the wait was cut short), :meth:`abandon`,
        also when this raises. The frame is counted as written here: an
        abandoned connection's counts are never logged. The echo route is not
        routable and has no welcome: ``b""``.
        """
        if self._echo:
            return b""
        frame = text_frame(welcome_payload(self.dialect, self.client_id))
        # Marked before the wait: a router may hold the connection before it
        # returns (the cluster's, while Redis answers), and abandon() must
        # remove it if the wait is cut short. Unregistering is idempotent.
        self._registered = True
        try:
            await self._router.register(self)
        except RouterClosed:  # accepted just as the server began draining
            self._registered = False
            self.drain()
            self.outbox.close()
        self._writer.count_written(frame)
        return frame

    def abandon(self) -> int:
        """The client went away before its welcome was written: leave the routing table.

        For a connection :meth:`greet` made routable and that will never
        :meth:`run`; it is not logged as a connection (the gate logs
        ``handshake.rejected``).

        Returns:
            The messages routed to it meanwhile (acknowledged to their senders
            as delivered), now lost: the gate logs them as undelivered.
        """
        self._leave()
        self.outbox.discard()
        self._reader.forget_owner()
        self._writer.forget_owner()
        return self.outbox.dropped


def _holds_a_bug(error: BaseException) -> bool:
    """True if ``error`` is, or holds, an Exception: not only a cancellation."""
    if isinstance(error, BaseExceptionGroup):
        return error.subgroup(Exception) is not None
    return isinstance(error, Exception)

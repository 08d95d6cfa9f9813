"""One connection's reader: its socket to the router, and its timers.

The reader takes what one read brought (it waits for the socket and reads
it once, as :meth:`Transport.receive
<relayd.daemon.transport.Transport.receive>` does; or the server's poller reads
it, see below), parses every frame in it
(:class:`~relayd.wire.frames.FrameParser`), judges each message
(:class:`~relayd.daemon.intake.Intake`) and hands the lot to the router as one
batch, with a reply slot reserved for each item in the outbox. A client that
does not read its replies is not read from until it does (TCP backpressure),
for ``slow_consumer_timeout_s`` at most.

It also keeps the connection's timers (:class:`~relayd.policy.timers.Timers`),
as the deadline of its wait for the socket: keepalive pings, the pong
deadline, the idle timeout and the slow-consumer clock.

What ends the reading is the connection's :class:`~relayd.wire.lifecycle.Lifecycle`:
the reader records a close frame, a protocol violation or the stream's end
there, and asks its connection to close for policy (rate, timers) or to drain
(the router closed); anything else stops it through :meth:`Reader.stop`.

Runs in :meth:`~relayd.daemon.connection.Connection.run`'s own task; raises
only on a bug. A plain TCP connection's reads are taken, while it waits for its
socket, by the server's :class:`~relayd.daemon.poller.ReadPoller` when one runs:
the poller's task handles a read at once (:meth:`Reader.readable`) and wakes
the reader's task only for what needs a wait, ends the reading, or comes with
a timer due; the rest of a read's handling is the reader's task's, as if it
had read it itself. Once relayd has sent its
close frame, the closing handshake (:mod:`relayd.daemon.closing`) reads the
client's through :meth:`Reader.feed`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final, TypeAlias

import structlog
import trio

from relayd.daemon.intake import Intake
from relayd.daemon.live import LiveLimits
from relayd.daemon.transport import Transport
from relayd.daemon.writer import Writer
from relayd.errors import CloseCode, ProtocolError, RouterClosed
from relayd.policy.ratelimit import FramePacer
from relayd.policy.timers import Due, Timers
from relayd.routing.interface import Inbound, Reply, Router
from relayd.routing.outbox import Outbox
from relayd.telemetry import clock
from relayd.wire.frames import (
    OP_BINARY,
    OP_PING,
    OP_PONG,
    FrameParser,
    parse_close,
)
from relayd.wire.lifecycle import Lifecycle
from relayd.wire.server_frames import encode_frame

if TYPE_CHECKING:
    from relayd.daemon.connection import Connection
    from relayd.daemon.poller import ReadPoller

__all__ = ["RECEIVE_BYTES", "Handover", "Parsed", "Reader"]

#: Bytes asked of the socket per read: under load one read takes a burst of
#: small frames, which then cost one router hand-off between them. It bounds
#: what one read can put in the router's inbox.
RECEIVE_BYTES: Final = 65536

_PING: Final = encode_frame(OP_PING, b"relayd")
#: What :meth:`Reader._take` returns when a message went over the rate limit (True,
#: 1, is any other end of the read).
_OVER_RATE: Final = 2
#: How long the reader waits for the router to pass a read's items before closing
#: for the rate limit anyway: a router that far behind is shutting down or stuck.
_ROUTED_WITHIN_S: Final = 5.0


class Parsed:
    """A read parsed and judged, for the reader's task to route (see :meth:`Reader.readable`)."""

    __slots__ = ("batch", "ended", "reserved", "violation")

    def __init__(
        self, batch: list[Inbound], ended: int, violation: ProtocolError | None, reserved: bool
    ) -> None:
        self.batch = batch
        self.ended = ended
        self.violation = violation
        self.reserved = reserved  # the batch's reply slots are taken


#: What a reader's task is woken with by the poller: a read to handle (empty:
#: reading is over), one parsed already, or nothing (wait again).
Handover: TypeAlias = bytes | bytearray | Parsed | None


class _Routed:
    """The last item of a read that ends over the rate limit: routed, it says so.

    The router takes a reader's items in order and "replies" to this one once it
    has routed those before it; only then does the connection close and leave the
    routing table, so that a message it sent to its own id just before is
    delivered to it, as it would have been in a read of its own.
    """

    __slots__ = ("_owner", "done")

    def __init__(self, owner: Connection) -> None:
        self._owner = owner
        self.done = trio.Event()

    def reply(self, frame: bytes | None) -> None:
        self._owner.reply(None)  # the slot the reader reserved for it
        self.done.set()


class _HandOff:
    """A reader's wait to hand a read to the router: cut short by a stop, awaited by a drain.

    Made only when the hand-off must wait (for reply slots, or for room in the
    router's inbox), and let go when it ends.
    """

    __slots__ = ("done", "room")

    def __init__(self) -> None:
        #: Set when the hand-off has ended, the items routed or given up.
        self.done = trio.Event()
        #: The wait for reply slots, while there is one: a stop cancels it.
        self.room: trio.CancelScope | None = None


class Reader:
    """Reads one connection; see the module docstring.

    Args:
        owner: the connection, asked to close or drain.
        transport: the client's stream.
        early: bytes that came with the handshake request; parsed first.
        parser: the connection's frame parser.
        pacer: the frames the connection may send (fixed for its life, like the parser).
        intake: judges each message.
        router: where batches go.
        outbox: where reply slots are reserved and pongs queued.
        writer: woken for pongs and pings; waited on for reply slots.
        timers: the connection's deadlines.
        lifecycle: the connection's lifecycle.
        limits: the limits in force (a reload may replace them).
        log: for ``limit.exceeded``.
        poller: reads a plain TCP socket while the reader waits for it; None:
            the reader waits for its socket itself.

    Attributes:
        messages_in: messages read.
        bytes_in: bytes read.
    """

    __slots__ = (
        "_bound",
        "_early",
        "_hand_off",
        "_intake",
        "_lifecycle",
        "_live",
        "_log",
        "_outbox",
        "_owner",
        "_pacer",
        "_parser",
        "_poller",
        "_receive_scope",
        "_router",
        "_timers",
        "_transport",
        "_waiting_for_socket",
        "_writer",
        "bytes_in",
        "messages_in",
    )

    def __init__(
        self,
        owner: Connection,
        *,
        transport: Transport,
        early: bytes,
        parser: FrameParser,
        pacer: FramePacer,
        intake: Intake,
        router: Router,
        outbox: Outbox,
        writer: Writer,
        timers: Timers,
        lifecycle: Lifecycle,
        limits: LiveLimits,
        log: structlog.typing.FilteringBoundLogger,
        poller: ReadPoller | None = None,
    ) -> None:
        self._owner = owner
        self._poller = poller
        self._transport = transport
        self._early = early
        self._parser = parser
        self._pacer = pacer
        self._intake = intake
        self._router = router
        self._outbox = outbox
        self._writer = writer
        self._timers = timers
        self._lifecycle = lifecycle
        self._live = limits
        self._log = log
        # The stretch's scope: its deadline is the next timer's while the
        # reader waits for the socket, a close's bound while it hands off.
        self._receive_scope: trio.CancelScope | None = None
        # The deadline of waits other than for the socket: none, until a close bounds them.
        self._bound = math.inf
        self._waiting_for_socket = False  # waiting for the socket to be readable
        # A hand-off to the router that waits (for reply slots or the router's inbox).
        self._hand_off: _HandOff | None = None
        self.messages_in = self.bytes_in = 0

    def stop(self) -> None:
        """Stop waiting for the socket; the lifecycle says reading is over.

        A wait for the socket is cut short. A hand-off to the router in
        progress finishes, so that what was read is routed and gets its
        replies: one waiting for the client to make room for its replies
        takes their slots beyond the outbox's bound at once (that read's items
        bound them, as for a connection closed over its rate), and one waiting
        for room in the router's inbox waits on (the router drains it; a
        close's deadline bounds it). A server's drain waits for it before it
        closes the router (:meth:`handed_off`).
        """
        if self._waiting_for_socket and self._receive_scope is not None:
            self._receive_scope.cancel()
        elif self._hand_off is not None and self._hand_off.room is not None:
            self._hand_off.room.cancel()

    async def handed_off(self) -> None:
        """Return once no hand-off of this reader's to the router is in progress.

        For the server's drain, after :meth:`stop`: what the reader read before
        it goes to the router before the router closes. Cancelled by the
        caller's deadline.
        """
        hand_off = self._hand_off
        if hand_off is not None:
            await hand_off.done.wait()

    def finish_by(self, deadline: float) -> None:
        """Cut short a hand-off to the router still waiting at ``deadline`` (a close's bound)."""
        self._bound = deadline
        scope = self._receive_scope
        if not self._waiting_for_socket and scope is not None:
            scope.deadline = deadline

    def forget_owner(self) -> None:
        """Drop the links back to the connection (its own and its intake's), once it has ended.

        Nothing may be read after this; :meth:`stop`, :meth:`alarm` and
        :meth:`finish_by` may still be called, and do nothing.
        """
        del self._owner, self._intake

    def alarm(self, deadline: float) -> None:
        """Wake by ``deadline`` to see to a timer that has just started."""
        scope = self._receive_scope
        if self._waiting_for_socket and scope is not None and deadline < scope.deadline:
            scope.deadline = deadline

    async def run(self) -> None:
        """Read until the connection stops reading: a close, a stop, a timer, or the end."""
        transport = self._transport
        # A plain socket's descriptor is waited on in this frame (or in the
        # poller's wait, called from it): an idle connection waits here for
        # days, and a frame of the transport's under it would cost some 220
        # bytes more.
        fd = transport.fd
        poller = self._poller if fd >= 0 else None
        data: Handover = self._early  # what came with the handshake first
        self._early = b""
        lifecycle = self._lifecycle
        while lifecycle.reading:
            # One cancel scope for a stretch of reads: its deadline is the next
            # timer; a timer, or a stop, cancels the wait for the socket, and
            # ends the stretch. Handling what was read waits for nothing but
            # in the rare slow paths of _route, which first put the deadline
            # at a close's bound (none while open); so the deadline is set
            # only when it changes (a change costs trio a heap entry and a
            # context manager). It is the connection's only cancel scope
            # while it is idle. A stretch with no read to handle first begins
            # with its deadline: given to the scope, it costs no change after.
            first = math.inf if data else self._timers.deadline(self._live.current)
            with trio.CancelScope(deadline=first) as scope:
                self._receive_scope = scope
                while True:
                    if isinstance(data, Parsed):  # the poller's, to finish here
                        parsed, data = data, None
                        if not await self._finish(parsed):
                            return
                    elif data:
                        now = clock.now()
                        if now >= scope.deadline:
                            # A timer came due as the read did: trio may have
                            # cancelled the stretch already, and any wait of the
                            # hand-off would end at once. The timer is seen to
                            # first; the read is handled first in the next stretch.
                            break
                        pending, data = data, b""  # handled once, whatever happens
                        if not await self._handle(pending, now):
                            return
                    deadline = self._timers.deadline(self._live.current)
                    if deadline != scope.deadline:
                        scope.deadline = deadline
                    self._waiting_for_socket = True
                    try:
                        if poller is not None and poller.running:
                            data = await poller.wait(fd, self)
                        elif fd < 0:
                            data = await transport.receive(RECEIVE_BYTES)
                        else:
                            await trio.lowlevel.wait_readable(fd)
                            data = transport.read_nowait(RECEIVE_BYTES)
                    finally:
                        self._waiting_for_socket = False
                    if data is None:
                        continue  # readable, then not: wait again
                    if not data:
                        return
            self._receive_scope = None
            if not lifecycle.reading or not self._due():
                return

    def readable(self) -> Handover:
        """The poller's: read the socket, and handle the read at once if it needs no wait.

        Runs in the poller's task while the reader's own waits for the socket
        (:meth:`ReadPoller.wait <relayd.daemon.poller.ReadPoller.wait>`), and does
        what the reader's task would do with the read, as far as it can without
        a wait: parse, judge, take the reply slots and route at once.

        Returns:
            None if the read was handled, or there was nothing to read after all,
            and the reader waits on; else what its task is woken to finish: the
            read itself (a timer came due with it; empty: the client has gone,
            or reading is over), or the read parsed (:class:`Parsed`: it closes
            the connection, or its routing needs a wait).
        """
        data = self._transport.read_nowait(RECEIVE_BYTES)
        if data is None:
            return None
        now = clock.now()
        scope = self._receive_scope
        if not data or scope is None or now >= scope.deadline:
            return data  # the end, or a timer first: as the task's own loop sees to it
        # As in the task's own handling: a stop from here on lets the read be
        # handled (and reading then ends), and a close's bound applies at once.
        self._waiting_for_socket = False
        batch, ended, violation = self._parse(data, now)
        reserved = False
        if not ended and violation is None and batch:
            outbox = self._outbox
            if len(batch) <= outbox.capacity and outbox.reserve(len(batch)):
                try:
                    if self._router.try_route(batch):
                        batch = []
                except Exception as exc:
                    if not self._unroute(batch, exc):
                        return b""
                    raise  # pragma: no cover - _unroute raises what is not RouterClosed
                reserved = True
        if batch or ended or violation is not None:
            # For the task: no timer may cut its hand-off short, only a close (as
            # _route sees to in the task; the deadline may pass before it runs).
            self._lift_deadline()
            if batch:  # a drain that comes before the task runs waits for it (handed_off)
                self._begin_hand_off()
            return Parsed(batch, ended, violation, reserved)
        if not self._lifecycle.reading:
            return b""
        deadline = self._timers.deadline(self._live.current)
        if deadline != scope.deadline:
            scope.deadline = deadline
        self._waiting_for_socket = True  # it waits on
        return None

    async def _handle(self, data: bytes | bytearray, now: float) -> bool:
        """Parse one read, made at ``now``, and route what it held; False once reading must stop."""
        batch, ended, violation = self._parse(data, now)
        return await self._finish(Parsed(batch, ended, violation, False))

    def _parse(
        self, data: bytes | bytearray, now: float
    ) -> tuple[list[Inbound], int, ProtocolError | None]:
        """One read, made at ``now``, parsed and judged: its items, how it ends, its violation."""
        self.bytes_in += len(data)
        violation: ProtocolError | None = None
        parser = self._parser
        try:
            # self.feed(data, now), without a call between: this runs for every read.
            events = parser.feed(data, self._pacer.allowance(now, parser.frames))
        except ProtocolError as exc:
            events, violation = exc.parsed, exc
        batch: list[Inbound] = []
        ended = self._take(events, batch, now)
        # The frames are taken: what the router needs is in the batch. Held while it
        # waits (for reply slots, up to slow_consumer_timeout_s), a read's 2,000 frames
        # (frame_burst) would be some 240 KiB of objects beside its 64 KiB of bytes.
        del events
        if violation is not None:
            # Its traceback holds the parser's frames, whose locals hold the list too, and
            # so does that of the error it was raised from (a UnicodeDecodeError: 1007).
            violation.parsed = []
            violation.__traceback__ = violation.__context__ = violation.__cause__ = None
        return batch, ended, violation

    async def _finish(self, parsed: Parsed) -> bool:
        """Route a parsed read and end the reading as it says; False once reading must stop."""
        batch, ended, violation = parsed.batch, parsed.ended, parsed.violation
        if ended == _OVER_RATE:
            return await self._close_over_rate(batch)
        if batch and not await self._route(batch, reserved=parsed.reserved):
            return False
        if violation is not None and not ended:
            if violation.code == CloseCode.TOO_BIG:
                self._limit_exceeded("max_message_bytes")
            elif violation.code == CloseCode.POLICY:  # the parser's only 1008: frame pacing
                self._limit_exceeded("frames_per_second")
            self._lifecycle.violate(violation.code, violation.reason)
            return False
        return not ended and self._lifecycle.reading

    async def _close_over_rate(self, batch: list[Inbound]) -> bool:
        """Route what came before the message over the rate limit, then close with 1008.

        The connection leaves the routing table only once the router has passed
        over ``batch`` (:class:`_Routed`), or :data:`_ROUTED_WITHIN_S` has gone by.

        Returns:
            False: reading is over.
        """
        if batch:
            routed = _Routed(self._owner)
            batch.append(Reply(routed, None))
            if not await self._route(batch, closing=True):
                return False
            if not routed.done.is_set():  # handed to the router's task, not routed at once
                self._lift_deadline()
                with trio.move_on_after(_ROUTED_WITHIN_S):
                    await routed.done.wait()
        self._owner.close_soon(CloseCode.POLICY, "rate limit exceeded")
        return False

    def feed(self, data: bytes | bytearray, now: float) -> list[tuple[int, bytes]]:
        """Parse ``data``, read at ``now``, within the frames the connection may still send."""
        parser = self._parser
        return parser.feed(data, self._pacer.allowance(now, parser.frames))

    def _take(self, events: list[tuple[int, bytes]], batch: list[Inbound], now: float) -> int:
        """Turn one read's frames (read at ``now``) into router items; true if it ends here.

        :data:`_OVER_RATE` when a message went over the rate limit: the caller
        closes the connection once the items before it are routed.
        """
        for opcode, payload in events:
            if opcode <= OP_BINARY:
                self._timers.received(now)
                self.messages_in += 1
                item = self._intake.judge(opcode, payload, now)
                if item is None:
                    self._limit_exceeded("messages_per_second")
                    return _OVER_RATE
                batch.append(item)
            elif opcode == OP_PING:
                self._timers.heard(now)
                if self._outbox.control(encode_frame(OP_PONG, payload)):
                    self._writer.wake()
            elif opcode == OP_PONG:
                self._timers.pong()
            else:
                self._transport.close_received = True
                self._lifecycle.receive_close(*parse_close(payload))
                return True
        return False

    async def _route(
        self, items: list[Inbound], *, closing: bool = False, reserved: bool = False
    ) -> bool:
        """Hand ``items`` to the router with a reply slot each, in chunks the outbox can hold.

        Waits (reading nothing more from the client) while the client has not
        read enough of its replies to make room; for ``slow_consumer_timeout_s``
        at most, after which the connection closes with 1013. Once reading is
        over (a stop, the client's close frame), and for ``closing`` (the last
        read, over the rate limit), the slots are taken without a wait
        (:meth:`~relayd.routing.outbox.Outbox.reserve_beyond`): that read's
        replies are all that is left. ``reserved``: the slots of ``items`` (one
        part) are taken already.

        Returns:
            False if the connection is closing: as a slow consumer, or because the
            router is shutting down (the connection drains).
        """
        outbox = self._outbox
        chunk = outbox.capacity
        parts: tuple[list[Inbound], ...]
        if len(items) <= chunk:  # one read's items nearly always fit
            parts = (items,)
        else:
            parts = tuple(items[start : start + chunk] for start in range(0, len(items), chunk))
        try:
            for part in parts:
                if reserved:
                    reserved = False
                elif not outbox.reserve(len(part)):
                    if closing or not self._lifecycle.reading:
                        # The last read (over the rate, or reading stopped): its replies
                        # are all that is left, and waiting would only delay the close.
                        outbox.reserve_beyond(len(part))
                    elif not await self._wait_for_room(len(part)):
                        return False
                try:
                    if not self._router.try_route(part):
                        self._lift_deadline()
                        self._begin_hand_off()
                        await self._router.route(part)
                except BaseException as exc:
                    if not self._unroute(part, exc):
                        return False
                    raise  # pragma: no cover - _unroute raises what is not RouterClosed
            return True
        finally:
            hand_off = self._hand_off
            if hand_off is not None:
                self._hand_off = None
                hand_off.done.set()

    def _begin_hand_off(self) -> _HandOff:
        """The hand-off in progress, made now if it was not waiting yet."""
        hand_off = self._hand_off
        if hand_off is None:
            hand_off = self._hand_off = _HandOff()
        return hand_off

    async def _wait_for_room(self, n: int) -> bool:
        """Wait for ``n`` free reply slots, and take them; False if the client made no room.

        Bounded by ``slow_consumer_timeout_s``, after which the connection
        closes with 1013 (False). A stop (:meth:`stop`) ends the wait at once
        and takes the slots beyond the outbox's bound.
        """
        self._lift_deadline()
        hand_off = self._begin_hand_off()
        with trio.move_on_after(self._timers.slow_consumer_timeout_s) as waiting:
            hand_off.room = waiting
            await self._writer.wait_for_room(n)
        hand_off.room = None
        if waiting.cancelled_caught:
            if self._lifecycle.reading:
                self._stuck()
                return False
            self._outbox.reserve_beyond(n)  # stopped: see stop()
        return True

    def _unroute(self, part: list[Inbound], exc: BaseException) -> bool:
        """Give back the slots of ``part``, whose routing raised ``exc``; False: the router closed.

        Raises:
            BaseException: ``exc``, unless it is :class:`RouterClosed` (the connection drains).
        """
        # RouterClosed, or cancelled: the router took nothing. (A bug raised while
        # routing at once may come after some items were answered; a None beyond
        # the slots reserved is ignored, and the connection closes with 1011.)
        for _ in part:
            self._outbox.reply(None)
        self._writer.slots_freed()
        if isinstance(exc, RouterClosed):
            self._owner.drain()
            return False
        raise exc

    def _lift_deadline(self) -> None:
        """Before a wait other than for the socket: no timer may cut it short, only a close.

        What was read is then routed whatever the timers say; they are seen
        to once the reader next waits for the socket. A close for policy
        bounds the wait (:meth:`finish_by`).
        """
        if self._receive_scope is not None:
            self._receive_scope.deadline = self._bound

    def _due(self) -> bool:
        """See to the timers that are due; False if the connection closes for one."""
        due = self._timers.due(trio.current_time(), self._live.current)
        if due is Due.PING:
            if self._outbox.control(_PING):
                self._writer.wake()
        elif due is Due.STUCK:
            self._stuck()
        elif due is Due.NO_PONG:
            self._limit_exceeded("pong_timeout_s")
            self._owner.close_soon(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        elif due is Due.IDLE:
            self._owner.close_soon(CloseCode.NORMAL, "idle timeout")
        return self._lifecycle.reading

    def _stuck(self) -> None:
        self._limit_exceeded("slow_consumer_timeout_s")
        self._owner.close_soon(CloseCode.TRY_AGAIN_LATER, "slow consumer: outbox stayed full")

    def _limit_exceeded(self, limit: str) -> None:
        self._log.warning(
            "limit.exceeded",
            conn=self._owner.conn,
            id=self._owner.client_id,
            limit=limit,
            action="close",
        )

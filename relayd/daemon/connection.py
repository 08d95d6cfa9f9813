"""One accepted WebSocket connection: its reader, writer, timers and log events.

Data path through here: the reader takes what one ``receive_some`` brought,
parses every frame in it (:class:`~relayd.wire.frames.FrameParser`), checks each
message against the connection's limits and hands the lot to the router as
one batch; the writer takes everything the router put in the connection's
outbox since its last write and writes it with one ``send_all``.

Task layout, all owned by :meth:`Connection.run`::

    run
    ├── reader    socket -> router (runs in run's own task); also the timers:
    │             keepalive pings, pong deadline, idle timeout, as deadlines
    │             on its wait for the socket
    └── writer    outbox -> socket, while there is something to write: started
                  when frames arrive, gone after WRITER_IDLE_S without any

An idle connection is one task in one nursery: it costs about 10.3 KiB
(docs/benchmarks.md).

Who closes:

* the client, with a close frame: relayd echoes it at once (RFC 6455 §5.5.1),
  dropping what its outbox still holds; or with the TCP connection dropping
  (logged as 1006).
* relayd, for a protocol violation (1002, 1007, 1009): the close frame goes out
  at once and the connection is failed without waiting for the client's.
* relayd, for policy (1008 abuse, 1013 slow consumer, 1000 idle, 1011 no
  pong): :meth:`Connection.close_soon` stops the reader and lets the writer
  finish the write in progress, within :data:`CLOSE_TIMEOUT_S`; then relayd
  sends the close frame and waits up to :data:`CLOSE_TIMEOUT_S` more for the
  client's.
* relayd, shutting down: :meth:`Connection.drain` stops the reader only; the
  router delivers what it already accepted and then closes the outbox, the
  writer flushes it and the connection closes with 1001. The server bounds the
  whole drain with ``shutdown_grace_s``.

Error handling: :meth:`Connection.run` raises only what is a bug in relayd;
the listener catches that at the connection boundary, logs it and closes with
1011 (:mod:`relayd.daemon.gate`). The transport itself is the listener's to close.
"""

from __future__ import annotations

import math
from typing import Final

import structlog
import trio

from relayd.daemon.live import LiveLimits
from relayd.daemon.transport import Transport
from relayd.errors import CloseCode, EnvelopeError, ErrorCode, ProtocolError, RouterClosed
from relayd.policy.ratelimit import FramePacer, RateLimiter, Verdict
from relayd.routing.interface import Inbound, Peer, Relay, Reply, Router
from relayd.routing.outbox import Outbox
from relayd.telemetry.metrics import Stats
from relayd.wire.dialects import Dialect, decode_envelope, error_payload, welcome_payload
from relayd.wire.frames import (
    NO_STATUS,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    encode_frame,
    parse_close,
    text_frame,
)

__all__ = ["CLOSE_TIMEOUT_S", "RECEIVE_BYTES", "WRITER_IDLE_S", "Connection"]

#: How long relayd waits to finish a write and complete a closing handshake it
#: started before dropping the transport. A peer that is still reading answers
#: in milliseconds; one that is not would hold the connection forever.
CLOSE_TIMEOUT_S: Final = 5.0
#: Bytes asked of the socket per read: under load one read takes a burst of
#: small frames, which then cost one router hand-off between them. It bounds
#: what one read can put in the router's inbox.
RECEIVE_BYTES: Final = 65536
#: How long a writer with nothing to write waits for more before its task
#: ends. Under traffic it stays; an idle connection does without one (its
#: task and frames are a good part of an idle connection's memory).
WRITER_IDLE_S: Final = 1.0

_PING: Final = encode_frame(OP_PING, b"relayd")


class Connection:
    """One client's connection, from the welcome frame to the close frame.

    Memory: an idle connection holds this object (slots, no ``__dict__``), its
    outbox, parser and rate limiter, one task and two cancel scopes; it is
    counted per connection in docs/benchmarks.md, so keep it lean.

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
        limits: the limits in force, and whether to log a ``message.relay``
            event for each message refused here (the router logs the ones it
            routes); read at each use, as a reload may replace them.
        log: a logger already bound with nothing connection-specific.
        stats: the counters to add to (refusals, closes, bytes).
        peer_address: ``host:port`` of the client, for logs.
        origin: the ``Origin`` header, if any, for logs.
        user_agent: the ``User-Agent`` header, if any, for logs.
    """

    __slots__ = (
        "_client_closed",
        "_close",
        "_dropped",
        "_early",
        "_echo",
        "_flushing",
        "_io",
        "_io_deadline",
        "_last_activity",
        "_limiter",
        "_limiter_limits",
        "_live",
        "_log",
        "_next_ping",
        "_open_fields",
        "_pacer",
        "_parser",
        "_parser_failed",
        "_pong_deadline",
        "_receive_scope",
        "_reply_slots",
        "_router",
        "_slow_consumer_timeout_s",
        "_started",
        "_stats",
        "_stop_reading",
        "_stop_writing",
        "_stuck_deadline",
        "_transport",
        "_waiting_for_socket",
        "_writer_running",
        "bytes_in",
        "bytes_out",
        "messages_in",
        "messages_out",
        "peer",
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
        limits: LiveLimits,
        log: structlog.typing.FilteringBoundLogger,
        stats: Stats,
        peer_address: str,
        origin: str | None = None,
        user_agent: str | None = None,
    ) -> None:
        self._transport = transport
        self._early = early
        self._router = router
        self._live = limits
        current = limits.current
        # The frame size cap is fixed for the connection's life: it bounds the
        # memory its parser may hold. A reload that lowers max_message_bytes
        # reaches it as message_too_large instead.
        self._parser = FrameParser(current.max_message_bytes)
        self._log = log
        self._stats = stats
        self._echo = echo
        self._open_fields: dict[str, object] | None = {
            "conn": conn,
            "id": client_id,
            "peer": peer_address,
            "origin": origin,
            "dialect": "echo" if echo else dialect.value,
            "user_agent": user_agent,
        }
        # Fixed with the outbox, for its life.
        self._reply_slots = current.outbox_messages
        self._slow_consumer_timeout_s = current.slow_consumer_timeout_s
        self.peer = Peer(
            client_id=client_id,
            dialect=dialect,
            outbox=Outbox(
                current.outbox_messages,
                current.slow_consumer_timeout_s,
                self._set_stuck_deadline,
                on_frames=self._start_writer,
            ),
            conn=conn,
        )
        self._stop_reading = False
        self._receive_scope: trio.CancelScope | None = None  # the reader's wait for the socket
        # The nursery the writer runs in, once it is open, and the deadline for
        # the writer to finish once relayd has decided to close.
        self._io: trio.Nursery | None = None
        self._io_deadline = math.inf
        self._writer_running = False
        self._flushing = False  # draining: the writer stays until the outbox is closed
        self._waiting_for_socket = False  # the reader is in receive_some
        self._stuck_deadline = math.inf
        self._pong_deadline = math.inf
        self._last_activity = trio.current_time()
        self._started = self._last_activity
        self._next_ping = self._started + (current.ping_interval_s or math.inf)
        self._limiter_limits = current
        self._limiter = RateLimiter(
            current.messages_per_second, current.message_burst, self._started
        )
        # Fixed for the connection's life, like the parser it paces.
        self._pacer = FramePacer(current.frames_per_second, current.frame_burst, self._started)
        self._stop_writing = False
        self._parser_failed = False
        self._client_closed = False  # its close frame arrived
        # Set once, by whichever side decides first: (code, reason, closed_by).
        self._close: tuple[int, str, str] | None = None
        self.messages_in = self.messages_out = 0
        self.bytes_in = self.bytes_out = 0
        self._dropped = 0  # frames taken from the outbox but never written

    # -- control, called from other tasks ------------------------------------

    def drain(self) -> None:
        """Shut down gracefully: read no more, flush the outbox, close with 1001.

        The router closes the outbox once it has delivered what it accepted;
        the writer flushes it and :meth:`run` sends the close frame.
        """
        if self._close is None:
            self._close = (CloseCode.GOING_AWAY, "server shutting down", "server")
            self._stop_reading_now()

    def close_soon(self, code: int, reason: str) -> None:
        """Close now for a policy reason, dropping what the outbox still holds."""
        if self._close is not None and self._stop_writing:
            return
        self._close = (code, reason, "server")
        self._stop_writing = True
        self._stop_reading_now()
        self._router.unregister(self.peer)
        self._finish_writing_by(trio.current_time() + CLOSE_TIMEOUT_S)

    def _stop_reading_now(self) -> None:
        # The reader checks the flag between reads; the scope ends a wait.
        self._stop_reading = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    def _finish_writing_by(self, deadline: float) -> None:
        self._io_deadline = deadline
        if self._io is not None:
            self._io.cancel_scope.deadline = deadline

    # -- the connection's life -------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until either side closes it, then log the close.

        Raises:
            Exception: only on a bug; the caller logs it and closes with 1011.
        """
        fields, self._open_fields = self._open_fields, None  # needed once
        self._log.info("connection.open", **(fields or {}))
        try:
            peer = self.peer
            if not self._echo:  # the echo route has no id to announce, and is not routable
                try:
                    await self._write([text_frame(welcome_payload(peer.dialect, peer.client_id))])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                try:
                    self._router.register(peer)
                except RouterClosed:
                    # Accepted just as the server began draining: nothing will be
                    # routed here, so there is nothing to flush.
                    self.drain()
                    peer.outbox.close()
            async with trio.open_nursery() as io:
                self._io = io
                io.cancel_scope.deadline = self._io_deadline
                if peer.outbox.has_frames():
                    self._start_writer()
                await self._read_loop()
                if self._close is None or self._close[2] == "client" or self._parser_failed:
                    # Nobody left to write to: drop what is queued and let a
                    # write in progress finish, briefly.
                    self._stop_writing = True
                    self._router.unregister(peer)
                    self._finish_writing_by(trio.current_time() + CLOSE_TIMEOUT_S)
                elif not self._stop_writing:
                    # Draining: a writer stays until the router has delivered what
                    # it accepted and closed the outbox, and writes all of it.
                    self._flushing = True
                    self._start_writer()
            await self._closing_handshake()
        except Exception:
            # The caller's boundary logs the error and sends this close code;
            # the close event must already say so.
            self._close = (CloseCode.INTERNAL_ERROR, "internal error", "server")
            raise
        finally:
            self._router.unregister(self.peer)
            self._log_close()

    async def _read_loop(self) -> None:
        receive = self._transport.stream.receive_some
        early, self._early = self._early, b""
        if early and not await self._handle(early):
            return
        while not self._stop_reading:
            # One cancel scope for a stretch of reads: its deadline is the next
            # timer while the reader waits for the socket, and off while it
            # handles what it read (a timer must not cut a hand-off to the
            # router short). A timer, or a stop, ends the stretch.
            with trio.CancelScope() as scope:
                self._receive_scope = scope
                while True:
                    scope.deadline = self._timer_deadline()
                    self._waiting_for_socket = True
                    try:
                        data = await receive(RECEIVE_BYTES)
                    except trio.BrokenResourceError:  # reset by the client
                        data = b""
                    finally:
                        self._waiting_for_socket = False
                    scope.deadline = math.inf
                    if not data:
                        return  # no close frame: logged as 1006
                    if not await self._handle(data):
                        return
            self._receive_scope = None
            if self._stop_reading or not self._timers():
                return

    async def _handle(self, data: bytes | bytearray) -> bool:
        """Parse one read and route what it held; False once the connection ends."""
        self.bytes_in += len(data)
        violation: ProtocolError | None = None
        parser = self._parser
        try:
            events = parser.feed(data, self._pacer.allowance(trio.current_time(), parser.frames))
        except ProtocolError as exc:
            events, violation = exc.parsed, exc
        batch: list[Inbound] = []
        ended = self._take(events, batch)
        if batch:
            try:
                if not await self._route(batch):
                    return False
            except RouterClosed:
                self.drain()
                return False
        if violation is not None and not ended:
            self._protocol_violation(violation)
            return False
        return not ended

    async def _route(self, items: list[Inbound]) -> bool:
        """Hand ``items`` to the router with a reply slot each, in chunks the outbox can hold.

        Waits (reading nothing more from the client) while the client has not
        read enough of its replies to make room; for ``slow_consumer_timeout_s``
        at most, after which the connection closes with 1013.

        Returns:
            False if the connection is closing as a slow consumer.

        Raises:
            RouterClosed: the router is shutting down.
        """
        outbox = self.peer.outbox
        chunk = self._reply_slots
        for start in range(0, len(items), chunk):
            part = items if len(items) <= chunk else items[start : start + chunk]
            if not outbox.reserve(len(part)):
                with trio.move_on_after(self._slow_consumer_timeout_s) as waiting:
                    await outbox.wait_for_room(len(part))
                if waiting.cancelled_caught:
                    self._stuck()
                    return False
            await self._router.route(part)
        return True

    def _take(self, events: list[tuple[int, bytes]], batch: list[Inbound]) -> bool:
        """Turn one read's frames into router items; True if the connection ends here."""
        now = trio.current_time()
        for opcode, payload in events:
            if opcode <= OP_BINARY:
                self._last_activity = now
                if not self._message(opcode, payload, now, batch):
                    return True
            elif opcode == OP_PING:
                self.peer.outbox.control(encode_frame(OP_PONG, payload))
            elif opcode == OP_PONG:
                self._pong_deadline = math.inf
            else:
                code, reason = parse_close(payload)
                self._client_closed = True
                if self._close is None:
                    self._close = (code, reason, "client")
                return True
        return False

    def _message(self, opcode: int, payload: bytes, now: float, batch: list[Inbound]) -> bool:
        """Judge one message and add what it becomes to ``batch``; False to stop reading."""
        live = self._live
        limits = live.current
        if self._limiter_limits is not limits:  # reloaded: the new rate starts now
            self._limiter_limits = limits
            self._limiter = RateLimiter(limits.messages_per_second, limits.message_burst, now)
        self.messages_in += 1
        size = len(payload)
        verdict = self._limiter.check(now)
        peer = self.peer
        error: EnvelopeError | None = None
        if verdict is Verdict.CLOSE:
            self._limit_exceeded("messages_per_second", "close")
            self.close_soon(CloseCode.POLICY, "rate limit exceeded")
            return False
        if verdict is Verdict.REFUSE:
            error = EnvelopeError(ErrorCode.RATE_LIMITED, _RATE_DETAIL)
        elif size > limits.max_message_bytes:
            error = EnvelopeError(ErrorCode.MESSAGE_TOO_LARGE, _too_large(limits.max_message_bytes))
        elif self._echo:
            self._stats.messages["echoed"] += 1
            batch.append(Reply(peer, encode_frame(opcode, payload)))
            return True
        elif opcode != OP_TEXT:
            error = EnvelopeError(ErrorCode.UNSUPPORTED_DATA, _BINARY_DETAIL)
        else:
            try:
                batch.append(Relay(peer, decode_envelope(payload), size, now))
            except EnvelopeError as exc:
                error = exc
            else:
                return True
        stats = self._stats
        stats.messages[error.code.value] += 1
        stats.errors[error.code.value] += 1
        if self._live.log_messages:
            self._log_refusal(size, error)
        frame = text_frame(error_payload(peer.dialect, error.code, error.detail, error.ref))
        batch.append(Reply(peer, frame))
        return True

    def _protocol_violation(self, error: ProtocolError) -> None:
        self._parser_failed = True
        if error.code == CloseCode.TOO_BIG:
            self._limit_exceeded("max_message_bytes", "close")
        elif error.code == CloseCode.POLICY:  # the parser's only 1008: frame pacing
            self._limit_exceeded("frames_per_second", "close")
        if self._close is None or self._close[2] != "server":
            self._close = (error.code, error.reason, "server")

    # -- the timers, kept by the reader ----------------------------------------

    def _timer_deadline(self) -> float:
        """When the reader must stop waiting for the socket to see to a timer."""
        idle = self._live.current.idle_timeout_s or math.inf
        return min(
            self._next_ping, self._last_activity + idle, self._pong_deadline, self._stuck_deadline
        )

    def _timers(self) -> bool:
        """See to the timers that are due; False if the connection closes for one."""
        now = trio.current_time()
        limits = self._live.current
        if now >= self._stuck_deadline:
            self._stuck()
            return False
        if now >= self._pong_deadline:
            self._limit_exceeded("pong_timeout_s", "close")
            self.close_soon(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
            return False
        if now >= self._last_activity + (limits.idle_timeout_s or math.inf):
            self.close_soon(CloseCode.NORMAL, "idle timeout")
            return False
        if now >= self._next_ping:
            self._next_ping = now + (limits.ping_interval_s or math.inf)
            if self._pong_deadline == math.inf:
                self._pong_deadline = now + limits.pong_timeout_s
            self.peer.outbox.control(_PING)
        return True

    # -- the writer ------------------------------------------------------------

    def _start_writer(self) -> None:
        # The outbox calls this when frames arrive and no writer waits for them.
        if not self._writer_running and self._io is not None:
            self._writer_running = True
            self._io.start_soon(self._write_loop)

    async def _write_loop(self) -> None:
        outbox = self.peer.outbox
        try:
            while True:
                # One cancel scope for a stretch of writes: its deadline is
                # WRITER_IDLE_S away while the writer waits for frames, and
                # none while it writes them (a write that does not finish is
                # for the slow-consumer timer, which the reader keeps).
                late: list[bytes] | None = []
                with trio.CancelScope() as scope:
                    late = await self._write_until_done(outbox, scope)
                    if late is None:
                        return
                # The idle deadline passed just as frames woke the writer: the
                # scope is cancelled, so they are written out here (inside, the
                # write's first checkpoint would raise and drop them: Autobahn
                # case 5.19, a ping one second after the last).
                if late and not await self._send(late):
                    return
                if not (self._flushing or outbox.has_frames()):
                    return  # idle: the next frame starts a writer again
        finally:
            self._writer_running = False

    async def _write_until_done(
        self, outbox: Outbox, scope: trio.CancelScope
    ) -> list[bytes] | None:
        """Write what the outbox gets until it is closed and empty, or writing stops.

        Returns:
            None when done; frames taken after ``scope``'s idle deadline
            passed, for the caller to write outside it.
        """
        while True:
            scope.deadline = math.inf if self._flushing else trio.current_time() + WRITER_IDLE_S
            frames = await outbox.take()
            if not frames:  # the outbox is closed and empty
                return None
            if self._stop_writing:
                self._dropped += _messages_in(frames)
                return None
            if scope.cancel_called:
                return frames
            scope.deadline = math.inf
            if not await self._send(frames):
                return None

    async def _send(self, frames: list[bytes]) -> bool:
        """Write ``frames``; False once the client is gone."""
        try:
            await self._write(frames)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The client is gone. The reader may be waiting for it to make
            # room rather than reading; it has nothing to do either.
            self._stop_reading_now()
            return False
        return True

    async def _write(self, frames: list[bytes]) -> None:
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        messages = _messages_in(frames)
        try:
            await self._transport.send_all(data)
        except BaseException:
            # Not known to have reached the client: counted as undelivered.
            self._dropped += messages
            raise
        if messages:
            self._last_activity = trio.current_time()
            self.messages_out += messages
        self.bytes_out += len(data)

    def _stuck(self) -> None:
        if self._stop_writing:  # closing already, for another reason
            return
        self._limit_exceeded("slow_consumer_timeout_s", "close")
        self.close_soon(CloseCode.TRY_AGAIN_LATER, "slow consumer: outbox stayed full")

    def _set_stuck_deadline(self, deadline: float) -> None:
        # Called by the outbox when the router finds it full (or when the
        # writer takes from it again); the router must not wait, so this only
        # moves the reader's alarm (while it waits for the socket; otherwise it
        # reads the deadline when it next waits). The reader then closes with
        # 1013, and the write in progress has CLOSE_TIMEOUT_S to finish, so the
        # close frame can follow it.
        self._stuck_deadline = deadline
        scope = self._receive_scope
        if self._waiting_for_socket and scope is not None and deadline < scope.deadline:
            scope.deadline = deadline

    # -- the end ---------------------------------------------------------------

    async def _closing_handshake(self) -> None:
        """Send the close frame this end owes, and for a close relayd began, await the client's."""
        if self._close is None:
            return  # the client vanished without a close frame
        code, reason, closed_by = self._close
        transport = self._transport
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            if closed_by == "client":
                # Echo the client's code (RFC 6455 §5.5.1); a close without
                # one is answered without one.
                self.bytes_out += await transport.send_close(None if code == NO_STATUS else code)
                return
            sent = await transport.send_close(code, reason)
            self.bytes_out += sent
            if sent and not (self._parser_failed or self._client_closed):
                await self._await_client_close()

    async def _await_client_close(self) -> None:
        # After relayd's close frame, the client's messages are not read
        # (RFC 6455 §1.4); only its close frame, or the end of the stream.
        receive = self._transport.stream.receive_some
        while True:
            try:
                data = await receive(RECEIVE_BYTES)
                self.bytes_in += len(data)
                parser = self._parser
                allowance = self._pacer.allowance(trio.current_time(), parser.frames)
                events = parser.feed(data, allowance) if data else [(OP_CLOSE, b"")]
            except (trio.BrokenResourceError, ProtocolError):
                return
            if any(opcode == OP_CLOSE for opcode, _ in events):
                return

    # -- logs ------------------------------------------------------------------

    def _limit_exceeded(self, limit: str, action: str) -> None:
        self._log.warning(
            "limit.exceeded",
            conn=self.peer.conn,
            id=self.peer.client_id,
            limit=limit,
            action=action,
        )

    def _log_refusal(self, size: int, error: EnvelopeError) -> None:
        self._log.info(
            "message.relay",
            **{"from": self.peer.client_id, "to": None, "bytes": size, "outcome": error.code.value},
        )

    def _log_close(self) -> None:
        if self._close is None:
            code, reason, closed_by = int(CloseCode.ABNORMAL), "", "client"
        else:
            code, reason, closed_by = self._close
            code = int(code)  # a CloseCode member logs as its name otherwise
        stats = self._stats
        stats.closes[code] += 1
        stats.bytes_received += self.bytes_in
        stats.bytes_sent += self.bytes_out
        self._log.info(
            "connection.close",
            conn=self.peer.conn,
            id=self.peer.client_id,
            code=code,
            reason=reason,
            closed_by=closed_by,
            duration_s=round(trio.current_time() - self._started, 3),
            messages_in=self.messages_in,
            messages_out=self.messages_out,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            undelivered=len(self.peer.outbox) + self._dropped + self.peer.outbox.replies_dropped,
        )


def _messages_in(frames: list[bytes]) -> int:
    """How many of the writer's ``frames`` are messages, not control frames."""
    messages = len(frames)
    for frame in frames:  # control frames only ever lead the list
        if not frame[0] & OP_CLOSE:  # the opcode bit every control frame has
            break
        messages -= 1
    return messages


_RATE_DETAIL: Final = "too many messages; slow down"
_BINARY_DETAIL: Final = "binary frames are not supported; send JSON text frames"


def _too_large(limit: int) -> str:
    return f"message is larger than {limit} bytes"

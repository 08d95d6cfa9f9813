"""One accepted WebSocket connection: its reader, writer, timers and log events.

Data path through here: the reader takes client frames off the socket, checks
them against the connection's limits and hands them to the router; the writer
drains the connection's outbox (filled by the router) to the socket.

Task layout, all owned by :meth:`Connection.run`::

    run
    ├── timers        keepalive pings, idle timeout, slow-consumer deadline
    │   └── ping      one per keepalive round, bounded by pong_timeout_s
    └── io
        ├── writer    outbox -> socket
        └── reader    socket -> router   (runs in run's own task)

Who closes:

* the client (close frame, or the TCP connection dropping): the reader ends,
  the connection leaves the routing table, the writer ends.
* relayd, for policy (1008 abuse, 1013 slow consumer, 1000 idle, 1011 no
  pong): :meth:`Connection.close_soon` stops the reader and lets the writer
  finish the frame it is writing, within :data:`CLOSE_TIMEOUT_S`; then relayd
  sends the close frame and waits up to :data:`CLOSE_TIMEOUT_S` more for the
  client's; after that the transport is dropped.
* relayd, shutting down: :meth:`Connection.drain` stops the reader only; the
  router delivers what it already accepted and then closes the outbox, the
  writer flushes it and the connection closes with 1001. The server bounds the
  whole drain with ``shutdown_grace_s``.

Error handling: :meth:`Connection.run` raises only what is a bug in relayd or
its libraries; the listener catches that at the connection boundary, logs it
and closes with 1011 (:mod:`relayd.listener`).
"""

from __future__ import annotations

import math
from typing import Final

import structlog
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from relayd.errors import CloseCode, EnvelopeError, ErrorCode
from relayd.live import LiveLimits
from relayd.metrics import Stats
from relayd.outbox import Frame, Outbox
from relayd.protocol import Dialect, decode_envelope, error_frame, welcome_frame
from relayd.ratelimit import RateLimiter, Verdict
from relayd.router import Peer, Relay, Reply, Router, RouterClosed

__all__ = ["CLOSE_TIMEOUT_S", "Connection"]

#: How long relayd waits to finish a frame and complete a closing handshake it
#: started before dropping the transport. A peer that is still reading answers
#: in milliseconds; one that is not would hold the connection forever.
CLOSE_TIMEOUT_S: Final = 5.0

#: trio-websocket's own reason text when a frame exceeds max_message_size; it
#: sends the 1009 close itself, so this is how relayd learns it was the closer.
_TOO_BIG_PREFIX: Final = "Exceeded maximum message size"
#: Protocol error (1002) and invalid frame payload data (1007).
_PROTOCOL_ERRORS: Final = frozenset({1002, 1007})


def _utf8_len(text: str) -> int:
    # isascii() is O(1) on CPython's compact strings, so the common case costs
    # no encoding.
    return len(text) if text.isascii() else len(text.encode())


class Connection:
    """One client's connection, from the welcome frame to the close frame.

    Args:
        ws: the accepted WebSocket; this object closes it.
        conn: the connection's number in this process, for logs.
        client_id: the id the client is addressed by.
        dialect: the dialect chosen at the handshake.
        echo: serve the diagnostic echo route: no id, not routable, every
            message comes back to its sender through the router and writer.
        router: where messages go.
        limits: the limits in force, read at each use (a reload may replace them).
        log: a logger already bound with nothing connection-specific.
        log_messages: log a ``message.relay`` event for each message refused
            here (the router logs the ones it routes).
        stats: the counters to add to (refusals, closes, bytes).
        peer_address: ``host:port`` of the client, for logs.
        origin: the ``Origin`` header, if any, for logs.
        user_agent: the ``User-Agent`` header, if any, for logs.
    """

    def __init__(
        self,
        ws: WebSocketConnection,
        *,
        conn: int,
        client_id: str,
        dialect: Dialect,
        echo: bool = False,
        router: Router,
        limits: LiveLimits,
        log: structlog.typing.FilteringBoundLogger,
        log_messages: bool = True,
        stats: Stats,
        peer_address: str,
        origin: str | None = None,
        user_agent: str | None = None,
    ) -> None:
        self._ws = ws
        self._router = router
        self._live = limits
        self._log = log
        self._log_messages = log_messages
        self._stats = stats
        self._echo = echo
        self._open_fields = {
            "conn": conn,
            "id": client_id,
            "peer": peer_address,
            "origin": origin,
            "dialect": "echo" if echo else dialect.value,
            "user_agent": user_agent,
        }
        self.peer = Peer(
            client_id=client_id,
            dialect=dialect,
            outbox=Outbox(
                limits.current.outbox_messages,
                limits.current.slow_consumer_timeout_s,
                self._set_stuck_deadline,
            ),
            conn=conn,
        )
        self._reader_scope = trio.CancelScope()
        self._io_scope = trio.CancelScope()
        self._timer_scope: trio.CancelScope | None = None
        self._stuck_deadline = math.inf
        self._last_activity = trio.current_time()
        self._started = self._last_activity
        self._stop_writing = False
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
            self._reader_scope.cancel()

    def close_soon(self, code: CloseCode, reason: str) -> None:
        """Close now for a policy reason, dropping what the outbox still holds."""
        if self._close is not None and self._stop_writing:
            return
        self._close = (code, reason, "server")
        self._stop_writing = True
        self._reader_scope.cancel()
        self._router.unregister(self.peer)
        self._io_scope.deadline = trio.current_time() + CLOSE_TIMEOUT_S

    # -- the connection's life -------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until either side closes it, then log the close.

        Raises:
            Exception: only on a bug; the caller logs it and closes with 1011.
        """
        self._log.info("connection.open", **self._open_fields)
        try:
            await self._serve()
        except Exception:
            # The caller's boundary logs the error and sends this close code;
            # the close event must already say so.
            self._close = (CloseCode.INTERNAL_ERROR, "internal error", "server")
            raise
        finally:
            self._router.unregister(self.peer)
            self._log_close()

    async def _serve(self) -> None:
        try:
            if not self._echo:
                await self._send(welcome_frame(self.peer.dialect, self.peer.client_id))
                self._router.register(self.peer)
        except ConnectionClosed:
            return
        except RouterClosed:
            # Accepted just as the server began draining: nothing will be
            # routed here, so there is nothing to flush.
            self.drain()
            self.peer.outbox.close()
        async with trio.open_nursery() as timers:
            timers.start_soon(self._timers, timers)
            with self._io_scope:
                async with trio.open_nursery() as io:
                    io.start_soon(self._write_loop)
                    await self._read_loop()
                    if self._close is None:
                        self._router.unregister(self.peer)
            timers.cancel_scope.cancel()
        if self._close is not None and self._ws.closed is None:
            code, reason, _ = self._close
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await self._ws.aclose(code, reason)

    async def _read_loop(self) -> None:
        live = self._live
        limits = live.current
        limiter = RateLimiter(limits.messages_per_second, limits.message_burst, self._started)
        peer, dialect = self.peer, self.peer.dialect
        with self._reader_scope:
            while True:
                try:
                    data = await self._ws.get_message()
                except ConnectionClosed:
                    return
                now = self._last_activity = trio.current_time()
                if live.current is not limits:  # reloaded: the new rate starts now
                    limits = live.current
                    limiter = RateLimiter(limits.messages_per_second, limits.message_burst, now)
                max_bytes = limits.max_message_bytes
                self.messages_in += 1
                size = len(data) if isinstance(data, bytes) else _utf8_len(data)
                self.bytes_in += size
                verdict = limiter.check(now)
                error: EnvelopeError | None = None
                echo: Reply | None = None
                if verdict is Verdict.CLOSE:
                    self._limit_exceeded("messages_per_second", "close")
                    self.close_soon(CloseCode.POLICY, "rate limit exceeded")
                    return
                if verdict is Verdict.REFUSE:
                    error = EnvelopeError(ErrorCode.RATE_LIMITED, _RATE_DETAIL)
                elif size > max_bytes:
                    error = EnvelopeError(ErrorCode.MESSAGE_TOO_LARGE, _too_large(max_bytes))
                elif self._echo:
                    echo = Reply(peer, data)
                elif isinstance(data, bytes):
                    error = EnvelopeError(ErrorCode.UNSUPPORTED_DATA, _BINARY_DETAIL)
                else:
                    try:
                        envelope = decode_envelope(data)
                    except EnvelopeError as exc:
                        error = exc
                try:
                    if echo is not None:
                        self._stats.messages["echoed"] += 1
                        await self._router.route(echo)
                    elif error is None:
                        await self._router.route(Relay(peer, envelope, size, now))
                    else:
                        self._stats.messages[error.code.value] += 1
                        self._stats.errors[error.code.value] += 1
                        if self._log_messages:
                            self._log_refusal(size, error)
                        frame = error_frame(dialect, error.code, error.detail, error.ref)
                        await self._router.route(Reply(peer, frame))
                except RouterClosed:
                    self.drain()
                    return

    async def _write_loop(self) -> None:
        outbox = self.peer.outbox
        try:
            async for frame in outbox.receive:
                if self._stop_writing:
                    self._dropped += 1
                    return
                outbox.relieve()
                await self._send(frame)
        except ConnectionClosed:
            return

    async def _send(self, frame: Frame) -> None:
        await self._ws.send_message(frame)
        self._last_activity = trio.current_time()
        self.messages_out += 1
        self.bytes_out += len(frame) if isinstance(frame, bytes) else _utf8_len(frame)

    async def _timers(self, nursery: trio.Nursery) -> None:
        next_ping = trio.current_time() + (self._live.current.ping_interval_s or math.inf)
        while True:
            limits = self._live.current
            interval = limits.ping_interval_s or math.inf
            idle = limits.idle_timeout_s or math.inf
            idle_deadline = self._last_activity + idle
            with trio.CancelScope(
                deadline=min(next_ping, idle_deadline, self._stuck_deadline)
            ) as self._timer_scope:
                await trio.sleep_forever()
            now = trio.current_time()
            if now >= self._stuck_deadline:
                self._limit_exceeded("slow_consumer_timeout_s", "close")
                self.close_soon(CloseCode.TRY_AGAIN_LATER, "slow consumer: outbox stayed full")
                return
            if now >= self._last_activity + idle:
                self.close_soon(CloseCode.NORMAL, "idle timeout")
                return
            if now >= next_ping:
                nursery.start_soon(self._ping)
                next_ping = now + interval

    async def _ping(self) -> None:
        with trio.move_on_after(self._live.current.pong_timeout_s) as waiting:
            try:
                await self._ws.ping()
            except ConnectionClosed:
                return
        if waiting.cancelled_caught:
            self._limit_exceeded("pong_timeout_s", "close")
            self.close_soon(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")

    def _set_stuck_deadline(self, deadline: float) -> None:
        # Called by the outbox when the router finds it full (or free again);
        # the router must not wait, so this only moves the timers' alarm.
        self._stuck_deadline = deadline
        if self._timer_scope is not None and deadline < self._timer_scope.deadline:
            self._timer_scope.deadline = deadline

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
        closed = self._ws.closed
        if self._close is not None:
            code, reason, closed_by = self._close
        elif closed is None:
            code, reason, closed_by = CloseCode.ABNORMAL, "", "server"
        elif closed.code == CloseCode.TOO_BIG and (closed.reason or "").startswith(_TOO_BIG_PREFIX):
            self._limit_exceeded("max_message_bytes", "close")
            code, reason, closed_by = closed.code, closed.reason or "", "server"
        elif closed.code in _PROTOCOL_ERRORS:
            # The server's frame parser detected it (a client that says so
            # itself is reporting the same thing).
            code, reason, closed_by = closed.code, closed.reason or "", "server"
        else:
            code, reason, closed_by = closed.code, closed.reason or "", "client"
        stats = self._stats
        stats.closes[int(code)] += 1
        stats.bytes_received += self.bytes_in
        stats.bytes_sent += self.bytes_out
        self._log.info(
            "connection.close",
            conn=self.peer.conn,
            id=self.peer.client_id,
            code=int(code),
            reason=reason,
            closed_by=closed_by,
            duration_s=round(trio.current_time() - self._started, 3),
            messages_in=self.messages_in,
            messages_out=self.messages_out,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            undelivered=len(self.peer.outbox) + self._dropped,
        )


_RATE_DETAIL: Final = "too many messages; slow down"
_BINARY_DETAIL: Final = "binary frames are not supported; send JSON text frames"


def _too_large(limit: int) -> str:
    return f"message is larger than {limit} bytes"

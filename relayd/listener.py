"""Accepted TCP streams to running connections: handshake, policy, and the connection boundary.

:class:`Gate` is the handler ``trio.serve_listeners`` calls once per accepted
stream, in the server's connections nursery. For each stream it:

1. counts the connection against the limits (:class:`~relayd.handshake.Capacity`);
2. reads the WebSocket request within ``handshake_timeout_s``;
3. accepts it in the chosen dialect, or refuses it with an HTTP status
   (:func:`~relayd.handshake.decide`), logging ``handshake.rejected``;
4. runs the :class:`~relayd.connection.Connection` until it ends.

Below trio-websocket sits a :class:`~relayd.transport.ServerStream`, which
holds frames sent with the request until the handshake is accepted and closes
the TCP connection gracefully.

**The connection boundary.** Nothing raised while serving one stream may reach
the shared nursery: that would cancel every other connection and the
listener. trio-websocket raises from places a handler does not expect (e.g.
``request.accept()`` raises ``ConnectionClosed`` when frames that came in the
same TCP segment as the handshake already broke a limit). So the whole
per-stream task is guarded: expected closes end quietly, anything else is
logged as ``error`` with its traceback and the client gets close code 1011;
the stream is always closed in ``finally``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import itertools
import secrets
from collections.abc import Callable, Collection
from typing import Final

import structlog
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from relayd.auth import Authenticator, Refusal, token_from
from relayd.config import LimitsSettings
from relayd.connection import CLOSE_TIMEOUT_S, Connection
from relayd.errors import CloseCode
from relayd.handshake import Accept, Capacity, Reject, decide
from relayd.live import LiveLimits
from relayd.metrics import Stats
from relayd.router import Router
from relayd.transport import ServerStream, http_response

__all__ = ["Gate", "new_client_id"]

#: trio-websocket's queue between its socket reader and our reader. One slot:
#: our reader takes each message at once, and every further queued message is
#: memory an attacker controls (max_message_bytes each).
_TRANSPORT_QUEUE: Final = 1
#: Bytes asked of the socket per read. 64 KiB lets one read take a burst of
#: small frames (trio-websocket's default is 4 KiB).
_RECEIVE_BYTES: Final = 65536
#: Bits of randomness in a client id: unguessable, so ids cannot be forged.
_ID_BYTES: Final = 16


def new_client_id() -> str:
    """A fresh, unguessable, URL-safe client id (128 random bits, 22 characters)."""
    return secrets.token_urlsafe(_ID_BYTES)


class Gate:
    """Turns accepted streams into connections, within the daemon's limits.

    Args:
        router: where connections register and send.
        limits: the limits in force.
        log: the daemon's logger.
        log_messages: whether connections log the messages they refuse.
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
        log_messages: bool = True,
        echo_route: bool = False,
        allowed_origins: Collection[str] = (),
        authenticator: Authenticator | None = None,
        stats: Stats | None = None,
        new_id: Callable[[], str] = new_client_id,
    ) -> None:
        self.stats = stats or Stats()
        self._allowed_origins = frozenset(allowed_origins)
        self._authenticator = authenticator
        self._log_messages = log_messages
        self._echo_route = echo_route
        self._router = router
        self.limits = LiveLimits(limits)
        self._log = log
        self._new_id = new_id
        self._numbers = itertools.count(1)
        self.capacity = Capacity(limits.max_connections, limits.max_connections_per_ip)
        self.connections: set[Connection] = set()
        self._reading: set[trio.CancelScope] = set()  # handshakes not yet read in full
        self.draining = False

    def reconfigure(
        self,
        limits: LimitsSettings,
        *,
        allowed_origins: Collection[str] = (),
        authenticator: Authenticator | None = None,
    ) -> None:
        """Apply reloadable settings to new handshakes and, where it makes sense, open ones.

        :mod:`relayd.live` lists which limits reach open connections.
        """
        self.limits.current = limits
        self.capacity.max_total = limits.max_connections
        self.capacity.max_per_ip = limits.max_connections_per_ip
        self._allowed_origins = frozenset(allowed_origins)
        self._authenticator = authenticator

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
        self.draining = True
        for waiting in self._reading:
            waiting.cancel()
        for connection in self.connections:
            connection.drain()

    async def __call__(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted stream to the end; never raises (but Cancelled)."""
        address = _peer_address(stream)
        if address is None:  # reset before it could be looked at: nobody to serve
            await trio.aclose_forcefully(stream)
            return
        server_stream = ServerStream(stream, self.limits.current.max_header_bytes)
        attempt = _Attempt(conn=next(self._numbers), address=address, ip=_ip_of(address))
        self.capacity.opened(attempt.ip)
        try:
            async with trio.open_nursery() as transport:
                try:
                    await self._serve(transport, server_stream, attempt)
                except* Exception as group:
                    await self._fail(attempt, group)
                transport.cancel_scope.cancel()
        except* Exception as group:
            # trio-websocket's own reader task, in `transport`, failed.
            await self._fail(attempt, group)
        finally:
            self.capacity.closed(attempt.ip)
            await server_stream.close_gracefully()

    async def _fail(self, attempt: _Attempt, group: BaseExceptionGroup[Exception]) -> None:
        leaf = _first_leaf(group)
        self._log.error(
            "error",
            conn=attempt.conn,
            peer=attempt.address,
            summary=f"{type(leaf).__name__}: {leaf}",
            exc_info=group,
        )
        ws = attempt.ws
        if ws is not None and ws.closed is None:
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await ws.aclose(CloseCode.INTERNAL_ERROR, "internal error")

    async def _serve(
        self, transport: trio.Nursery, server_stream: ServerStream, attempt: _Attempt
    ) -> None:
        conn, address = attempt.conn, attempt.address
        request = await self._read_request(transport, server_stream, conn, address)
        if request is None:
            return
        headers = _headers(request)
        decision: Accept | Reject = decide(
            draining=self.draining,
            capacity=self.capacity,
            client_ip=attempt.ip,
            offered_subprotocols=request.proposed_subprotocols,
            path=request.path,
            echo_route=self._echo_route,
            origin=headers.get("origin"),
            allowed_origins=self._allowed_origins,
        )
        client_id = None
        if isinstance(decision, Accept) and self._authenticator is not None:
            identity = self._authenticator.authenticate(token_from(headers, request.path))
            if isinstance(identity, Refusal):
                decision = Reject(identity.status, identity.reason)
            else:
                client_id = identity.subject
        if not isinstance(decision, Accept):
            self._rejected(conn, address, decision.status, decision.reason)
            # A client that resets while being refused is not an error.
            with trio.move_on_after(CLOSE_TIMEOUT_S), contextlib.suppress(ConnectionClosed):
                await request.reject(decision.status, body=decision.reason.encode())
            return
        try:
            attempt.ws = server_stream.ws = await request.accept(subprotocol=decision.subprotocol)
            server_stream.open()
        except ConnectionClosed:
            # The client's first frames, sent along with its request, already
            # broke a limit and trio-websocket closed the connection.
            self._rejected(conn, address, None, "connection closed during the handshake")
            return
        connection = Connection(
            attempt.ws,
            conn=conn,
            client_id=client_id or self._new_id(),
            dialect=decision.dialect,
            echo=decision.echo,
            router=self._router,
            limits=self.limits,
            log=self._log,
            log_messages=self._log_messages,
            stats=self.stats,
            peer_address=address,
            origin=headers.get("origin"),
            user_agent=headers.get("user-agent"),
        )
        self.connections.add(connection)
        self.stats.connections_total += 1
        try:
            if self.draining:
                connection.drain()
            await connection.run()
        finally:
            self.connections.discard(connection)

    async def _read_request(
        self, transport: trio.Nursery, stream: ServerStream, conn: int, address: str
    ) -> WebSocketRequest | None:
        with trio.move_on_after(self.limits.current.handshake_timeout_s) as waiting:
            # trio-websocket answers a request it cannot parse by itself (400,
            # or 426 for another WebSocket version) and closes the stream
            # without ever producing a request: stop waiting when it does.
            # drain() stops the wait too.
            stream.on_close = waiting.cancel
            self._reading.add(waiting)
            try:
                return await wrap_server_stream(
                    transport,
                    stream,
                    message_queue_size=_TRANSPORT_QUEUE,
                    max_message_size=self.limits.current.max_message_bytes,
                    receive_buffer_size=_RECEIVE_BYTES,
                )
            finally:
                self._reading.discard(waiting)
        if stream.response_status is not None:
            status, reason = stream.response_status, stream.refusal or "malformed WebSocket request"
        elif stream.refusal is not None:  # the client went away: nobody to answer
            self._gone(conn, address, stream.refusal)
            return None
        else:
            if self.draining:
                status, reason = 503, "server shutting down"
            else:
                status, reason = 408, "no complete request within handshake_timeout_s"
            with (
                trio.move_on_after(CLOSE_TIMEOUT_S),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await stream.send_all(http_response(status, reason))
        self._rejected(conn, address, status, reason)
        return None

    def _gone(self, conn: int, address: str, reason: str) -> None:
        # Port probes and health checks do this all day: count it, log it
        # at debug level only.
        self.stats.rejected[0] += 1
        self._log.debug("handshake.rejected", conn=conn, peer=address, status=None, reason=reason)

    def _rejected(self, conn: int, address: str, status: int | None, reason: str) -> None:
        self.stats.rejected[status or 0] += 1
        self._log.info("handshake.rejected", conn=conn, peer=address, status=status, reason=reason)


@dataclasses.dataclass(slots=True)
class _Attempt:
    """One accepted stream, as the boundary needs to know it."""

    conn: int
    address: str
    ip: str
    ws: WebSocketConnection | None = None


def _first_leaf(error: BaseException) -> BaseException:
    # Nurseries wrap errors in groups, possibly nested; the log names the
    # first real exception, and the traceback shows the whole group.
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _peer_address(stream: trio.abc.Stream) -> str | None:
    """``host:port`` of the client (``[v6]:port``), or None if it already reset."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    # In-memory streams (tests) have no socket; they all count as one address.
    if not isinstance(stream, trio.SocketStream):
        return "memory:0"
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return None
    # A dual-stack socket (relayd.socket's BindIPv6Only=both) shows IPv4
    # clients as ::ffff:a.b.c.d; name them as themselves, for logs and limits.
    mapped = ipaddress.ip_address(host.split("%", 1)[0]) if ":" in host else None
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
        host = str(mapped.ipv4_mapped)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ip_of(address: str) -> str:
    return address.rpartition(":")[0].strip("[]")


def _headers(request: WebSocketRequest) -> dict[str, str]:
    return {
        name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers
    }

"""A connection to relayd opened: TCP, TLS, the WebSocket upgrade and the welcome.

:func:`open_stream` makes the TCP connection (and for ``wss://`` the TLS
session, so that a bad certificate is reported as such); :func:`handshake`
then has trio-websocket send the upgrade request and waits for relayd's
welcome, the frame that carries the client's id. Each way this can fail is a
:class:`~relayd.client.errors.ConnectError` of its own, with a message that
says what the client saw and, where it is likely, what to try instead
(``wss://`` for ``ws://``, the seed dialect for ``relayd.v1``).
:func:`relayd.client.link.run_link` calls both, then runs the connection.
"""

from __future__ import annotations

import re
import ssl
from typing import Final, cast

import trio
from trio_websocket import ConnectionClosed as WebSocketClosed
from trio_websocket import WebSocketConnection, wrap_client_stream

from relayd.client.endpoint import Endpoint
from relayd.client.errors import ConnectError, ConnectTimeout, HandshakeRefused, TLSError
from relayd.client.messages import welcome_id
from relayd.client.options import MAX_MESSAGE_CHARS, LinkOptions
from relayd.wire.dialects import V1_SUBPROTOCOL, Dialect

__all__ = ["Stream", "handshake", "open_stream"]

#: OpenSSL's reasons for a TLS record that is not one: what a TLS client reads
#: when the server answers in plain text (relayd's 400 to a ClientHello).
_PLAIN_TEXT_REASONS: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"}
)


#: What the ssl module raises for a connection closed during the TLS handshake: SSLEOFError,
#: or, before Python 3.11.3 (Debian bookworm's python3 is 3.11.2), SSLZeroReturnError.
_EOF: Final = (ssl.SSLEOFError, ssl.SSLZeroReturnError)


#: The status line of an HTTP answer, as far as its status code.
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])[ \r]")


Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


async def open_stream(endpoint: Endpoint, ssl_context: ssl.SSLContext | None) -> Stream:
    """TCP, and for ``wss://`` a verified TLS session, before any WebSocket byte.

    The TLS handshake is done here so that a bad certificate is reported as
    such: inside trio-websocket it would only be a stall.

    Raises:
        ConnectError: no TCP connection; the message has each address's reason.
        TLSError: the TLS handshake failed.
    """
    url = endpoint.url
    try:
        tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    except OSError as exc:
        # trio's "all attempts to connect failed" holds each address's reason.
        causes = exc.__cause__.exceptions if isinstance(exc.__cause__, ExceptionGroup) else [exc]
        raise ConnectError(url, f"cannot connect to {url}: {'; '.join(map(str, causes))}") from exc
    if not endpoint.tls:
        return tcp
    context = ssl_context if ssl_context is not None else ssl.create_default_context()
    tls = trio.SSLStream(tcp, context, server_hostname=endpoint.host, https_compatible=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        cause = exc.__cause__
        # Closed or reset mid-handshake (a server shedding handshakes, or restarting)
        # may pass; what OpenSSL itself refused will not.
        transient = isinstance(cause, _EOF) or not isinstance(cause, ssl.SSLError)
        raise TLSError(url, _tls_failure(endpoint, cause), retryable=transient) from cause
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return tls


def _tls_failure(endpoint: Endpoint, cause: BaseException | None) -> str:
    text = f"TLS handshake with {endpoint.url} failed: {cause or 'the connection closed'}"
    if isinstance(cause, ssl.SSLError) and cause.reason in _PLAIN_TEXT_REASONS:
        plain = f"ws://{endpoint.host_header}{endpoint.resource}"
        text += f" (the server answered in plain text: it may speak {plain}, not wss://)"
    return text


async def handshake(
    nursery: trio.Nursery,
    stream: Stream,
    endpoint: Endpoint,
    options: LinkOptions,
    deadline: float,
) -> tuple[WebSocketConnection, str] | ConnectError:
    """The upgrade and the welcome, by ``deadline``: the connection and the id, or why not.

    trio-websocket's reader task runs in ``nursery``, which must outlive the
    connection.
    """
    url = endpoint.url
    watched = _Watched(stream)
    upgraded: tuple[WebSocketConnection, str | bytes] | ConnectError | None = None
    with trio.move_on_at(deadline) as waiting:
        async with trio.open_nursery() as racing:
            racing.start_soon(_cancel_when_set, watched.ended, racing.cancel_scope)
            upgraded = await _upgrade(nursery, watched, endpoint, options)
            racing.cancel_scope.cancel()
    if isinstance(upgraded, ConnectError):
        return upgraded
    if upgraded is None and watched.ended.is_set():
        if watched.heard:
            # It answered, then closed before the upgrade was done: relayd never does
            # (its refusals have a length), trio-websocket would wait for the rest.
            status = _STATUS_LINE.match(watched.heard)
            if status is not None:
                # An HTTP answer whose body ends at the close (HTTP/1.0, as older
                # proxies send their 502 or 503): a refusal, retryable as its status says.
                return HandshakeRefused(url, int(status[1]), "")
            answer = bytes(watched.heard[:80])
            why = f"{url} closed the connection in the middle of the WebSocket handshake"
            return ConnectError(url, f"{why}, after {answer!r}", retryable=False)
        # What relayd does with a handshake over its limits, and the kernel with one
        # in a restarting relayd's backlog (retryable, then), but also what a TLS
        # server does with a plain request: the message names both.
        why = f"{url} closed the connection without answering the WebSocket handshake"
        why += " (relayd at its handshake limit, or restarting"
        if not endpoint.tls:
            why += f"; or it speaks wss://{endpoint.host_header}{endpoint.resource}, not ws://"
        return ConnectError(url, why + ")")
    if upgraded is None or waiting.cancelled_caught:
        timeout = options.connect_timeout
        return ConnectTimeout(url, f"no WebSocket handshake with {url} within {timeout:g} s")
    ws, first = upgraded
    if options.dialect is Dialect.V1 and ws.subprotocol != V1_SUBPROTOCOL:
        return ConnectError(
            url, f"{url} does not speak {V1_SUBPROTOCOL}; try the seed dialect", retryable=False
        )
    client_id = welcome_id(options.dialect, first)
    if client_id is None:
        return ConnectError(url, f"{url} sent {first!r} where relayd sends the id", retryable=False)
    return ws, client_id


async def _upgrade(
    nursery: trio.Nursery, stream: _Watched, endpoint: Endpoint, options: LinkOptions
) -> tuple[WebSocketConnection, str | bytes] | ConnectError:
    """The WebSocket upgrade on ``stream`` and the first frame, or why it closed before one."""
    headers = []
    if options.token is not None:
        headers.append((b"Authorization", f"Bearer {options.token}".encode()))
    ws = await wrap_client_stream(
        nursery,
        # trio-websocket uses only the trio.abc.Stream methods of what it wraps (its
        # annotation is narrower than that).
        cast(trio.SocketStream, stream),
        endpoint.host_header,
        endpoint.resource,
        subprotocols=[V1_SUBPROTOCOL] if options.dialect is Dialect.V1 else [],
        extra_headers=headers,
        message_queue_size=0,
        # Raised to relayd's announced limit, when it is larger and the program set none,
        # once the answer is in (relayd.client.link.Link).
        max_message_size=options.max_message_chars or MAX_MESSAGE_CHARS,
    )
    try:
        return ws, await ws.get_message()
    except WebSocketClosed as exc:
        reason = exc.reason.reason if exc.reason is not None else None
        why = f"{endpoint.url} closed the connection before sending an id: {reason or 'no reason'}"
        return ConnectError(endpoint.url, why)


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class _Watched(trio.abc.Stream):
    """A connection's stream that notices a server closing it during the upgrade.

    trio-websocket waits for the answer to its upgrade request even after the
    server closed the connection (as a TLS server does when a plain request
    arrives, or a server that is not relayd after a partial answer), or reset it
    before the request could be written: :attr:`ended` is set when the stream
    ends or breaks, reading or writing, so that the wait can stop there,
    and :attr:`heard` keeps the first bytes that came back, to say what it was.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.ended = trio.Event()
        self.heard = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError:
            # Reset before the upgrade request went out (a server resetting what it
            # accepts, a listener closing with this connection in its backlog):
            # trio-websocket's reader then stops without reading, and would leave the
            # upgrade waiting for connect_timeout.
            self.ended.set()
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError:
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        elif len(self.heard) < 80:
            self.heard += data[:80]
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()

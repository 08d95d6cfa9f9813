"""The client's socket as the WebSocket layer sees it: gated, observed, closed gracefully.

:class:`ServerStream` wraps one accepted stream for trio-websocket and does the
three things relayd needs below the WebSocket layer.

**Holding early frames.**
RFC 6455 §4.1 says a client must wait for the server's handshake response
before sending frames, but nothing stops one from sending frames in the same
TCP segment as its request. wsproto discards bytes that arrive while a server
connection is still deciding (between the ``Request`` event and
``AcceptConnection``), and trio-websocket's reader task keeps reading during
that window, so such frames were lost or garbled depending on scheduling: a
close 1002 with a random "invalid opcode" one time, the frame honoured the
next. (anycorn made the same fix: hold the bytes until the handshake
resolves.)

:class:`ServerStream` passes bytes through up to and including the blank line
that ends the request head, then keeps the rest until :meth:`ServerStream.open`
is called after the 101 response has been sent. Frames sent early are then
decoded like any others, under the same limits: a 4 MiB first frame against a
64 KiB limit is answered with close 1009 every time. What is held is bounded
by one ``receive_some`` (the reader does not ask for more until the gate
opens).

**Bounding the request head.** A request head (request line and headers) over
``max_head_bytes`` is answered ``431 Request Header Fields Too Large`` as soon
as the limit is passed, before the WebSocket layer buffers or parses it.

**Observing the handshake.** It tells the listener how trio-websocket answered
a request it could not parse (:attr:`ServerStream.response_status`,
:attr:`ServerStream.on_close`), so that refusal is logged with its real status
(400, 426) without waiting out the handshake timeout.

**Closing gracefully.** Closing a socket with unread input makes the kernel
send a reset, which destroys the client's copy of what relayd sent last (a
1009 close after an oversized frame, a 1002 after a protocol error, a 503
response to a request that came with a body). :meth:`ServerStream.close_gracefully`
sends FIN, reads and discards until the client's EOF, then closes; bounded by
:data:`LINGER_S`, and skipped when another task is still reading. Before that
it sends the 1002/1007 close frame trio-websocket leaves out when the client
broke the protocol.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from http import HTTPStatus
from typing import Final

import trio
from trio_websocket import WebSocketConnection

__all__ = ["LINGER_S", "ServerStream", "close_frame", "http_response"]

_END_OF_HEAD: Final = b"\r\n\r\n"
_CLOSE_FRAME_HEAD: Final = b"\x88"  # FIN + opcode 8
#: Close codes wsproto reports for a client frame that breaks the protocol.
_PROTOCOL_ERRORS: Final = frozenset({1002, 1007})
#: A control frame's payload is at most 125 bytes, two of them the code.
_MAX_CLOSE_REASON: Final = 123
#: How long a closing connection may keep sending before relayd resets it.
LINGER_S: Final = 2.0
_LINGER_READ: Final = 65536


class ServerStream(trio.abc.Stream):
    """Wraps ``stream``; receives stop at the end of the HTTP request head until opened.

    Resource handling: owns ``stream``; its owner must call
    :meth:`close_gracefully` once the WebSocket layer has stopped, which closes
    it within :data:`LINGER_S`. :meth:`aclose` (the WebSocket layer's call)
    only notes that the layer is done.
    """

    def __init__(self, stream: trio.abc.Stream, max_head_bytes: int = 16384) -> None:
        self._stream = stream
        self._max_head_bytes = max_head_bytes
        self._head_bytes = 0
        #: The HTTP status of the handshake response, once one was sent.
        self.response_status: int | None = None
        #: Why the request was refused below the WebSocket layer, if it was.
        self.refusal: str | None = None
        #: Called once when the stream is closed or the request refused (by
        #: trio-websocket, after it answered a malformed request itself, or
        #: here, for a request head over the size limit).
        self.on_close: Callable[[], None] | None = None
        #: The WebSocket over this stream, once accepted (see :meth:`aclose`).
        self.ws: WebSocketConnection | None = None
        self._opened = trio.Event()
        self._closing = False
        self._close_sent = False
        self._head_seen = False
        self._tail = b""  # the last bytes passed, to find the end of head across reads
        self._held: bytes | bytearray = b""

    @property
    def stream(self) -> trio.abc.Stream:
        """The wrapped stream."""
        return self._stream

    def open(self) -> None:
        """Release held bytes and pass everything through from now on."""
        self._opened.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Receive like the wrapped stream, but never past the request head until opened."""
        if self._head_seen:
            if not self._opened.is_set():
                await self._opened.wait()
            if self._held:
                held, self._held = self._held, b""
                return held
            return await self._stream.receive_some(max_bytes)
        if self.refusal is not None:
            return b""
        try:
            data = await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError:  # reset, or a failed TLS handshake
            self._gone("the connection broke before a complete request")
            raise
        if not data:
            self._gone("the client closed before a complete request")
            return data
        window = self._tail + data
        end = window.find(_END_OF_HEAD)
        cut = len(data) if end < 0 else end + len(_END_OF_HEAD) - len(self._tail)
        self._head_bytes += cut
        if self._head_bytes > self._max_head_bytes:
            await self._refuse_head()
            return b""
        if end < 0:
            self._tail = window[-(len(_END_OF_HEAD) - 1) :]
            return data
        self._head_seen = True
        self._held = data[cut:]
        return data[:cut]

    async def _refuse_head(self) -> None:
        # Answer here, below trio-websocket: it would buffer the whole head
        # first. To it the client has simply gone away.
        self.refusal = f"request head over {self._max_head_bytes} bytes"
        self.response_status = 431
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._stream.send_all(http_response(431, self.refusal))
        self._stop_waiting()

    def _gone(self, why: str) -> None:
        # Nobody to answer: say why, and stop the listener waiting for a request.
        self.refusal = why
        self._stop_waiting()

    def _stop_waiting(self) -> None:
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send on the wrapped stream, noting the handshake status and any close frame."""
        if self.response_status is None:
            self.response_status = _status_of(bytes(data[:12]))
        elif data[:1] == _CLOSE_FRAME_HEAD:
            # trio-websocket writes each frame with one send_all, so a write
            # that starts like a close frame is one.
            self._close_sent = True
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Delegate to the wrapped stream."""
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Note that the WebSocket layer is done with the stream; the owner closes it.

        trio-websocket calls this from its reader task, which the owner may be
        cancelling at that very moment; closing here could be cut short
        half-way. So the close itself is :meth:`close_gracefully`, called once
        by the owner after the WebSocket layer has stopped.
        """
        self._stop_waiting()
        await trio.lowlevel.checkpoint()

    async def close_gracefully(self) -> None:
        """Close (see the module docstring), within :data:`LINGER_S`; idempotent.

        Cancelling it still closes the stream.
        """
        if not self._closing:
            self._closing = True
            with (
                trio.move_on_after(LINGER_S),
                contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError
                ),
            ):
                await self._answer_protocol_error()
                if isinstance(self._stream, trio.abc.HalfCloseableStream):
                    await self._stream.send_eof()
                while await self._stream.receive_some(_LINGER_READ):
                    pass
        await trio.aclose_forcefully(self._stream)

    async def _answer_protocol_error(self) -> None:
        # wsproto reports a frame that breaks RFC 6455 (unmasked, reserved
        # bits, invalid UTF-8) as if the client had closed with 1002 or 1007,
        # and trio-websocket then closes the stream without sending the close
        # frame RFC 6455 §7.1.7 asks for. Send it here, once, so the client
        # learns why; a real close from the client was already echoed.
        closed = self.ws.closed if self.ws is not None else None
        if self._close_sent or closed is None or closed.code not in _PROTOCOL_ERRORS:
            return
        self._close_sent = True
        await self._stream.send_all(close_frame(closed.code, closed.reason or ""))


def http_response(status: int, body: str) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response, for refusing a handshake."""
    data = body.encode()
    phrase = HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {phrase}\r\nConnection: close\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def close_frame(code: int, reason: str) -> bytes:
    """An unmasked (server) close frame; ``reason`` is cut to fit 125 bytes."""
    payload = code.to_bytes(2, "big") + reason.encode()[:_MAX_CLOSE_REASON]
    return _CLOSE_FRAME_HEAD + bytes([len(payload)]) + payload


def _status_of(head: bytes) -> int | None:
    # The first write of a server connection is its response: "HTTP/1.1 426 ".
    if head.startswith(b"HTTP/1.1 ") and head[9:12].isdigit():
        return int(head[9:12])
    return None

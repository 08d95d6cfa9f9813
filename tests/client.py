"""relayd's own Python test client, on trio-websocket, and a fixture-friendly server starter."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from relayd.config import AdminSettings, LimitsSettings, LogSettings, ServerSettings, Settings
from relayd.daemon.closing import CLOSE_TIMEOUT_S
from relayd.daemon.server import Server


def settings(**limits: Any) -> Settings:
    """Settings for an in-process server on a free loopback port."""
    return Settings(
        server=ServerSettings(host="127.0.0.1", port=0, shutdown_grace_s=5.0),
        limits=LimitsSettings(**limits),
        log=LogSettings(),
        admin=AdminSettings(port=0),
    )


class Client:
    """One connected test client and the id relayd gave it."""

    def __init__(self, ws: WebSocketConnection, client_id: str, v1: bool) -> None:
        self.ws = ws
        self.id = client_id
        self.v1 = v1

    async def send(self, to: str, message: object, ref: str | int | None = None) -> None:
        envelope: dict[str, object] = {"to": to, "message": message}
        if ref is not None:
            envelope["ref"] = ref
        await self.ws.send_message(json.dumps(envelope, ensure_ascii=False))

    async def recv(self) -> str:
        message = await self.ws.get_message()
        assert isinstance(message, str), message
        return message

    async def recv_json(self) -> Any:
        return json.loads(await self.recv())

    async def until_closed(self) -> tuple[list[str], int]:
        """Read to the end: the frames still received, and the close code."""
        frames = []
        while True:
            try:
                frames.append(await self.recv())
            except ConnectionClosed as closed:
                reason = closed.reason
                return frames, reason.code if reason is not None else 1006


def split_url(url: str) -> tuple[str, int, str]:
    """``ws://host:port/path`` (or ``wss://``) -> (host, port, path)."""
    address, _, path = url.split("://", 1)[1].partition("/")
    host, port = address.rsplit(":", 1)
    return host, int(port), "/" + path


@asynccontextmanager
async def connect(
    url: str,
    *,
    v1: bool = False,
    headers: list[tuple[str, str]] | None = None,
    tls: ssl.SSLContext | None = None,
    local_address: str | None = None,
) -> AsyncIterator[Client]:
    """Connect, read the welcome frame, and close on exit.

    The TCP stream is opened and closed here rather than by
    ``open_websocket_url``: trio-websocket's client leaves its socket open
    when the server sent the close frame first. ``local_address`` binds the
    client's end of a plain TCP connection (e.g. ``127.0.0.2``: all of
    127.0.0.0/8 is loopback on Linux), so one test can be several client IPs.
    """
    host, port, path = split_url(url)
    subprotocols = ["relayd.v1"] if v1 else []
    extra = [(name.encode(), value.encode()) for name, value in headers or []]
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    if tls is None:
        stream = await trio.open_tcp_stream(host, port, local_address=local_address)
    else:
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=tls)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery, stream, host, path, subprotocols=subprotocols, extra_headers=extra
        )
        try:
            first = await ws.get_message()
            assert isinstance(first, str)
            client_id = json.loads(first)["id"] if v1 else first
            yield Client(ws, client_id, v1)
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await ws.aclose()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def running(server: Server, *, scheme: str = "ws") -> AsyncIterator[str]:
    """Run ``server`` on loopback; yield its URL; drain it on exit."""
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.run)
        host, port = addresses[0]
        yield f"{scheme}://{host}:{port}/"
        server.shutdown("test finished")


# -- raw clients, for tests that must misbehave ------------------------------------


async def open_raw(
    url: str, data: bytes = b"", *, local_address: str | None = None
) -> trio.SocketStream:
    """A plain TCP connection to ``url``'s server that has sent ``data``."""
    host, port, _ = split_url(url)
    stream = await trio.open_tcp_stream(host, port, local_address=local_address)
    if data:
        await stream.send_all(data)
    return stream


async def read_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = bytearray()
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:  # reset: the server closed with our bytes unread
            break
        if not chunk:
            break
        received += chunk
    return bytes(received)


async def send_and_read(url: str, data: bytes, *, local_address: str | None = None) -> bytes:
    """Send ``data`` in one go on a new connection; return all the server sent back."""
    async with (
        await open_raw(url, local_address=local_address) as stream,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(stream.send_all, data)
        return await read_until_closed(stream)


async def read_welcome(stream: trio.abc.ReceiveStream) -> tuple[bytes, str]:
    """After a raw seed-dialect upgrade request: the response head and the id.

    Reads a byte at a time, so nothing after the id frame is consumed.
    """
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0 or len(data) < end + 6:
        chunk = await stream.receive_some(1)
        if not chunk:
            raise AssertionError(f"closed before the id frame: {data!r}")
        data += chunk
    head, frame = data[: end + 4], data[end + 4 :]
    assert head.startswith(b"HTTP/1.1 101 "), head
    length = frame[1] & 0x7F
    while len(frame) < 2 + length:
        chunk = await stream.receive_some(1)
        if not chunk:
            raise AssertionError(f"closed inside the id frame: {frame!r}")
        frame += chunk
    return head, frame[2 : 2 + length].decode()


async def exchange(url: str, *, local_address: str | None = None) -> None:
    """A fresh bystander pair: both directions must work right now."""
    async with (
        connect(url, local_address=local_address) as a,
        connect(url, v1=True, local_address=local_address) as b,
    ):
        await a.send(b.id, "ping")
        assert (await b.recv_json())["message"] == "ping"
        await b.send(a.id, "pong")
        assert await a.recv() == "pong"

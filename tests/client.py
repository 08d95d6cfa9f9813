"""relayd's own Python test client, on trio-websocket, and a fixture-friendly server starter."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from relayd.config import LimitsSettings, LogSettings, ServerSettings, Settings
from relayd.connection import CLOSE_TIMEOUT_S
from relayd.server import Server


def settings(**limits: Any) -> Settings:
    """Settings for an in-process server on a free loopback port."""
    return Settings(
        server=ServerSettings(host="127.0.0.1", port=0, shutdown_grace_s=5.0),
        limits=LimitsSettings(**limits),
        log=LogSettings(),
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
) -> AsyncIterator[Client]:
    """Connect, read the welcome frame, and close on exit.

    The TCP stream is opened and closed here rather than by
    ``open_websocket_url``: trio-websocket's client leaves its socket open
    when the server sent the close frame first.
    """
    host, port, path = split_url(url)
    subprotocols = ["relayd.v1"] if v1 else []
    extra = [(name.encode(), value.encode()) for name, value in headers or []]
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    if tls is None:
        stream = await trio.open_tcp_stream(host, port)
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

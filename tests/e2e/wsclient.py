"""Small helpers around the third-party Python ``websockets`` client (asyncio).

The e2e tests are plain sync functions; each runs one coroutine with :func:`run`, which
bounds it with a timeout so a silent server fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

T = TypeVar("T")

V1 = Subprotocol("relayd.v1")
#: Per-scenario bound: every test's client conversation must finish within this.
SCENARIO_TIMEOUT_S = 20.0


def run(coro: Coroutine[Any, Any, T], timeout: float = SCENARIO_TIMEOUT_S) -> T:
    """Run ``coro`` on a fresh asyncio loop; fail with TimeoutError after ``timeout`` s."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def client(url: str, *, v1: bool = False, user_agent: str | None = None) -> connect:
    """An ``async with`` connection to relayd, seed dialect unless ``v1``.

    ``proxy=None``: the loopback daemon is reached directly whatever the environment says.
    """
    kwargs: dict[str, Any] = {}
    if user_agent is not None:
        kwargs["user_agent_header"] = user_agent
    return connect(
        url,
        subprotocols=[V1] if v1 else None,
        proxy=None,
        open_timeout=10,
        close_timeout=5,
        **kwargs,
    )


async def recv_text(ws: ClientConnection) -> str:
    """The next frame, which must be a text frame."""
    frame = await ws.recv()
    assert isinstance(frame, str), f"expected a text frame, got binary {frame!r}"
    return frame


async def recv_json(ws: ClientConnection) -> Any:
    """The next frame, parsed as JSON."""
    text = await recv_text(ws)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise AssertionError(f"frame is not JSON: {text!r}") from exc


async def seed_id(ws: ClientConnection) -> str:
    """The seed dialect's first frame: the client's id as a bare string."""
    assert ws.subprotocol is None, f"seed client got subprotocol {ws.subprotocol!r}"
    ident = await recv_text(ws)
    assert_id(ident)
    return ident


async def v1_id(ws: ClientConnection) -> str:
    """The relayd.v1 welcome: ``{"type": "welcome", "id": ...}``; returns the id."""
    assert ws.subprotocol == V1, f"server selected {ws.subprotocol!r}, not relayd.v1"
    welcome = await recv_json(ws)
    assert isinstance(welcome, dict), welcome
    assert welcome.get("type") == "welcome", welcome
    ident = welcome.get("id")
    assert isinstance(ident, str), welcome
    assert_id(ident)
    return ident


def assert_id(ident: str) -> None:
    """An id as DESIGN §1 promises: URL-safe text carrying at least 128 random bits."""
    assert ident, "empty id"
    assert not ident.startswith(("{", '"')), f"id looks like JSON, not a bare string: {ident!r}"
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
    assert set(ident) <= allowed, f"id is not URL-safe: {ident!r}"
    # 128 bits need 22 characters even in base64url, the densest URL-safe alphabet.
    assert len(ident) >= 22, f"id too short to hold 128 random bits: {ident!r}"


async def send_json(ws: ClientConnection, value: Any) -> None:
    """Send ``value`` as one JSON text frame."""
    await ws.send(json.dumps(value))

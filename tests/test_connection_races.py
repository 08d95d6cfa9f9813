"""Races between a connection's timers, its reads, its router and its writer task.

Each test drives a Gate and a LocalRouter over in-memory streams on trio's
autojump clock, as tests/test_connection_endings.py does, and puts two events
in one round of trio's run loop, or a bug where a bug handler runs.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from relayd.daemon.connection import Connection
from tests import test_connection_endings as endings
from tests import wire

OP_TEXT, OP_CLOSE = 0x1, 0x8


def envelope(to: str, n: int) -> bytes:
    return wire.frame(OP_TEXT, json.dumps({"to": to, "message": n, "ref": n}).encode())


class Scene(endings.Scene):
    """The gate and router of tests/test_connection_endings.py, with the server's end at hand."""

    async def open_served(self) -> tuple[trio.abc.Stream, trio.abc.Stream, str]:
        """A v1 client past its handshake: its stream, the server's end, its id."""
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.gate, server)
        extra = [("Sec-WebSocket-Protocol", "relayd.v1")]
        await client.send_all(wire.upgrade_request(extra=extra))
        data = b""
        while b"\r\n\r\n" not in data:
            data += await client.receive_some(1)
        frames: list[tuple[int, bytes]] = []
        while not frames:
            data += await client.receive_some()
            frames = wire.server_frames(data)
        return client, server, json.loads(frames[0][1])["id"]


@asynccontextmanager
async def scene(inbox_size: int = 256, **limits: Any) -> AsyncIterator[Scene]:
    async with trio.open_nursery() as nursery:
        yield Scene(nursery, inbox_size, **limits)
        nursery.cancel_scope.cancel()


async def texts(stream: trio.abc.ReceiveStream) -> list[dict[str, Any]]:
    """The text frames the server has sent by the time everything is blocked."""
    data = b""
    with trio.move_on_after(1.0):
        while chunk := await stream.receive_some():
            data += chunk
    return [json.loads(p) for op, p in wire.server_frames(data, after_head=False) if op == OP_TEXT]


async def test_a_timer_due_as_a_read_arrives_never_hands_that_read_to_the_router_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The read and the keepalive deadline land in the same run-loop round:
    # trio may cancel the reader's scope (for good) before the reader runs, so
    # a wait of its hand-off to the router would end at once. The read must
    # be handed off once, whole, after the ping: neither lost nor repeated.
    async with scene(
        inbox_size=1, outbox_messages=2, ping_interval_s=10.0, pong_timeout_s=100.0
    ) as s:
        _, sender_server, _ = await s.open_served()
        receiver, _, receiver_id = await s.open_served()
        await trio.testing.wait_all_tasks_blocked()
        # Three messages in one read: two in the first chunk (routed at
        # once: the inbox has room for one batch), one in the second (it
        # waits for the router, whose task is not running yet).
        data = b"".join(envelope(receiver_id, n) for n in range(3))
        assert isinstance(sender_server, trio.StapledStream)
        sender_server.receive_stream.put_data(data)
        autojump_clock.jump(11.0)  # the ping is due, in the same round
        await trio.testing.wait_all_tasks_blocked()
        await s.nursery.start(s.router.run)
        got = await texts(receiver)
    assert [m["message"] for m in got if m.get("type") == "message"] == [0, 1, 2]


async def test_a_timer_due_as_a_read_ending_mid_frame_arrives_leaves_the_stream_intact(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # As above, with a read that ends half-way through a frame: the parser
    # keeps that half; were the read fed again, the rest of the stream would
    # no longer parse as the client sent it.
    with structlog.testing.capture_logs() as logs:
        async with scene(inbox_size=1, ping_interval_s=10.0, pong_timeout_s=100.0) as s:
            sender, sender_server, _ = await s.open_served()
            receiver, _, receiver_id = await s.open_served()
            blocker, _, _ = await s.open_served()
            await blocker.send_all(envelope("nobody", 9))  # fills the one-batch inbox
            await trio.testing.wait_all_tasks_blocked()
            first, second = envelope(receiver_id, 0), envelope(receiver_id, 1)
            assert isinstance(sender_server, trio.StapledStream)
            sender_server.receive_stream.put_data(first + second[:10])
            autojump_clock.jump(11.0)  # the ping is due, in the same round
            await trio.testing.wait_all_tasks_blocked()
            await s.nursery.start(s.router.run)
            await trio.testing.wait_all_tasks_blocked()
            await sender.send_all(second[10:])
            got = await texts(receiver)
    closes = [(e["code"], e["reason"]) for e in logs if e["event"] == "connection.close"]
    assert [m["message"] for m in got if m.get("type") == "message"] == [0, 1], closes


async def test_a_bug_met_again_by_the_writer_tasks_crash_handler_never_reaches_the_shared_nursery(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One bug: Connection.client_gone raises (or anything it calls: Lifecycle.end,
    # Reader.stop, Outbox.discard, Writer.slots_freed). The writer task meets
    # it when it finds its client gone, keeps it as `crash`, and meets it
    # again when it asks its connection to stop reading: neither may reach
    # the connections nursery, which every other connection runs in.
    def buggy_gone(self: Connection) -> None:
        raise RuntimeError("bug in client_gone")

    monkeypatch.setattr(Connection, "client_gone", buggy_gone)
    escaped: list[BaseException] = []
    try:
        async with scene() as s:
            s.nursery.start_soon(s.router.run)
            victim, _, victim_id = await s.open_served()
            a, _, _ = await s.open_served()
            b, _, b_id = await s.open_served()
            assert isinstance(victim, trio.StapledStream)
            victim.receive_stream.close()  # gone for writes; its reader sees nothing
            await a.send_all(envelope(victim_id, 0))  # every write by a task (not a socket)
            await trio.testing.wait_all_tasks_blocked()
            await a.send_all(envelope(b_id, 1))
            assert [m["message"] for m in await texts(b) if m.get("type") == "message"] == [1]
    except BaseException as exc:  # what reached the shared nursery
        escaped.append(exc)
    assert escaped == []

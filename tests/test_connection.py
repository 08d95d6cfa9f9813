"""Connections over in-memory streams, on trio's autojump clock.

The timeouts of a connection (handshake, idle, keepalive pong, slow consumer)
are checked here in virtual time: the clock jumps whenever every task is
blocked, so a 10-second timeout costs no real time and its deadline is exact.
The same :class:`relayd.daemon.gate.Gate` serves these streams as serves sockets.
Each test takes the ``autojump_clock`` fixture, which pytest-trio runs it on.
"""

from __future__ import annotations

import gc
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
import structlog
import trio
import trio.testing
from trio_websocket import wrap_client_stream

from relayd.config import LimitsSettings
from relayd.daemon.connection import Connection
from relayd.daemon.gate import Gate
from relayd.daemon.reader import Reader
from relayd.daemon.writer import WRITER_IDLE_S, Writer
from relayd.routing.local import DEFAULT_INBOX_SIZE, LocalRouter
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from tests import wire
from tests.client import Client


class Relay:
    """A Gate and its router, serving in-memory streams."""

    def __init__(self, nursery: trio.Nursery, gate: Gate, router: LocalRouter) -> None:
        self.nursery = nursery
        self.gate = gate
        self.router = router

    def stream(self, *, lockstep: bool = False) -> trio.abc.Stream:
        """A new client stream, its other end served by the gate."""
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        client, server = pair()
        self.nursery.start_soon(self.gate, server)
        return client

    @asynccontextmanager
    async def client(self, *, v1: bool = False, lockstep: bool = False) -> AsyncIterator[Client]:
        stream = self.stream(lockstep=lockstep)
        protocols = ["relayd.v1"] if v1 else []
        async with trio.open_nursery() as nursery:
            # trio-websocket's annotation names socket streams, but it only
            # needs a Stream: the in-memory one is what this module is about.
            ws = await wrap_client_stream(
                nursery, cast(trio.SocketStream, stream), "relayd.test", "/", subprotocols=protocols
            )
            first = await ws.get_message()
            assert isinstance(first, str)
            yield Client(ws, json.loads(first)["id"] if v1 else first, v1)
            await ws.aclose()


@asynccontextmanager
async def serving(
    *, inbox_size: int = DEFAULT_INBOX_SIZE, routing: bool = True, **limits: Any
) -> AsyncIterator[Relay]:
    """A gate and its router; with ``routing=False`` the router's task is the test's to start."""
    log = structlog.get_logger("test")
    stats = Stats()
    events = MessageEvents(log, stats)
    router = LocalRouter(events, stats, inbox_size=inbox_size)
    gate = Gate(router, LimitsSettings(**limits), log, events=events, stats=stats)
    async with trio.open_nursery() as nursery:
        if routing:
            await nursery.start(router.run)
        yield Relay(nursery, gate, router)
        gate.drain()
        router.close()


async def silent_client(stream: trio.abc.Stream) -> str:
    """Complete a handshake by hand, read the id frame, then read nothing more."""
    await stream.send_all(wire.upgrade_request())
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0 or len(data) < end + 6:
        data += await stream.receive_some(1)  # lockstep-friendly: never read ahead
    length = data[end + 5] & 0x7F
    while len(data) < end + 6 + length:
        data += await stream.receive_some(1)
    return data[end + 6 : end + 6 + length].decode()


async def test_a_client_that_never_finishes_its_request_gets_408_at_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with structlog.testing.capture_logs() as events:
        async with serving(handshake_timeout_s=7.0) as relay:
            stream = relay.stream()
            began = trio.current_time()
            await stream.send_all(wire.upgrade_request()[:30])  # then nothing
            reply = b""
            while chunk := await stream.receive_some():
                reply += chunk
            assert trio.current_time() - began == pytest.approx(7.0)
            assert reply.startswith(b"HTTP/1.1 408 ")
            await stream.aclose()
    [rejected] = [e for e in events if e["event"] == "handshake.rejected"]
    assert (rejected["status"], rejected["reason"]) == (
        408,
        "no complete request within handshake_timeout_s",
    )


async def test_an_idle_connection_is_closed_at_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        serving(idle_timeout_s=60.0, ping_interval_s=0) as relay,
        relay.client() as a,
        relay.client() as b,
    ):
        began = trio.current_time()
        await trio.sleep(50)  # virtual time
        await a.send(b.id, "keeps b busy, and a")
        assert await b.recv() == "keeps b busy, and a"
        frames, code = await b.until_closed()
        assert (frames, code) == ([], 1000)
        assert trio.current_time() - began == pytest.approx(110.0)
        assert b.ws.closed is not None
        assert b.ws.closed.reason == "idle timeout"


async def test_a_peer_that_does_not_answer_pings_is_closed_and_its_id_freed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with structlog.testing.capture_logs() as events:
        async with serving(ping_interval_s=30.0, pong_timeout_s=10.0, idle_timeout_s=0) as relay:
            dead = relay.stream()
            dead_id = await silent_client(dead)
            async with relay.client(v1=True) as probe:
                await trio.sleep(41)  # one ping interval and one pong timeout
                await probe.send(dead_id, "still there?", ref=1)
                reply = await probe.recv_json()
                assert reply["error"] == "unknown_recipient"
            await dead.aclose()
    [close] = [e for e in events if e["event"] == "connection.close" and e["id"] == dead_id]
    assert (close["code"], close["reason"], close["closed_by"]) == (
        1011,
        "keepalive ping timeout",
        "server",
    )


async def test_a_live_peer_answers_pings_and_stays(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        serving(ping_interval_s=30.0, pong_timeout_s=10.0, idle_timeout_s=0) as relay,
        relay.client() as a,
        relay.client() as b,
    ):
        await trio.sleep(300)  # ten keepalive rounds
        await a.send(b.id, "hello")
        assert await b.recv() == "hello"


async def test_a_client_that_keeps_talking_is_not_pinged_and_one_gone_quiet_is(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Keepalive pings a client only once nothing has come from it for an interval:
    # what it sends shows it is there (docs/protocol.md, "Keepalive pings").
    async with serving(ping_interval_s=30.0, pong_timeout_s=10.0, idle_timeout_s=0) as relay:
        stream = relay.stream()
        own_id = await silent_client(stream)
        pings: list[float] = []
        data = b""

        async def read() -> None:
            nonlocal data
            seen = 0
            while chunk := await stream.receive_some():
                data += chunk
                frames = wire.server_frames(data, after_head=False)
                pings.extend(trio.current_time() for op, _ in frames[seen:] if op == 0x9)
                seen = len(frames)

        began = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            for n in range(12):  # a message to itself every 20 s for 4 minutes
                await trio.sleep(20)
                payload = json.dumps({"to": own_id, "message": n}).encode()
                await stream.send_all(wire.frame(0x1, payload))
            await trio.sleep(29)
            assert pings == []  # heard from every 20 s: never pinged
            await trio.sleep(2)
            assert [t - began for t in pings] == [pytest.approx(270.0)]  # 30 s after the last
            nursery.cancel_scope.cancel()
        await stream.aclose()


async def test_a_timer_due_while_a_reader_waits_for_the_router_loses_none_of_what_it_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The router's inbox holds one batch and its task has not started: the
    # sender's second read waits for the router, across a keepalive ping due.
    async with (
        serving(inbox_size=1, routing=False, ping_interval_s=5.0, pong_timeout_s=60.0) as relay,
        relay.client(v1=True) as a,
        relay.client() as b,
    ):
        await a.send(b.id, "first", ref=1)
        await trio.testing.wait_all_tasks_blocked()  # in the inbox
        await a.send(b.id, "second", ref=2)
        await trio.testing.wait_all_tasks_blocked()  # waiting for room in the inbox
        await trio.sleep(12)  # two pings due meanwhile
        await relay.nursery.start(relay.router.run)
        assert [await b.recv(), await b.recv()] == ["first", "second"]
        assert [(await a.recv_json())["ref"] for _ in range(2)] == [1, 2]


async def test_a_slow_consumer_gets_senders_busy_then_1013_unless_it_catches_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timeout = 5.0
    with structlog.testing.capture_logs() as events:
        async with serving(outbox_messages=2, slow_consumer_timeout_s=timeout) as relay:
            stuck = relay.stream(lockstep=True)
            stuck_id = await silent_client(stuck)
            async with relay.client(v1=True) as sender:
                outcomes = []
                for n in range(4):  # one in the writer's hands, two queued, one refused
                    await sender.send(stuck_id, n, ref=n)
                    reply = await sender.recv_json()
                    outcomes.append(reply.get("error", reply["type"]))
                assert outcomes == ["ack", "ack", "ack", "recipient_busy"]
                await trio.sleep(timeout - 0.5)  # still held, still full
                assert await _send_and_reply(sender, stuck_id) == "recipient_busy"
                await trio.sleep(1.0)  # past the deadline: closed, id freed
                assert await _send_and_reply(sender, stuck_id) == "unknown_recipient"
            await stuck.aclose()
    [close] = [e for e in events if e["event"] == "connection.close" and e["id"] == stuck_id]
    assert (close["code"], close["closed_by"]) == (1013, "server")
    assert [e["limit"] for e in events if e["event"] == "limit.exceeded"] == [
        "slow_consumer_timeout_s"
    ]


async def _send_and_reply(sender: Client, to: str) -> str:
    await sender.send(to, "x", ref="probe")
    reply = await sender.recv_json()
    return str(reply.get("error", reply["type"]))


async def test_a_consumer_that_catches_up_in_time_is_not_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        serving(outbox_messages=2, slow_consumer_timeout_s=5.0) as relay,
        relay.client(v1=True) as sender,
        relay.client(lockstep=True) as slow,
    ):
        # slow's transport queue holds one message and its outbox two; the
        # rest of what is sent while it does not read is refused.
        replies = []
        for n in range(8):
            await sender.send(slow.id, n, ref=n)
            replies.append((await sender.recv_json()).get("error", "ack"))
        assert "recipient_busy" in replies
        await trio.sleep(4)  # under the timeout
        received = [await slow.recv() for _ in range(replies.count("ack"))]
        assert received == [str(n) for n, r in enumerate(replies) if r == "ack"]
        await trio.sleep(10)
        await sender.send(slow.id, "after", ref="after")
        assert (await sender.recv_json())["type"] == "ack"
        assert await slow.recv() == "after"


async def test_a_client_reading_big_messages_steadily_is_not_a_slow_consumer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 60 KB messages read at 60 KB/s, with a 2 s timeout: every 60 KB written
    # is progress, even though four of them (4 s of reading) wait at once.
    big, count = "m" * 60_000, 12
    limits: dict[str, Any] = {
        "outbox_messages": 4,
        "slow_consumer_timeout_s": 2.0,
        "max_message_bytes": 70_000,
    }
    with structlog.testing.capture_logs() as events:
        async with serving(**limits) as relay, relay.client(v1=True) as sender:
            reader = relay.stream(lockstep=True)
            reader_id = await silent_client(reader)
            received = bytearray()
            all_read = trio.Event()

            async def read_slowly() -> None:
                while chunk := await reader.receive_some(30_000):
                    received.extend(chunk)
                    if len(wire.server_frames(bytes(received), after_head=False)) == count:
                        all_read.set()
                    await trio.sleep(0.5)  # the client's pace: 60 KB/s

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_slowly)
                acked = 0
                while acked < count:
                    await sender.send(reader_id, big, ref=acked)
                    if "error" in await sender.recv_json():  # recipient_busy: try again
                        await trio.sleep(0.5)
                    else:
                        acked += 1
                await all_read.wait()
                nursery.cancel_scope.cancel()
            await reader.aclose()
    assert [e for e in events if e["event"] == "limit.exceeded"] == []
    frames = wire.server_frames(bytes(received), after_head=False)
    assert [(op, len(payload)) for op, payload in frames] == [(wire.OP_TEXT, 60_000)] * count


async def test_a_slow_consumer_gets_the_1013_close_frame_after_the_write_in_progress(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timeout = 5.0
    async with serving(outbox_messages=2, slow_consumer_timeout_s=timeout) as relay:
        stuck = relay.stream(lockstep=True)
        stuck_id = await silent_client(stuck)
        async with relay.client(v1=True) as sender:
            while await _send_and_reply(sender, stuck_id) != "recipient_busy":
                pass
            await trio.sleep(timeout + 1)  # closed as a slow consumer, its write pending
            assert await _send_and_reply(sender, stuck_id) == "unknown_recipient"
        received = b""
        while chunk := await stuck.receive_some():  # the client reads again, to the end
            received += chunk
        await stuck.aclose()
    frames = wire.server_frames(received, after_head=False)
    assert frames[0][0] == wire.OP_TEXT  # the frame that was being written
    assert frames[-1] == (
        wire.OP_CLOSE,
        (1013).to_bytes(2, "big") + b"slow consumer: outbox stayed full",
    )


async def test_a_connection_accepted_as_the_router_stops_is_closed_with_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as relay:
        relay.router.close()
        await trio.testing.wait_all_tasks_blocked()
        async with relay.client() as late:
            assert await late.until_closed() == ([], 1001)


async def test_a_reload_reaches_open_connections_rate_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        serving(messages_per_second=1, message_burst=2) as relay,
        relay.client(v1=True) as sender,
        relay.client() as friend,
    ):
        for n in range(2):
            await sender.send(friend.id, n, ref=n)
            assert (await sender.recv_json())["type"] == "ack"
        await sender.send(friend.id, 2, ref=2)
        assert (await sender.recv_json())["error"] == "rate_limited"
        relay.gate.reconfigure(LimitsSettings(messages_per_second=1, message_burst=5))
        for n in range(3, 8):  # a fresh bucket of the new size, at once
            await sender.send(friend.id, n, ref=n)
            assert (await sender.recv_json())["type"] == "ack"


async def test_a_reload_during_a_handshake_announces_the_limit_the_connection_keeps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # docs/protocol.md: the 101's Relayd-Max-Message-Bytes is the limit the connection
    # keeps. A reload that lowered it while the request was arriving announced the old
    # limit, and a client that trusted it (relayd's own does) lost its connection to a
    # 1009 for a message within what it was told.
    async with serving(max_message_bytes=1000) as relay:
        stream = relay.stream()
        request = wire.upgrade_request()
        await stream.send_all(request[:30])
        await trio.testing.wait_all_tasks_blocked()  # the gate waits for the rest
        relay.gate.reconfigure(LimitsSettings(max_message_bytes=100))
        await stream.send_all(request[30:])
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(1)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"\r\nRelayd-Max-Message-Bytes: 100\r\n" in head
        # And that is the limit it keeps: a message of 200 bytes is over it.
        await stream.send_all(wire.frame(wire.OP_TEXT, b"x" * 200))
        rest = b""
        while chunk := await stream.receive_some():
            rest += chunk
        assert wire.close_code(head + rest) == 1009
        await stream.aclose()


class _JumpingStream(trio.abc.Stream):
    """The server's end of a memory stream that moves the clock on request.

    When armed, the next ``receive_some`` call (the reader coming back for more
    after handling what it read) first jumps the clock: the reader has just
    woken the writer, and the writer has not run yet.
    """

    def __init__(self, inner: trio.abc.Stream, clock: trio.testing.MockClock) -> None:
        self._inner = inner
        self._clock = clock
        self.jump_s = 0.0

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.jump_s:
            self._clock.jump(self.jump_s)
            self.jump_s = 0.0
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_frames_that_wake_the_writer_as_its_idle_time_runs_out_are_written(
    mock_clock: trio.testing.MockClock,
) -> None:
    # Autobahn case 5.19: a ping, a pause of one second, another ping. The
    # writer, idle since the first pong, gives up after WRITER_IDLE_S (1.0 s).
    # Here the second ping wakes it, and its idle deadline passes before it
    # runs: the pong it has taken must still be written, not dropped.
    ping = wire.frame(0x9, b"one")
    async with serving(ping_interval_s=0, idle_timeout_s=0) as relay:
        client, server = trio.testing.memory_stream_pair()
        jumping = _JumpingStream(server, mock_clock)
        relay.nursery.start_soon(relay.gate, jumping)
        await silent_client(client)
        await client.send_all(ping)
        pong = wire.server_frames(bytes(await client.receive_some()), after_head=False)
        assert pong == [(0xA, b"one")]
        await trio.testing.wait_all_tasks_blocked()  # the writer waits, idle
        jumping.jump_s = 2 * WRITER_IDLE_S
        await client.send_all(wire.frame(0x9, b"two"))
        received = bytearray()

        async def read() -> None:
            while chunk := await client.receive_some():
                received.extend(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert wire.server_frames(bytes(received), after_head=False) == [(0xA, b"two")]
        mock_clock.autojump_threshold = 0  # let the teardown's timers run
        await client.aclose()


async def test_a_closed_connection_is_freed_at_once_not_by_the_cyclic_collector(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A connection's parts point back to it; once it has ended those links
    # are cut, so that reference counting frees it and its socket at once,
    # with no cycle left for the collector to find.
    gc.collect()
    gc.disable()
    try:
        async with serving() as relay:
            async with relay.client() as a, relay.client() as b:
                await a.send(b.id, "hello")  # its reader, router and writer all take part
                assert await b.recv() == "hello"
            await trio.testing.wait_all_tasks_blocked()
            assert not relay.gate.connections
            gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept, to be looked at
            gc.collect()
            left = [type(thing) for thing in gc.garbage]
            assert (left.count(Connection), left.count(Reader), left.count(Writer)) == (0, 0, 0)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()

"""How connections end when the reader, the writer and the router race, in virtual time.

Each test drives a :class:`relayd.daemon.gate.Gate` and a
:class:`relayd.routing.local.LocalRouter` over in-memory streams on trio's
autojump clock, with the router held back or a client's stream broken at the
moment that matters, and checks what the clients receive and what is logged.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from structlog.typing import EventDict

from relayd.config import LimitsSettings
from relayd.daemon.gate import Gate, new_client_id
from relayd.routing.interface import Peer
from relayd.routing.local import LocalRouter
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from tests import wire

OP_TEXT, OP_CLOSE = 0x1, 0x8


class Scene:
    """A gate and a router whose task the test starts when it wants to."""

    def __init__(
        self,
        nursery: trio.Nursery,
        inbox_size: int,
        new_id: Callable[[], str] = new_client_id,
        **limits: Any,
    ) -> None:
        log = structlog.get_logger("test")
        stats = Stats()
        events = MessageEvents(log, stats)
        self.nursery = nursery
        self.router = LocalRouter(events, stats, inbox_size=inbox_size)
        self.gate = Gate(
            self.router,
            LimitsSettings(**limits),
            log,
            events=events,
            stats=stats,
            echo_route=True,
            new_id=new_id,
        )

    async def open(
        self, stream: trio.abc.Stream | None = None, *, v1: bool = True, path: str = "/"
    ) -> tuple[trio.abc.Stream, str]:
        """A client that has done its handshake; its stream and its id (None-less for /echo)."""
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.gate, server if stream is None else stream)
        if stream is not None:
            client = stream.client  # type: ignore[attr-defined]
        extra = [("Sec-WebSocket-Protocol", "relayd.v1")] if v1 else None
        await client.send_all(wire.upgrade_request(path=path, extra=extra))
        data = b""
        while b"\r\n\r\n" not in data:
            data += await client.receive_some(1)
        if path == "/echo":
            return client, ""
        frames: list[tuple[int, bytes]] = []
        while not frames:
            data += await client.receive_some()
            frames = wire.server_frames(data)
        payload = frames[0][1].decode()
        return client, json.loads(payload)["id"] if v1 else payload


async def frames_until_close(stream: trio.abc.ReceiveStream) -> list[tuple[int, bytes]]:
    data = b""
    while True:
        chunk = await stream.receive_some()
        if not chunk:
            return wire.server_frames(data, after_head=False)
        data += chunk
        frames = wire.server_frames(data, after_head=False)
        if frames and frames[-1][0] == OP_CLOSE:
            return frames


async def frames_now(stream: trio.abc.ReceiveStream) -> list[tuple[int, bytes]]:
    """Whatever the server has sent by the time every task is blocked."""
    data = b""
    with trio.move_on_after(0.5):
        while chunk := await stream.receive_some():
            data += chunk
    return wire.server_frames(data, after_head=False)


def envelope(to: str, n: int) -> bytes:
    return wire.frame(OP_TEXT, json.dumps({"to": to, "message": n, "ref": n}).encode())


@asynccontextmanager
async def scene(
    inbox_size: int = 256, new_id: Callable[[], str] = new_client_id, **limits: Any
) -> AsyncIterator[Scene]:
    async with trio.open_nursery() as nursery:
        yield Scene(nursery, inbox_size, new_id, **limits)
        nursery.cancel_scope.cancel()


def closes(logs: list[EventDict]) -> list[tuple[int, str]]:
    return [(e["code"], e["closed_by"]) for e in logs if e["event"] == "connection.close"]


async def test_a_flood_closed_while_the_router_is_behind_still_gets_its_replies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The router's inbox is full, so the flooder's reader must wait to hand
    # over what it read; the rate limit closes the connection meanwhile. The
    # close must not cut that hand-off short: every message read is relayed or
    # refused, and told, before the 1008.
    with structlog.testing.capture_logs() as logs:
        async with scene(inbox_size=1, messages_per_second=0.001, message_burst=2) as s:
            flooder, _ = await s.open()
            _friend, friend_id = await s.open()
            blocker, _ = await s.open()
            await blocker.send_all(envelope("nobody", 0))  # fills the one-batch inbox
            await trio.testing.wait_all_tasks_blocked()
            await flooder.send_all(b"".join(envelope(friend_id, n) for n in range(5)))
            await trio.testing.wait_all_tasks_blocked()
            await s.nursery.start(s.router.run)
            frames = await frames_until_close(flooder)
    replies = [json.loads(p) for op, p in frames if op == OP_TEXT]
    assert [(r["type"], r.get("error"), r["ref"]) for r in replies] == [
        ("ack", None, 0),
        ("ack", None, 1),
        ("error", "rate_limited", 2),
        ("error", "rate_limited", 3),
    ]
    assert frames[-1] == (OP_CLOSE, (1008).to_bytes(2, "big") + b"rate limit exceeded")
    assert (1008, "server") in closes(logs)


async def test_a_reply_the_router_sends_after_the_connection_closed_is_dropped_harmlessly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The router answers an item long after its connection was closed for
    # policy (here: disconnected through the server API) and its writer gone.
    # The router must go on routing for everyone else.
    with structlog.testing.capture_logs() as logs:
        async with scene(ping_interval_s=0, idle_timeout_s=0) as s:
            client, client_id = await s.open()
            await client.send_all(envelope("nobody", 1))  # waits for the router, a slot held
            await trio.testing.wait_all_tasks_blocked()
            assert await s.router.disconnect(client_id, 1008, "banned") == 1
            # Past the 5 s flush deadline, into the closing handshake (5 s more):
            # the writer has ended, the connection is still there.
            await trio.sleep(7)
            await s.nursery.start(s.router.run)
            a, _ = await s.open()
            b, b_id = await s.open()
            await a.send_all(envelope(b_id, 7))
            got = await frames_now(b)
    assert [json.loads(p)["message"] for op, p in got if op == OP_TEXT] == [7]
    assert (1008, "api") in closes(logs)  # the server API closed it, not relayd's policy
    assert not [e for e in logs if e["event"] == "error"]


class Breakable(trio.abc.Stream):
    """The server's end of a memory stream whose writes can be made to fail."""

    def __init__(self) -> None:
        self.client, self._inner = trio.testing.memory_stream_pair()
        self.broken = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.broken:
            raise trio.BrokenResourceError("the client is gone")
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_a_client_found_gone_by_its_writer_stops_being_routed_to(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Its writer's send fails: from then on its messages must not be acked as
    # delivered while they are dropped, however long its reader has not seen
    # the end of the stream.
    with structlog.testing.capture_logs() as logs:
        async with scene(ping_interval_s=0, idle_timeout_s=0) as s:
            await s.nursery.start(s.router.run)
            breakable = Breakable()
            _, gone_id = await s.open(breakable)
            sender, _ = await s.open()
            breakable.broken = True
            outcomes = []
            for n in range(3):
                await sender.send_all(envelope(gone_id, n))
                [(_, payload)] = await frames_now(sender)
                reply = json.loads(payload)
                outcomes.append(reply.get("error", reply["type"]))
    assert outcomes[0] == "ack"  # in its outbox when the write failed
    assert outcomes[1:] == ["unknown_recipient", "unknown_recipient"]
    [gone] = [e for e in logs if e["event"] == "connection.close" and e["id"] == gone_id]
    assert (gone["code"], gone["undelivered"]) == (1006, 1)


class Recording(Breakable):
    """A :class:`Breakable` that keeps each write made to it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await super().send_all(data)


async def test_the_101_and_the_welcome_go_out_in_one_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One TCP segment: the client has its id with the answer to its handshake.
    async with scene() as s:
        recording = Recording()
        _, client_id = await s.open(recording)
    head, _, rest = recording.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    [(opcode, payload)] = wire.server_frames(rest, after_head=False)
    assert opcode == OP_TEXT
    assert json.loads(payload) == {"type": "welcome", "id": client_id}


async def test_a_client_gone_before_its_101_is_written_is_not_left_routable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The connection is routable before the 101 goes out (a message to its id
    # must find it the moment the client learns it): if that write fails, the
    # id must not stay routed to a connection that never ran.
    with structlog.testing.capture_logs() as logs:
        async with scene() as s:
            gone = Breakable()
            gone.broken = True
            s.nursery.start_soon(s.gate, gone)
            await gone.client.send_all(
                wire.upgrade_request(extra=[("Sec-WebSocket-Protocol", "relayd.v1")])
            )
            assert await gone.client.receive_some() == b""  # closed, nothing written
            await trio.testing.wait_all_tasks_blocked()
            assert s.router.routes == 0
            # Counted as "the client went away during the handshake response".
            assert s.gate.stats.rejected == {(0, "client_left"): 1}
    assert not [e for e in logs if e["event"] in ("connection.open", "connection.close")]


class Held(Breakable):
    """A :class:`Breakable` whose writes wait until :attr:`let_go` is set, then fail."""

    def __init__(self) -> None:
        super().__init__()
        self.let_go = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.let_go.wait()
        raise trio.BrokenResourceError("the client is gone")


@pytest.mark.parametrize(
    ("ending", "reason"),
    [
        ("the client goes", "the client went away during the handshake response"),
        ("a forced stop", "the handshake response was cut short"),
    ],
)
async def test_messages_routed_to_a_client_whose_101_never_went_out_are_logged_as_undelivered(
    autojump_clock: trio.testing.MockClock, ending: str, reason: str
) -> None:
    # Routable before its 101 goes out: a message for its id in between is
    # acknowledged (queued for it); if the 101 then never goes out, the loss
    # must be in the log, as a closed connection's undelivered messages are.
    ids = iter(["victim", "sender"])
    with structlog.testing.capture_logs() as logs:
        async with scene(new_id=lambda: next(ids)) as s:
            await s.nursery.start(s.router.run)
            held = Held()
            async with trio.open_nursery() as own:
                own.start_soon(s.gate, held)
                await held.client.send_all(
                    wire.upgrade_request(extra=[("Sec-WebSocket-Protocol", "relayd.v1")])
                )
                await trio.testing.wait_all_tasks_blocked()  # routable, its 101 waiting
                sender, _ = await s.open()
                await sender.send_all(envelope("victim", 1))
                [(_, payload)] = await frames_now(sender)
                assert json.loads(payload) == {"type": "ack", "ref": 1}
                if ending == "the client goes":
                    held.let_go.set()
                else:
                    own.cancel_scope.cancel()
            assert s.router.routes == 1  # the sender only
    [rejected] = [e for e in logs if e["event"] == "handshake.rejected"]
    assert rejected["reason"] == reason
    assert (rejected["log_level"], rejected["undelivered"]) == ("info", 1)


@pytest.mark.parametrize("where", ["while it becomes routable", "while its 101 waits"])
async def test_a_handshake_cut_short_leaves_its_id_unrouted_and_nothing_counted(
    autojump_clock: trio.testing.MockClock, where: str
) -> None:
    # A forced stop (the connections nursery cancelled) before the connection
    # runs: nothing else would unroute its id. A router may hold the connection
    # before its register returns (the cluster's, while Redis answers).
    async with scene() as s:
        if where == "while it becomes routable":
            register = s.router.register

            async def register_then_wait(peer: Peer) -> None:
                await register(peer)
                await trio.sleep_forever()

            s.router.register = register_then_wait  # type: ignore[method-assign]
        held = Held()
        async with trio.open_nursery() as own:
            own.start_soon(s.gate, held)
            await held.client.send_all(
                wire.upgrade_request(extra=[("Sec-WebSocket-Protocol", "relayd.v1")])
            )
            await trio.testing.wait_all_tasks_blocked()
            assert s.router.routes == 1  # routable, its 101 not written
            assert s.gate.handshakes.total == 0  # accepted: a connection now
            own.cancel_scope.cancel()
        assert s.router.routes == 0
        assert s.gate.capacity.total == 0


async def test_an_accepted_handshake_frees_its_handshake_slot_before_its_101_goes_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The handshake limits bound reading and judging requests. A connection
    # accepted and still being made routable (a cluster's wait for Redis), or
    # whose 101 waits for room, counts as a connection, not as a handshake.
    async with scene(max_handshakes_per_ip=1) as s:
        held = Held()
        s.nursery.start_soon(s.gate, held)
        request = wire.upgrade_request(extra=[("Sec-WebSocket-Protocol", "relayd.v1")])
        await held.client.send_all(request)
        await trio.testing.wait_all_tasks_blocked()  # accepted, its 101 waiting
        client, server = trio.testing.memory_stream_pair()
        s.nursery.start_soon(s.gate, server)
        await client.send_all(request)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := await client.receive_some()):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 101 ")


async def test_a_drain_closes_echo_connections_with_1001_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scene() as s:
        await s.nursery.start(s.router.run)
        echo, _ = await s.open(v1=False, path="/echo")
        await echo.send_all(wire.frame(OP_TEXT, b"hi"))
        assert await frames_now(echo) == [(OP_TEXT, b"hi")]
        started = trio.current_time()
        s.gate.drain()
        s.router.close()
        frames = await frames_until_close(echo)
        assert frames[-1] == (OP_CLOSE, (1001).to_bytes(2, "big") + b"server shutting down")
        assert trio.current_time() - started < 1.0

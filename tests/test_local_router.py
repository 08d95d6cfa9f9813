"""Tests for relayd.routing.local.LocalRouter, driven with real outboxes and no sockets.

The router task is started with ``nursery.start``; ``wait_all_tasks_blocked``
tells when it has handled everything queued (it wakes before an autojump clock
would move), so nothing sleeps. Wherever a task could hang, a ``fail_after``
bounds it. Slow-consumer deadlines are read on ``autojump_clock``, where time
moves only when the test jumps it or every task is idle.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import msgspec
import pytest
import structlog
import trio
import trio.testing
from structlog.typing import EventDict

from relayd.errors import RouterClosed
from relayd.routing.interface import Peer, Relay, Reply
from relayd.routing.local import LocalRouter
from relayd.routing.outbox import Outbox
from relayd.wire.dialects import Dialect, decode_envelope
from relayd.wire.frames import text_frame
from tests.wire import text_of

TIMEOUT_S = 5.0  # the outboxes' slow_consumer_timeout_s
TEST_LIMIT_S = 10.0  # trio-clock limit on anything that could hang
CONN_NUMBERS = itertools.count(1)


class Conn:
    """One fake connection: its peer and the deadlines its outbox reported."""

    def __init__(self, client_id: str, dialect: Dialect, capacity: int = 8) -> None:
        self.deadlines: list[float] = []
        outbox = Outbox(capacity, TIMEOUT_S, self.deadlines.append)
        self.peer = Peer(client_id, dialect, outbox, next(CONN_NUMBERS))

    def frames(self) -> list[str]:
        """Take every frame waiting in the outbox (closed or not); all are text here."""
        return [text_of(frame) for frame in self.peer.outbox.take_nowait()]


def relay(sender: Conn, frame: str) -> Relay:
    return Relay(sender.peer, decode_envelope(frame), len(frame.encode()), trio.current_time())


@pytest.fixture
def logs() -> Iterator[list[EventDict]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


@asynccontextmanager
async def running(router: LocalRouter) -> AsyncIterator[None]:
    """Run the router task for the block; close it and wait for it after."""
    with trio.fail_after(TEST_LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(router.run)
            yield
            router.close()


async def route(router: LocalRouter, *items: Relay | Reply) -> None:
    """Queue items, one batch each, and wait until the router has handled all of them.

    Each item gets the reply slot its sender's reader would reserve for it.
    """
    for item in items:
        assert (item.sender if isinstance(item, Relay) else item.recipient).outbox.reserve(1)
        await router.route([item])
    await trio.testing.wait_all_tasks_blocked()


def new_router(*, log_messages: bool = True, log_bodies: bool = False) -> LocalRouter:
    return LocalRouter(structlog.get_logger(), log_messages=log_messages, log_bodies=log_bodies)


async def test_relay_to_seed_and_v1_recipients_in_their_formats(
    logs: list[EventDict],
) -> None:
    router = new_router()
    alice, bob, carol = (
        Conn("alice", Dialect.V1),
        Conn("bob", Dialect.SEED),
        Conn("carol", Dialect.V1),
    )
    for conn in (alice, bob, carol):
        router.register(conn.peer)
    async with running(router):
        await route(
            router,
            relay(alice, '{"to": "bob", "message": "hi bob"}'),
            relay(alice, '{"to": "bob", "message": {"n": [1, 2]}}'),
            relay(alice, '{"to": "carol", "message": {"n": [1, 2]}}'),
        )
    assert bob.frames() == ["hi bob", '{"n": [1, 2]}']
    assert carol.frames() == ['{"type":"message","from":"alice","message":{"n": [1, 2]}}']
    assert alice.frames() == []  # no ref, so no ack


async def test_seed_sender_to_v1_recipient(logs: list[EventDict]) -> None:
    router = new_router()
    sam, vera = Conn("sam", Dialect.SEED), Conn("vera", Dialect.V1)
    router.register(sam.peer)
    router.register(vera.peer)
    async with running(router):
        await route(router, relay(sam, '{"to": "vera", "message": "yo", "ref": 1}'))
    assert [json.loads(f) for f in vera.frames()] == [
        {"type": "message", "from": "sam", "message": "yo"}
    ]
    assert sam.frames() == []  # the seed dialect has no acks


@pytest.mark.parametrize("ref", ['"r-1"', "0", "42"])
async def test_ack_to_v1_sender_when_ref_given(ref: str, logs: list[EventDict]) -> None:
    router = new_router()
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.SEED)
    router.register(alice.peer)
    router.register(bob.peer)
    async with running(router):
        await route(router, relay(alice, f'{{"to": "bob", "message": 1, "ref": {ref}}}'))
    assert [json.loads(f) for f in alice.frames()] == [{"type": "ack", "ref": json.loads(ref)}]
    assert bob.frames() == ["1"]


@pytest.mark.parametrize(
    ("dialect", "frame", "expected"),
    [
        (Dialect.V1, '{"to": "nobody", "message": 1}', {"type": "error", "ref": None}),
        (Dialect.V1, '{"to": "nobody", "message": 1, "ref": 7}', {"type": "error", "ref": 7}),
        (Dialect.SEED, '{"to": "nobody", "message": 1}', {}),
        (Dialect.SEED, '{"to": "nobody", "message": 1, "ref": "x"}', {"ref": "x"}),
    ],
)
async def test_unknown_recipient_error_to_sender(
    dialect: Dialect, frame: str, expected: dict[str, object], logs: list[EventDict]
) -> None:
    router = new_router()
    alice = Conn("alice", dialect)
    router.register(alice.peer)
    async with running(router):
        await route(router, relay(alice, frame))
    [reply] = [json.loads(f) for f in alice.frames()]
    assert reply == {
        "error": "unknown_recipient",
        "detail": "no client with that id is connected",
        **expected,
    }


async def test_full_outbox_busy_then_deadline_cleared(
    autojump_clock: trio.testing.MockClock, logs: list[EventDict]
) -> None:
    router = new_router()
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.SEED, capacity=1)
    router.register(alice.peer)
    router.register(bob.peer)
    async with running(router):
        started = trio.current_time()
        await route(router, relay(alice, '{"to": "bob", "message": 1, "ref": "a"}'))
        await route(router, relay(alice, '{"to": "bob", "message": 2, "ref": "b"}'))
        await route(router, relay(alice, '{"to": "bob", "message": 3, "ref": "c"}'))
        assert bob.deadlines == [started + TIMEOUT_S]  # once, when it started refusing
        assert [json.loads(f) for f in alice.frames()] == [
            {"type": "ack", "ref": "a"},
            {
                "type": "error",
                "error": "recipient_busy",
                "ref": "b",
                "detail": "the recipient is not reading fast enough; try again later",
            },
            {
                "type": "error",
                "error": "recipient_busy",
                "ref": "c",
                "detail": "the recipient is not reading fast enough; try again later",
            },
        ]

        autojump_clock.jump(1.0)
        assert bob.frames() == ["1"]  # the writer takes what waits: the clock stops
        await route(router, relay(alice, '{"to": "bob", "message": 4, "ref": "d"}'))
        assert bob.deadlines == [started + TIMEOUT_S, math.inf]
        assert [json.loads(f) for f in alice.frames()] == [{"type": "ack", "ref": "d"}]
        assert bob.frames() == ["4"]


async def test_every_peer_under_one_id_receives(logs: list[EventDict]) -> None:
    router = new_router()
    alice = Conn("alice", Dialect.V1)
    tabs = [Conn("bob", Dialect.SEED), Conn("bob", Dialect.V1), Conn("bob", Dialect.SEED)]
    for conn in (alice, *tabs):
        router.register(conn.peer)
    assert router.routes == 2
    async with running(router):
        await route(router, relay(alice, '{"to": "bob", "message": "hey", "ref": 5}'))
    assert [tab.frames() for tab in tabs] == [
        ["hey"],
        ['{"type":"message","from":"alice","message":"hey"}'],
        ["hey"],
    ]
    assert [json.loads(f) for f in alice.frames()] == [{"type": "ack", "ref": 5}]


async def test_one_busy_peer_under_an_id_still_delivers(logs: list[EventDict]) -> None:
    router = new_router()
    alice = Conn("alice", Dialect.V1)
    stuck, reading = Conn("bob", Dialect.SEED, capacity=1), Conn("bob", Dialect.SEED)
    for conn in (alice, stuck, reading):
        router.register(conn.peer)
    assert stuck.peer.outbox.offer(text_frame(b"filler"))
    async with running(router):
        await route(router, relay(alice, '{"to": "bob", "message": 1, "ref": 1}'))
    assert (stuck.frames(), reading.frames()) == (["filler"], ["1"])
    assert [json.loads(f) for f in alice.frames()] == [{"type": "ack", "ref": 1}]
    assert logs[-1]["outcome"] == "delivered"


async def test_unregistered_peer_no_longer_receives(logs: list[EventDict]) -> None:
    router = new_router()
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.SEED)
    router.register(alice.peer)
    router.register(bob.peer)
    router.unregister(bob.peer)
    router.unregister(bob.peer)  # idempotent
    assert router.routes == 1
    async with running(router):
        await route(router, relay(alice, '{"to": "bob", "message": 1}'))
    [reply] = [json.loads(f) for f in alice.frames()]
    assert reply["error"] == "unknown_recipient"
    assert bob.peer.outbox.closed
    assert bob.frames() == []


async def test_reply_goes_to_its_recipient_outbox(logs: list[EventDict]) -> None:
    router = new_router()
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.V1)
    router.register(alice.peer)
    router.register(bob.peer)
    async with running(router):
        await route(
            router, Reply(bob.peer, text_frame(b"frame-1")), Reply(bob.peer, text_frame(b"frame-2"))
        )
    assert bob.frames() == ["frame-1", "frame-2"]
    assert alice.frames() == []
    assert logs == []  # replies are not relayed messages


async def test_close_then_run_delivers_queued_and_closes_outboxes(
    logs: list[EventDict],
) -> None:
    router = new_router()
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.SEED)
    router.register(alice.peer)
    router.register(bob.peer)
    await router.route([relay(alice, '{"to": "bob", "message": "last", "ref": "r"}')])
    await router.route([Reply(alice.peer, text_frame(b"reply"))])
    router.close()
    with trio.fail_after(TEST_LIMIT_S):
        await router.run()
    assert (bob.peer.outbox.closed, alice.peer.outbox.closed) == (True, True)
    assert bob.frames() == ["last"]
    assert alice.frames() == ['{"type":"ack","ref":"r"}', "reply"]
    assert router.routes == 0


async def test_route_after_close_raises(logs: list[EventDict]) -> None:
    router = new_router()
    alice = Conn("alice", Dialect.V1)
    router.register(alice.peer)
    router.close()
    with pytest.raises(RouterClosed):
        await router.route([Reply(alice.peer, text_frame(b"late"))])


async def test_route_waiting_on_a_full_inbox_raises_when_closed(logs: list[EventDict]) -> None:
    router = LocalRouter(structlog.get_logger(), inbox_size=1)
    alice = Conn("alice", Dialect.V1)
    await router.route([Reply(alice.peer, text_frame(b"queued"))])
    raised: list[type[BaseException]] = []

    async def blocked_sender() -> None:
        with pytest.raises(RouterClosed) as info:
            await router.route([Reply(alice.peer, text_frame(b"waiting"))])
        raised.append(info.type)

    with trio.fail_after(TEST_LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_sender)
            await trio.testing.wait_all_tasks_blocked()
            router.close()
    assert raised == [RouterClosed]


async def test_register_after_close_raises(logs: list[EventDict]) -> None:
    router = new_router()
    router.close()
    with pytest.raises(RouterClosed):
        router.register(Conn("alice", Dialect.V1).peer)
    assert router.routes == 0


@pytest.mark.parametrize(
    ("frame", "outcome"),
    [
        ('{"to": "bob", "message": {"secret": "s3cr3t"}}', "delivered"),
        ('{"to": "nobody", "message": {"secret": "s3cr3t"}}', "unknown_recipient"),
        ('{"to": "stuck", "message": {"secret": "s3cr3t"}}', "recipient_busy"),
    ],
)
async def test_message_relay_log_event_has_no_body(
    frame: str, outcome: str, logs: list[EventDict]
) -> None:
    router = new_router()
    alice, bob, stuck = (
        Conn("alice", Dialect.V1),
        Conn("bob", Dialect.SEED),
        Conn("stuck", Dialect.V1, capacity=1),
    )
    for conn in (alice, bob, stuck):
        router.register(conn.peer)
    assert stuck.peer.outbox.offer(text_frame(b"filler"))
    item = relay(alice, frame)
    async with running(router):
        await route(router, item)
    assert logs == [
        {
            "event": "message.relay",
            "log_level": "info",
            "from": "alice",
            "to": json.loads(frame)["to"],
            "bytes": len(frame),
            "outcome": outcome,
        }
    ]
    assert "s3cr3t" not in repr(logs)


async def test_message_relay_log_event_with_body(logs: list[EventDict]) -> None:
    router = new_router(log_bodies=True)
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.SEED)
    router.register(alice.peer)
    router.register(bob.peer)
    frame = '{"to": "bob", "message": {"k": "é"}}'
    async with running(router):
        await route(router, relay(alice, frame))
    assert logs == [
        {
            "event": "message.relay",
            "log_level": "info",
            "from": "alice",
            "to": "bob",
            "bytes": len(frame.encode()),
            "outcome": "delivered",
            "body": '{"k": "é"}',
        }
    ]


async def test_no_log_events_when_message_logging_is_off(logs: list[EventDict]) -> None:
    router = new_router(log_messages=False, log_bodies=True)
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.SEED)
    router.register(alice.peer)
    router.register(bob.peer)
    async with running(router):
        await route(router, relay(alice, '{"to": "bob", "message": 1}'))
    assert bob.frames() == ["1"]
    assert logs == []


async def test_relay_keeps_message_bytes_as_sent(logs: list[EventDict]) -> None:
    router = new_router()
    alice, bob = Conn("alice", Dialect.SEED), Conn("bob", Dialect.V1)
    router.register(alice.peer)
    router.register(bob.peer)
    message = '[ 1.50 , "\\u00e9" , {"a" :null} ]'
    async with running(router):
        await route(router, relay(alice, f'{{"to": "bob", "message": {message}}}'))
    [frame] = bob.frames()
    assert frame.endswith(f'"message":{message}}}')
    assert msgspec.json.decode(frame)["message"] == [1.5, "é", {"a": None}]

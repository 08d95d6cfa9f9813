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
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import msgspec
import pytest
import structlog
import trio
import trio.testing
from structlog.typing import EventDict

from relayd.errors import RouterClosed
from relayd.routing.interface import Relay, Reply
from relayd.routing.local import PROBE_EVERY, LocalRouter
from relayd.routing.outbox import Offer, Outbox
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from relayd.wire.dialects import Dialect, decode_envelope
from relayd.wire.server_frames import text_frame
from tests.wire import text_of

TEST_LIMIT_S = 10.0  # trio-clock limit on anything that could hang
CONN_NUMBERS = itertools.count(1)


class Conn:
    """One fake connection: a Peer around a real outbox, recording what the router did."""

    def __init__(self, client_id: str, dialect: Dialect, capacity: int = 8) -> None:
        self.client_id = client_id
        self.dialect = dialect
        self.conn = next(CONN_NUMBERS)
        self.outbox = Outbox(capacity)
        self.detached = False
        self.full = False  # a delivery was refused for want of room
        self.disconnected: list[tuple[int, str]] = []

    @property
    def peer(self) -> Conn:
        return self

    def deliver(self, frame: bytes) -> bool:
        offered = self.outbox.offer(frame)
        self.full = offered is Offer.FULL
        return offered is Offer.QUEUED

    def reply(self, frame: bytes | None) -> None:
        self.outbox.reply(frame)

    def detach(self) -> None:
        self.detached = True
        self.outbox.close()

    def disconnect(self, code: int, reason: str) -> None:
        self.disconnected.append((code, reason))

    def frames(self) -> list[str]:
        """Take every frame waiting in the outbox (closed or not); all are text here."""
        return [text_of(frame) for frame in self.outbox.take()]


def every_item_answered(conn: Conn) -> bool:
    """Whether the router answered each item of ``conn``'s (a reply or None) exactly once."""
    conn.outbox.close()
    return conn.outbox.settled and conn.outbox.dropped == 0


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
        peer = item.sender if isinstance(item, Relay) else item.recipient
        assert isinstance(peer, Conn)
        assert peer.outbox.reserve(1)
        await router.route([item])
    await trio.testing.wait_all_tasks_blocked()


def new_router(
    *, log_messages: bool = True, log_bodies: bool = False, inbox_size: int = 256
) -> LocalRouter:
    stats = Stats()
    events = MessageEvents(
        structlog.get_logger(), stats, messages="all" if log_messages else "off", bodies=log_bodies
    )
    return LocalRouter(events, stats, inbox_size=inbox_size)


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
        await router.register(conn.peer)
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
    assert every_item_answered(alice)


async def test_seed_sender_to_v1_recipient(logs: list[EventDict]) -> None:
    router = new_router()
    sam, vera = Conn("sam", Dialect.SEED), Conn("vera", Dialect.V1)
    await router.register(sam.peer)
    await router.register(vera.peer)
    async with running(router):
        await route(router, relay(sam, '{"to": "vera", "message": "yo", "ref": 1}'))
    assert [json.loads(f) for f in vera.frames()] == [
        {"type": "message", "from": "sam", "message": "yo"}
    ]
    assert sam.frames() == []  # the seed dialect has no acks
    assert every_item_answered(sam)


@pytest.mark.parametrize("ref", ['"r-1"', "0", "42"])
async def test_ack_to_v1_sender_when_ref_given(ref: str, logs: list[EventDict]) -> None:
    router = new_router()
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.SEED)
    await router.register(alice.peer)
    await router.register(bob.peer)
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
    await router.register(alice.peer)
    async with running(router):
        await route(router, relay(alice, frame))
    [reply] = [json.loads(f) for f in alice.frames()]
    assert reply == {
        "error": "unknown_recipient",
        "detail": "no client with that id is connected",
        **expected,
    }


async def test_full_outbox_busy_until_its_writer_takes(logs: list[EventDict]) -> None:
    router = new_router()
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.SEED, capacity=1)
    await router.register(alice.peer)
    await router.register(bob.peer)
    async with running(router):
        await route(router, relay(alice, '{"to": "bob", "message": 1, "ref": "a"}'))
        assert not bob.full
        await route(router, relay(alice, '{"to": "bob", "message": 2, "ref": "b"}'))
        await route(router, relay(alice, '{"to": "bob", "message": 3, "ref": "c"}'))
        assert bob.full  # its connection's slow-consumer clock runs
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

        assert bob.frames() == ["1"]  # the writer takes what waits: room again
        await route(router, relay(alice, '{"to": "bob", "message": 4, "ref": "d"}'))
        assert not bob.full
        assert [json.loads(f) for f in alice.frames()] == [{"type": "ack", "ref": "d"}]
        assert bob.frames() == ["4"]


async def test_every_peer_under_one_id_receives(logs: list[EventDict]) -> None:
    router = new_router()
    alice = Conn("alice", Dialect.V1)
    tabs = [Conn("bob", Dialect.SEED), Conn("bob", Dialect.V1), Conn("bob", Dialect.SEED)]
    for conn in (alice, *tabs):
        await router.register(conn.peer)
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
        await router.register(conn.peer)
    assert stuck.peer.outbox.offer(text_frame(b"filler"))
    async with running(router):
        await route(router, relay(alice, '{"to": "bob", "message": 1, "ref": 1}'))
    assert (stuck.frames(), reading.frames()) == (["filler"], ["1"])
    assert [json.loads(f) for f in alice.frames()] == [{"type": "ack", "ref": 1}]
    assert logs[-1]["outcome"] == "delivered"


async def test_unregistered_peer_no_longer_receives(logs: list[EventDict]) -> None:
    router = new_router()
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.SEED)
    await router.register(alice.peer)
    await router.register(bob.peer)
    router.unregister(bob.peer)
    router.unregister(bob.peer)  # idempotent
    assert router.routes == 1
    async with running(router):
        await route(router, relay(alice, '{"to": "bob", "message": 1}'))
    [reply] = [json.loads(f) for f in alice.frames()]
    assert reply["error"] == "unknown_recipient"
    assert bob.frames() == []
    assert not bob.detached  # its connection closes its own outbox


async def test_reply_goes_to_its_recipient_outbox(logs: list[EventDict]) -> None:
    router = new_router()
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.V1)
    await router.register(alice.peer)
    await router.register(bob.peer)
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
    await router.register(alice.peer)
    await router.register(bob.peer)
    assert alice.outbox.reserve(2)  # as its reader would, one slot per item
    await router.route([relay(alice, '{"to": "bob", "message": "last", "ref": "r"}')])
    await router.route([Reply(alice.peer, text_frame(b"reply"))])
    router.close()
    with trio.fail_after(TEST_LIMIT_S):
        await router.run()
    assert (bob.detached, alice.detached) == (True, True)
    assert bob.frames() == ["last"]
    assert alice.frames() == ['{"type":"ack","ref":"r"}', "reply"]
    assert (alice.outbox.settled, bob.outbox.settled) == (True, True)  # every slot answered
    assert router.routes == 0


async def test_route_after_close_raises(logs: list[EventDict]) -> None:
    router = new_router()
    alice = Conn("alice", Dialect.V1)
    await router.register(alice.peer)
    router.close()
    with pytest.raises(RouterClosed):
        await router.route([Reply(alice.peer, text_frame(b"late"))])


async def test_route_waiting_on_a_full_inbox_raises_when_closed(logs: list[EventDict]) -> None:
    router = new_router(inbox_size=1)
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


async def test_try_route_takes_what_the_inbox_has_room_for_and_never_waits(
    logs: list[EventDict],
) -> None:
    router = new_router(inbox_size=1)
    alice = Conn("alice", Dialect.V1)
    assert alice.outbox.reserve(2)
    assert router.try_route([Reply(alice.peer, text_frame(b"one"))])
    assert not router.try_route([Reply(alice.peer, text_frame(b"two"))])  # full: not taken
    router.close()
    with pytest.raises(RouterClosed):
        router.try_route([Reply(alice.peer, text_frame(b"late"))])
    with trio.fail_after(TEST_LIMIT_S):
        await router.run()
    assert alice.frames() == ["one"]


def reserve_and_try(router: LocalRouter, sender: Conn, text: str) -> bool:
    """A reader's hand-over of one message without a wait: its reply slot, then try_route."""
    assert sender.outbox.reserve(1)
    return router.try_route([relay(sender, f'{{"to": "bob", "message": "{text}"}}')])


async def test_sparse_batches_are_routed_at_once_in_order_and_probed(
    logs: list[EventDict],
) -> None:
    router = new_router()
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.SEED, capacity=64)
    await router.register(alice.peer)
    await router.register(bob.peer)
    async with running(router):
        # Before any pass the router does not know traffic is sparse: queued.
        assert reserve_and_try(router, alice, "queued")
        assert bob.frames() == []
        await trio.testing.wait_all_tasks_blocked()
        assert bob.frames() == ["queued"]  # a pass of one batch: traffic is sparse
        # Routed at once, in this task: delivered and logged before any checkpoint.
        for n in range(PROBE_EVERY - 1):
            assert reserve_and_try(router, alice, f"now {n}")
            assert bob.frames() == [f"now {n}"]
            assert len([e for e in logs if e["event"] == "message.relay"]) == n + 2
        # One in PROBE_EVERY goes through the routing task, and a batch handed
        # after it is never routed ahead of it.
        assert reserve_and_try(router, alice, "probe")
        assert reserve_and_try(router, alice, "behind the probe")
        assert bob.frames() == []
        await trio.testing.wait_all_tasks_blocked()
        assert bob.frames() == ["probe", "behind the probe"]
        # That pass took two batches: no longer sparse, so the next is queued.
        assert reserve_and_try(router, alice, "queued again")
        assert bob.frames() == []
        await trio.testing.wait_all_tasks_blocked()
        assert bob.frames() == ["queued again"]
        # ... and, its pass alone, the one after that is routed at once again.
        assert reserve_and_try(router, alice, "at once again")
        assert bob.frames() == ["at once again"]
    assert every_item_answered(alice)
    delivered = [e for e in logs if e["event"] == "message.relay"]
    assert len(delivered) == PROBE_EVERY + 4
    assert {e["outcome"] for e in delivered} == {"delivered"}


async def test_a_batch_handed_over_by_route_is_not_overtaken(logs: list[EventDict]) -> None:
    router = new_router()
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.SEED, capacity=64)
    await router.register(alice.peer)
    await router.register(bob.peer)
    async with running(router):
        await route(router, relay(alice, '{"to": "bob", "message": "first"}'))
        assert bob.frames() == ["first"]  # sparse from here
        assert alice.outbox.reserve(1)
        await router.route([relay(alice, '{"to": "bob", "message": "handed over"}')])
        # The routing task has it but has not run: nothing is routed ahead of it.
        assert reserve_and_try(router, alice, "after it")
        await trio.testing.wait_all_tasks_blocked()
        assert bob.frames() == ["handed over", "after it"]
    assert every_item_answered(alice)


async def test_readers_in_one_round_queue_behind_the_probe_and_end_sparse_routing(
    logs: list[EventDict],
) -> None:
    router = new_router()
    bob = Conn("bob", Dialect.SEED, capacity=64)
    senders = [Conn(f"s{n}", Dialect.V1) for n in range(3)]
    for conn in (bob, *senders):
        await router.register(conn.peer)
    async with running(router):
        await route(router, relay(senders[0], '{"to": "bob", "message": "first"}'))
        for n in range(PROBE_EVERY - 1):  # sparse: each routed at once
            assert reserve_and_try(router, senders[0], f"alone {n}")
        assert len(bob.frames()) == PROBE_EVERY
        # Three readers with a batch each in one scheduling round: the first is
        # the probe, the others queue behind it, all routed in one pass, in order.
        for sender in senders:
            assert reserve_and_try(router, sender, sender.client_id)
        assert bob.frames() == []
        await trio.testing.wait_all_tasks_blocked()
        assert bob.frames() == ["s0", "s1", "s2"]
        # Traffic is no longer sparse: the next batch is queued, not routed at once.
        assert reserve_and_try(router, senders[1], "queued")
        assert bob.frames() == []
        await trio.testing.wait_all_tasks_blocked()
        assert bob.frames() == ["queued"]
    assert all(every_item_answered(sender) for sender in senders)


async def test_try_route_after_close_raises_even_when_sparse(logs: list[EventDict]) -> None:
    router = new_router()
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.SEED)
    await router.register(alice.peer)
    await router.register(bob.peer)
    async with running(router):
        await route(router, relay(alice, '{"to": "bob", "message": "first"}'))
        router.close()
        with pytest.raises(RouterClosed):
            reserve_and_try(router, alice, "late")
    assert bob.frames() == ["first"]


async def test_register_after_close_raises(logs: list[EventDict]) -> None:
    router = new_router()
    router.close()
    with pytest.raises(RouterClosed):
        await router.register(Conn("alice", Dialect.V1).peer)
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
        await router.register(conn.peer)
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
    await router.register(alice.peer)
    await router.register(bob.peer)
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
    await router.register(alice.peer)
    await router.register(bob.peer)
    async with running(router):
        await route(router, relay(alice, '{"to": "bob", "message": 1}'))
    assert bob.frames() == ["1"]
    assert logs == []


async def test_relay_keeps_message_bytes_as_sent(logs: list[EventDict]) -> None:
    router = new_router()
    alice, bob = Conn("alice", Dialect.SEED), Conn("bob", Dialect.V1)
    await router.register(alice.peer)
    await router.register(bob.peer)
    message = '[ 1.50 , "\\u00e9" , {"a" :null} ]'
    async with running(router):
        await route(router, relay(alice, f'{{"to": "bob", "message": {message}}}'))
    [frame] = bob.frames()
    assert frame.endswith(f'"message":{message}}}')
    assert msgspec.json.decode(frame)["message"] == [1.5, "é", {"a": None}]


# --- what the server API asks of a router -------------------------------------------------------


async def test_publish_reaches_every_holder_in_its_dialect_and_is_logged(
    logs: list[EventDict],
) -> None:
    router = new_router()
    tabs = [Conn("bob", Dialect.SEED), Conn("bob", Dialect.V1)]
    for tab in tabs:
        await router.register(tab)
    outcome = await router.publish("bob", msgspec.Raw(b'{"n":1}'), sender="backend")
    assert outcome == "delivered"
    assert [tab.frames() for tab in tabs] == [
        ['{"n":1}'],
        ['{"type":"message","from":"backend","message":{"n":1}}'],
    ]
    assert [(e["from"], e["to"], e["outcome"]) for e in logs] == [("backend", "bob", "delivered")]


async def test_publish_to_nobody_or_to_a_full_outbox_says_so(logs: list[EventDict]) -> None:
    router = new_router()
    stuck = Conn("stuck", Dialect.SEED, capacity=1)
    await router.register(stuck)
    assert stuck.deliver(text_frame(b"filler"))
    assert await router.publish("nobody", msgspec.Raw(b"1"), sender="api") == "unknown_recipient"
    assert await router.publish("stuck", msgspec.Raw(b"1"), sender="api") == "recipient_busy"
    assert stuck.frames() == ["filler"]


async def test_disconnect_closes_every_connection_of_the_id_and_counts_them() -> None:
    router = new_router()
    tabs = [Conn("bob", Dialect.SEED), Conn("bob", Dialect.V1)]
    other = Conn("carol", Dialect.V1)
    for conn in (*tabs, other):
        await router.register(conn)
    assert await router.disconnect("bob", 1008, "banned") == 2
    assert [tab.disconnected for tab in tabs] == [[(1008, "banned")]] * 2
    assert other.disconnected == []
    assert await router.disconnect("nobody", 1000, "") == 0


async def test_presence_counts_the_connections_holding_an_id() -> None:
    router = new_router()
    tabs = [Conn("bob", Dialect.SEED), Conn("bob", Dialect.V1)]
    for tab in tabs:
        await router.register(tab)
    assert await router.presence("bob") == 2
    router.unregister(tabs[0])
    assert await router.presence("bob") == 1
    assert await router.presence("nobody") == 0


async def test_list_ids_pages_in_sorted_order() -> None:
    router = new_router()
    for name in ("delta", "alpha", "charlie", "bravo", "alpha"):
        await router.register(Conn(name, Dialect.V1))
    assert await router.list_ids(after=None, limit=2) == ["alpha", "bravo"]
    assert await router.list_ids(after="bravo", limit=2) == ["charlie", "delta"]
    assert await router.list_ids(after="b", limit=10) == ["bravo", "charlie", "delta"]
    assert await router.list_ids(after="delta", limit=2) == []

"""The cluster router across two nodes sharing a real redis-server: what senders hear.

Two :class:`ClusterRouter` instances in one trio run stand for two nodes;
connections are real outboxes, as in tests/test_local_router.py. Each test
waits for the frames it expects (an outbox's writer side parks until frames
arrive), bounded by a trio-clock ``fail_after``.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import structlog
import trio
import trio.testing

from relayd.config import ClusterSettings
from relayd.config_sources import Loaded
from relayd.daemon.reload import FileRead
from relayd.daemon.server import Server
from relayd.daemon.service import run_daemon
from relayd.errors import BrokerUnavailable, IncompleteAnswer
from relayd.policy.auth import Authenticator
from relayd.routing.cluster import codec
from relayd.routing.cluster.link import Health
from relayd.routing.cluster.redis import RedisLink
from relayd.routing.cluster.router import ClusterRouter
from relayd.routing.interface import Relay
from relayd.routing.outbox import Offer, Outbox
from relayd.routing.table import Outcome
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from relayd.wire.dialects import Dialect, decode_envelope
from tests.client import settings
from tests.redis_server import RedisServer
from tests.test_api import call, raw
from tests.test_cluster_link import metric
from tests.test_service import Notifications
from tests.wire import text_of

FAST: dict[str, Any] = {
    "probe_interval_s": 0.05,
    "probe_timeout_s": 0.3,
    "node_timeout_s": 0.5,
    "reconnect_max_s": 0.2,
    "connect_timeout_s": 1.0,
    "reply_timeout_s": 0.5,
}
LIMIT_S = 10.0
UNREACHABLE = "the recipient may be on a node this one cannot reach now; not delivered, try again"
CONN_NUMBERS = itertools.count(1)


class Conn:
    """One connection as the router sees it (a Peer) around a real outbox, awaitable."""

    def __init__(self, client_id: str, dialect: Dialect = Dialect.V1, capacity: int = 8) -> None:
        self.client_id = client_id
        self.dialect = dialect
        self.conn = next(CONN_NUMBERS)
        self.outbox = Outbox(capacity)
        self.disconnected: list[tuple[int, str]] = []
        self.detached = trio.Event()
        self._arrived = trio.lowlevel.ParkingLot()

    @property
    def peer(self) -> Conn:
        return self

    def deliver(self, frame: bytes) -> bool:
        taken = self.outbox.offer(frame) is Offer.QUEUED
        self._arrived.unpark_all()
        return taken

    def reply(self, frame: bytes | None) -> None:
        self.outbox.reply(frame)
        self._arrived.unpark_all()

    def detach(self) -> None:
        self.outbox.close()
        self.detached.set()

    def disconnect(self, code: int, reason: str) -> None:
        self.disconnected.append((code, reason))
        self._arrived.unpark_all()

    async def disconnection(self) -> tuple[int, str]:
        """Wait until the router disconnects it; the first code and reason."""
        while not self.disconnected:
            await self._arrived.park()
        return self.disconnected[0]

    async def frames(self, count: int = 1) -> list[Any]:
        """Wait for ``count`` frames and return them decoded (JSON, or the text)."""
        got: list[Any] = []
        while len(got) < count:
            taken = self.outbox.take()
            if not taken:
                await self._arrived.park()
            for frame in taken:
                text = text_of(frame)
                try:
                    got.append(json.loads(text))
                except ValueError:
                    got.append(text)
        return got


def up(health: Health) -> bool:
    return health.up


class Node:
    """A cluster router running in a nursery, with a handle on its link."""

    def __init__(self, router: ClusterRouter) -> None:
        self.router = router

    @property
    def link(self) -> RedisLink:
        """The node's link, when it is the real one."""
        link = self.router.link
        assert isinstance(link, RedisLink)
        return link

    async def connect(self, conn: Conn) -> Conn:
        await self.router.register(conn.peer)
        return conn

    async def send(
        self, sender: Conn, to: str, message: Any = "hi", ref: str | None = "r1"
    ) -> None:
        envelope: dict[str, Any] = {"to": to, "message": message}
        if ref is not None:
            envelope["ref"] = ref
        frame = json.dumps(envelope)
        assert sender.peer.outbox.reserve(1)
        await self.router.route(
            [Relay(sender.peer, decode_envelope(frame), len(frame), trio.current_time())]
        )


@asynccontextmanager
async def node(
    url: str, name: str, *, shared_ids: bool = False, **settings: Any
) -> AsyncIterator[Node]:
    config = ClusterSettings(enabled=True, broker_url=url, **{**FAST, **settings})
    log = structlog.get_logger()

    def link(router: ClusterRouter, channels: codec.Channels) -> RedisLink:
        return RedisLink(config, node=name, channels=channels, receiver=router, log=log)

    stats = Stats()
    router = ClusterRouter(
        config,
        node=name,
        link_factory=link,
        events=MessageEvents(log, stats),
        stats=stats,
        shared_ids=lambda: shared_ids,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        running = Node(router)
        await running.link.wait_for(up)
        yield running
        router.close()


@asynccontextmanager
async def two_nodes(
    redis: RedisServer, *, shared_ids: bool = False
) -> AsyncIterator[tuple[Node, Node]]:
    async with (
        node(redis.url, "n1", shared_ids=shared_ids) as one,
        node(redis.url, "n2", shared_ids=shared_ids) as two,
    ):
        yield one, two


async def test_a_message_to_another_node_is_delivered_and_acked(redis_server: RedisServer) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server) as (one, two):
            alice = await one.connect(Conn("alice"))
            bob = await two.connect(Conn("bob"))
            seed = await two.connect(Conn("carol", Dialect.SEED))
            await one.send(alice, "bob", {"text": "hello"}, ref="m1")
            await one.send(alice, "carol", "plain text", ref=None)
            assert await bob.frames() == [
                {"type": "message", "from": "alice", "message": {"text": "hello"}}
            ]
            assert await seed.frames() == ["plain text"]
            assert await alice.frames() == [{"type": "ack", "ref": "m1"}]
            assert one.router.stats.messages[Outcome.DELIVERED] == 2
            assert one.router.waiting == 0


async def test_replies_keep_the_order_their_messages_were_sent_in(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server) as (one, two):
            alice = await one.connect(Conn("alice"))
            await one.connect(Conn("near"))
            await two.connect(Conn("far"))
            await one.send(alice, "far", ref="1")  # answered after a round trip
            await one.send(alice, "near", ref="2")  # answered at once, held behind 1
            await one.send(alice, "nobody-here", ref="3")
            await one.send(alice, "near", ref="4")
            replies = await alice.frames(4)
            assert [reply["ref"] for reply in replies] == ["1", "2", "3", "4"]
            assert [reply["type"] for reply in replies] == ["ack", "ack", "error", "ack"]


async def test_nobody_holds_the_id(redis_server: RedisServer) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server) as (one, _):
            alice = await one.connect(Conn("alice"))
            await one.send(alice, "nobody", ref="m1")
            [error] = await alice.frames()
            assert error["error"] == "unknown_recipient"
            assert error["ref"] == "m1"


async def test_every_holder_full_is_recipient_busy(redis_server: RedisServer) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server) as (one, two):
            alice = await one.connect(Conn("alice", Dialect.SEED))
            bob = await two.connect(Conn("bob", capacity=1))
            await one.send(alice, "bob", "first")
            await one.send(alice, "bob", "second", ref="m2")
            assert await alice.frames() == [
                {
                    "error": "recipient_busy",
                    "detail": "the recipient is not reading fast enough; try again later",
                    "ref": "m2",
                }
            ]
            assert await bob.frames() == [{"type": "message", "from": "alice", "message": "first"}]


async def test_the_holders_own_node_first(redis_server: RedisServer) -> None:
    """A message between two clients of one node never leaves it."""
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server) as (one, _):
            alice = await one.connect(Conn("alice"))
            bob = await one.connect(Conn("bob"))
            published = one.link.health.published
            await one.send(alice, "bob", ref="m1")
            assert await alice.frames() == [{"type": "ack", "ref": "m1"}]
            assert await bob.frames() == [{"type": "message", "from": "alice", "message": "hi"}]
            assert one.link.health.published == published


async def test_a_full_holder_on_the_senders_own_node_is_busy_counted_and_never_published(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server) as (one, _):
            alice = await one.connect(Conn("alice"))
            bob = await one.connect(Conn("bob", capacity=1))
            published = one.link.health.published
            await one.send(alice, "bob", "first", ref="m1")
            await one.send(alice, "bob", "second", ref="m2")
            ack, busy = await alice.frames(2)
            assert ack == {"type": "ack", "ref": "m1"}
            assert (busy["type"], busy["error"], busy["ref"]) == ("error", "recipient_busy", "m2")
            assert await bob.frames() == [{"type": "message", "from": "alice", "message": "first"}]
            stats = one.router.stats
            assert (stats.messages["delivered"], stats.messages["recipient_busy"]) == (1, 1)
            assert stats.latency_count == 1  # the delivery's
            assert one.link.health.published == published
            assert one.router.waiting == 0


async def test_redis_down_local_delivery_goes_on_and_remote_ids_are_unreachable(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server) as (one, two):
            alice = await one.connect(Conn("alice"))
            bob = await one.connect(Conn("bob"))
            await two.connect(Conn("carol"))
            redis_server.stop()
            await one.link.wait_for(lambda health: not health.up)
            await one.send(alice, "carol", ref="far")
            await one.send(alice, "bob", ref="near")
            assert await alice.frames(2) == [
                {
                    "type": "error",
                    "error": "recipient_unreachable",
                    "ref": "far",
                    "detail": UNREACHABLE,
                },
                {"type": "ack", "ref": "near"},
            ]
            assert await bob.frames() == [{"type": "message", "from": "alice", "message": "hi"}]
            redis_server.start()
            await one.link.wait_for(up)
            await two.link.wait_for(up)
            await one.send(alice, "carol", ref="again")
            assert await alice.frames() == [{"type": "ack", "ref": "again"}]


async def test_a_holder_that_never_answers_leaves_it_unconfirmed(redis_server: RedisServer) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server) as (one, two):
            alice = await one.connect(Conn("alice"))
            await two.connect(Conn("bob"))
            # n2 stops answering (as a frozen process would): its answers go nowhere.
            two.router.link.send = lambda pairs: True  # type: ignore[method-assign]
            started = trio.current_time()
            await one.send(alice, "bob", ref="m1")
            [error] = await alice.frames()
            assert error["error"] == "delivery_unconfirmed"
            assert trio.current_time() - started >= FAST["reply_timeout_s"]


async def test_a_late_answer_meant_for_a_restarted_node_decides_nothing_of_its_successor(
    redis_server: RedisServer,
) -> None:
    """A node restarted under its name (relayd@PORT) must not take its predecessor's answers.

    Answers come back on the node's channel, named after the node, and find their
    question by its number. n2 stalls, so n1's question goes unanswered; n1 restarts
    under the same name and asks n3, which stalls too; then n2 answers its old
    question. That answer must not ack the new sender: its message never arrived.
    """
    with trio.fail_after(LIMIT_S):
        async with node(redis_server.url, "n2") as two, node(redis_server.url, "n3") as three:
            held: list[list[tuple[bytes, bytes]]] = []
            answer_later = two.router.link.send

            def hold(pairs: list[tuple[bytes, bytes]]) -> bool:
                held.append(pairs)
                return True

            two.router.link.send = hold  # type: ignore[method-assign]
            three.router.link.send = lambda pairs: True  # type: ignore[method-assign]
            await two.connect(Conn("bob"))
            await three.connect(Conn("dave"))
            async with node(redis_server.url, "n1") as one:
                alice = await one.connect(Conn("alice"))
                await one.send(alice, "bob", ref="old")
                assert [e["error"] for e in await alice.frames()] == ["delivery_unconfirmed"]
            assert held  # n2 delivered to bob and owes n1 its answer
            async with node(redis_server.url, "n1") as successor:
                carol = await successor.connect(Conn("carol"))
                await successor.send(carol, "dave", ref="new")
                await trio.testing.wait_all_tasks_blocked()
                for pairs in held:  # n2 wakes up and answers
                    assert answer_later(pairs)
                [reply] = await carol.frames()
    assert (reply["type"], reply.get("error"), reply["ref"]) == (
        "error",
        "delivery_unconfirmed",
        "new",
    )


async def test_presence_and_ids_across_nodes(redis_server: RedisServer) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server, shared_ids=True) as (one, two):
            await one.connect(Conn("subject"))
            await two.connect(Conn("subject"))
            await two.connect(Conn("subject"))
            await two.connect(Conn("other"))
            assert await one.router.presence("subject") == 3
            assert await two.router.presence("nobody") == 0
            assert await one.router.list_ids(after=None, limit=10) == ["other", "subject"]
            assert await one.router.list_ids(after="other", limit=10) == ["subject"]
            assert await two.router.list_ids(after=None, limit=1) == ["other"]


async def test_a_node_that_does_not_answer_makes_every_question_incomplete_not_a_smaller_answer(
    redis_server: RedisServer,
) -> None:
    # Counted.complete was set and never read: presence said 0 for a connected id,
    # disconnect 0 for a connection closed later, ids a page with a hole.
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server, shared_ids=True) as (one, two):
            await one.connect(Conn("subject"))
            held_there = await two.connect(Conn("subject"))
            two.router.link.send = lambda pairs: True  # type: ignore[method-assign]
            started = trio.current_time()
            with pytest.raises(IncompleteAnswer):
                await one.router.presence("subject")
            assert trio.current_time() - started >= FAST["reply_timeout_s"]
            with pytest.raises(IncompleteAnswer):
                await one.router.list_ids(after=None, limit=10)
            with pytest.raises(IncompleteAnswer, match="may still be closed"):
                await one.router.disconnect("subject", 4001, "suspended")
            assert held_there.disconnected == [(4001, "suspended")]


async def test_a_node_cut_off_from_redis_makes_every_question_incomplete_at_once(
    redis_server: RedisServer,
) -> None:
    """A live node (fresh heartbeat) that no longer listens did not receive the question.

    n3 holds the subject too and is cut off: gone from Redis without removing its
    heartbeat, as a node whose subscriber connection was cut (or that crashed) is
    until node_timeout_s. Presence answered 2 of the subject's 3 connections, the
    page of ids lacked n3's, a disconnect said 2: each a 200 with parts missing.
    Messages keep their answers: delivered where received, unreachable for nobody.
    """
    url = redis_server.url
    alive: dict[str, Any] = {"shared_ids": True, "node_timeout_s": 60.0}
    with trio.fail_after(LIMIT_S):
        async with node(url, "n1", **alive) as one, node(url, "n2", **alive) as two:
            sender = await one.connect(Conn("sender"))
            await one.connect(Conn("subject"))
            there = await two.connect(Conn("subject"))
            elsewhere = await two.connect(Conn("on-n2"))
            async with node(url, "n3", **alive) as three:
                await three.connect(Conn("subject"))
                await three.connect(Conn("on-n3"))
                assert await one.router.presence("subject") == 3
                three.link.leave = _no_leave  # type: ignore[method-assign]
            redis_server.forget_clients("relayd:n3:")
            asked = trio.current_time()
            with pytest.raises(IncompleteAnswer, match="cut off"):
                await one.router.presence("subject")
            with pytest.raises(IncompleteAnswer):
                await two.router.presence("on-n3")
            with pytest.raises(IncompleteAnswer):
                await two.router.list_ids(after=None, limit=10)
            with pytest.raises(IncompleteAnswer, match="may still be closed"):
                await one.router.disconnect("subject", 4001, "suspended")
            assert trio.current_time() - asked < FAST["reply_timeout_s"]  # not the deadline
            # A node that received it acts on it.
            assert await there.disconnection() == (4001, "suspended")
            await one.send(sender, "on-n2", ref="m1")
            await one.send(sender, "nobody", ref="m2")
            assert await sender.frames(2) == [
                {"type": "ack", "ref": "m1"},
                {"type": "error", "error": "recipient_unreachable", "ref": "m2",
                 "detail": UNREACHABLE},
            ]  # fmt: skip
            assert (await elsewhere.frames())[0]["message"] == "hi"
            # n3's heartbeat ages past node_timeout_s: gone, and the answers whole again.
            redis_server.cli("ZREM", "relayd:heartbeats", "n3")
            assert await one.router.presence("subject") == 2
            assert await two.router.list_ids(after=None, limit=10) == ["on-n2", "sender", "subject"]


async def test_a_question_waiting_when_redis_dies_is_incomplete(redis_server: RedisServer) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server) as (one, two):
            await two.connect(Conn("bob"))
            two.router.link.send = lambda pairs: True  # type: ignore[method-assign]
            async with trio.open_nursery() as nursery:
                asked: list[BaseException] = []

                async def ask() -> None:
                    try:
                        await one.router.presence("bob")
                    except IncompleteAnswer as error:
                        asked.append(error)

                nursery.start_soon(ask)
                await trio.testing.wait_all_tasks_blocked()
                started = trio.current_time()
                redis_server.stop()
            # Decided by the broken link, not by the deadline.
            assert trio.current_time() - started < FAST["reply_timeout_s"]
            redis_server.start()
    assert len(asked) == 1


async def test_with_authentication_every_connection_of_a_subject_receives(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server, shared_ids=True) as (one, two):
            here = await one.connect(Conn("subject"))
            there = await two.connect(Conn("subject", Dialect.SEED))
            sender = await one.connect(Conn("sender"))
            await one.send(sender, "subject", "to all of them", ref="m1")
            assert await sender.frames() == [{"type": "ack", "ref": "m1"}]
            expected = {"type": "message", "from": "sender", "message": "to all of them"}
            assert await here.frames() == [expected]
            assert await there.frames() == ["to all of them"]


async def test_the_server_api_publishes(redis_server: RedisServer) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server) as (one, two):
            bob = await two.connect(Conn("bob"))
            outcome = await one.router.publish("bob", msgspec.Raw(b'{"n": 1}'), sender="server")
            assert outcome is Outcome.DELIVERED
            assert await bob.frames() == [
                {"type": "message", "from": "server", "message": {"n": 1}}
            ]
            assert await one.router.publish("x", msgspec.Raw(b"1"), sender="s") is (
                Outcome.UNKNOWN_RECIPIENT
            )


async def test_after_a_script_flush_messages_are_unreachable_not_unconfirmed_then_delivered(
    redis_server: RedisServer,
) -> None:
    """Redis lost relayd's scripts (SCRIPT FLUSH): what it refused unrun was not sent.

    Its sender may retry it safely, so it hears recipient_unreachable, not
    delivery_unconfirmed; the next message goes through at once, no reconnection.
    """
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server) as (one, two):
            alice = await one.connect(Conn("alice"))
            bob = await two.connect(Conn("bob"))
            assert redis_server.cli("SCRIPT", "FLUSH") == "OK"
            await one.send(alice, "bob", "refused", ref="m1")
            assert await alice.frames() == [
                {
                    "type": "error",
                    "error": "recipient_unreachable",
                    "ref": "m1",
                    "detail": UNREACHABLE,
                }
            ]
            await one.send(alice, "bob", "after", ref="m2")
            assert await alice.frames() == [{"type": "ack", "ref": "m2"}]
            assert await bob.frames() == [{"type": "message", "from": "alice", "message": "after"}]
            messages = one.router.stats.messages
            assert (messages["recipient_unreachable"], messages["delivery_unconfirmed"]) == (1, 0)
            assert one.link.health.losses == 0


async def test_after_a_script_flush_the_server_api_is_told_nothing_was_sent(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server) as (one, two):
            bob = await two.connect(Conn("bob"))
            assert redis_server.cli("SCRIPT", "FLUSH") == "OK"
            refused = await one.router.publish("bob", msgspec.Raw(b"1"), sender="server")
            assert refused is Outcome.RECIPIENT_UNREACHABLE
            assert await one.router.publish("bob", msgspec.Raw(b"2"), sender="server") is (
                Outcome.DELIVERED
            )
            assert await bob.frames() == [{"type": "message", "from": "server", "message": 2}]
            assert redis_server.cli("SCRIPT", "FLUSH") == "OK"
            # Not asked: ask again, nothing was closed. The 503's detail (api.md) says
            # why, without claiming Redis could not be reached: it was.
            with pytest.raises(BrokerUnavailable) as refusal:
                await one.router.disconnect("bob", 4001, "bye")
            assert "Redis refused it unrun (it had lost relayd's scripts)" in str(refusal.value)
            assert "cannot be reached" not in str(refusal.value)
            assert bob.disconnected == []
            assert await one.router.presence("bob") == 1
            assert one.link.health.losses == 0


async def test_server_api_questions_while_the_link_is_down_are_no_publish_failures(
    redis_server: RedisServer,
) -> None:
    """scaling.md: while its link is known to be down a node does not try to publish."""
    with trio.fail_after(LIMIT_S):
        async with two_nodes(redis_server) as (one, _):
            redis_server.stop()
            await one.link.wait_for(lambda health: not health.up)
            for question in (
                lambda: one.router.presence("bob"),
                lambda: one.router.list_ids(after=None, limit=10),
                lambda: one.router.disconnect("bob", 4001, "bye"),
            ):
                with pytest.raises(BrokerUnavailable):
                    await question()
            assert metric(one.link.health, "relayd_cluster_publish_failures_total") == 0


async def test_a_vanished_nodes_ids_are_unreachable_then_unknown(redis_server: RedisServer) -> None:
    """A node that dies without leaving: recipient_unreachable, then unknown_recipient.

    Its ids answer recipient_unreachable until its heartbeat is older than
    node_timeout_s.
    """
    with trio.fail_after(LIMIT_S):
        async with node(redis_server.url, "n1") as one:
            alice = await one.connect(Conn("alice"))
            async with node(redis_server.url, "n2") as two:
                await two.connect(Conn("bob"))
                two.link.leave = _no_leave  # type: ignore[method-assign]
            died = trio.current_time()
            redis_server.forget_clients("relayd:n2:")
            await one.send(alice, "bob", ref="m1")
            [first] = await alice.frames()
            assert first["error"] == "recipient_unreachable"
            # The documented bound: node_timeout_s after its last heartbeat (and
            # a probe interval for the heartbeat it may have refreshed first).
            await trio.sleep_until(died + FAST["node_timeout_s"] + FAST["probe_interval_s"])
            await one.send(alice, "bob", ref="m2")
            [second] = await alice.frames()
            assert second["error"] == "unknown_recipient"


async def _no_leave() -> None:
    """Stand-in for RedisLink.leave: the node dies without removing its heartbeat."""


@asynccontextmanager
async def started_alone(url: str) -> AsyncIterator[ClusterRouter]:
    """A node's router, started as the server starts it; yields once ``start`` returned."""
    config = ClusterSettings(enabled=True, broker_url=url, **FAST)
    log = structlog.get_logger()
    stats = Stats()
    router = ClusterRouter(
        config,
        node="starting",
        link_factory=lambda router, channels: RedisLink(
            config, node="starting", channels=channels, receiver=router, log=log
        ),
        events=MessageEvents(log, stats),
        stats=stats,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        yield router
        router.close()


async def test_a_stopping_node_lets_its_connections_go_before_it_leaves_a_hung_redis(
    redis_server: RedisServer,
) -> None:
    # A node stopping leaves Redis (drops its heartbeat), which waits up to
    # connect_timeout_s for a Redis that hangs. Its connections were let go only after
    # that, so their drain (their queue, then 1001) waited too: with shutdown_grace_s
    # under about 4 s, every client got 1006 instead (found by a tester).
    with trio.fail_after(LIMIT_S):
        async with node(redis_server.url, "n1", connect_timeout_s=5.0) as one:
            conn = await one.connect(Conn("a"))
            redis_server.freeze()
            try:
                one.router.close()
                await conn.detached.wait()
                leaving = not one.link._closed  # closed once it has left
            finally:
                redis_server.thaw()
    assert leaving


def health_of(router: ClusterRouter) -> Health:
    link = router.link
    assert isinstance(link, RedisLink)
    return link.health


async def test_a_node_starts_once_its_broker_link_is_up(redis_server: RedisServer) -> None:
    # Started is when the server accepts clients and tells systemd READY=1: an id
    # given out from then on is reachable from every node.
    with trio.fail_after(LIMIT_S):
        async with started_alone(redis_server.url) as router:
            assert health_of(router).up
            assert health_of(router).connects == 1


async def test_a_node_whose_redis_refuses_starts_after_its_first_attempt() -> None:
    with socket.socket() as bound:  # bound, not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with trio.fail_after(LIMIT_S):
            async with started_alone(f"redis://127.0.0.1:{port}/0") as router:
                assert not health_of(router).up
                assert health_of(router).failed_attempts == 1


async def test_a_node_whose_redis_hangs_starts_within_its_connect_timeout() -> None:
    async with hanging_redis() as (url, _trying):
        # The bound: 2 x connect_timeout_s + probe_timeout_s, here 2.3 s.
        with trio.fail_after(LIMIT_S):
            async with started_alone(url) as router:
                assert not health_of(router).up
                assert health_of(router).failed_attempts == 1


@asynccontextmanager
async def hanging_redis() -> AsyncIterator[tuple[str, trio.Event]]:
    """A "Redis" that accepts connections and says nothing.

    Yields its URL, and an event set once a connection came.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    held: list[trio.SocketStream] = []
    trying = trio.Event()

    async def accept_and_say_nothing() -> None:
        while True:
            held.append(await listeners[0].accept())
            trying.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_and_say_nothing)
            yield f"redis://127.0.0.1:{port}/0", trying
            nursery.cancel_scope.cancel()
    finally:
        for stream in held:
            await stream.aclose()
        await listeners[0].aclose()


def node_behind(url: str) -> Server:
    """A relayd whose cluster's first attempt at ``url`` would take over 60 s."""
    cluster = ClusterSettings(enabled=True, broker_url=url, connect_timeout_s=30.0)
    return Server(settings().model_copy(update={"cluster": cluster}))


async def test_a_node_asked_to_stop_while_its_redis_hangs_stops_without_serving() -> None:
    # A SIGTERM while a node first tried a Redis that hangs waited for the attempt to
    # end (up to 2 x connect_timeout_s + probe_timeout_s), then logged server.ready
    # and told systemd READY=1 after STOPPING=1 (found by a tester).
    with structlog.testing.capture_logs() as events:
        async with hanging_redis() as (url, trying):
            server = node_behind(url)
            with trio.fail_after(LIMIT_S):
                async with trio.open_nursery() as running:
                    running.start_soon(server.run)
                    await trying.wait()  # the first attempt is under way, and hangs
                    server.shutdown("test")
    names = [e["event"] for e in events]
    assert "server.ready" not in names
    [stop] = [e for e in events if e["event"] == "server.stop"]
    assert (stop["reason"], stop["forced"]) == ("test", False)


async def admin_get(address: tuple[str, int], path: str) -> tuple[int, str]:
    """``GET path`` from the admin listener at ``address``: the status and the body."""
    request = f"GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode()
    status_line, _headers, body = await raw(address, request)
    return int(status_line.split()[1]), body.decode()


async def test_a_node_reaching_its_redis_answers_health_checks_at_once(
    redis_server: RedisServer,
) -> None:
    # The admin listener was started once the router ran: while a node's first attempt
    # at a Redis that hangs went on (up to 2 x connect_timeout_s + probe_timeout_s, 13 s
    # by default), /healthz, /readyz and /metrics were accepted and not answered, and a
    # health check with a shorter timeout took the node for dead (found by a tester).
    redis_server.freeze()  # connections are accepted by the kernel, and never answered
    try:
        server = node_behind(redis_server.url)
        async with trio.open_nursery() as running:
            running.start_soon(server.run)
            await trio.testing.wait_all_tasks_blocked()  # the first attempt hangs
            address = server.admin_address
            assert address is not None
            with trio.fail_after(LIMIT_S):  # the first attempt would take over 60 s
                healthz = await admin_get(address, "/healthz")
                readyz = await admin_get(address, "/readyz")
                metrics = await admin_get(address, "/metrics")
                presence = await call(address, "/api/presence", {"id": "alice"})
                publish = await call(address, "/api/publish", {"to": "alice", "message": 1})
            assert not server.ready
            server.shutdown("test")
    finally:
        redis_server.thaw()
    assert healthz == (200, "ok\n")
    assert readyz == (503, "not ready: starting\n")
    assert metrics[0] == 200
    assert "relayd_ready 0.0" in metrics[1]
    for status, _headers, body in (presence, publish):
        assert (status, body["error"]) == (503, "broker_unavailable")
        assert body["detail"].startswith("this relayd is starting")


async def test_a_node_stopped_before_it_served_never_says_ready_a_sighup_then_or_not() -> None:
    # READY=1 after STOPPING=1 came back through a SIGHUP kept from the start-up: its
    # reload's READY=1 (found by a reviewer).
    notifications = Notifications()

    def refuse_to_read() -> tuple[Loaded, Authenticator | None, Mapping[str, FileRead]]:
        raise AssertionError("no reload once stopping")

    async with hanging_redis() as (url, trying):
        server = node_behind(url)
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as running:
                running.start_soon(
                    functools.partial(
                        run_daemon,
                        server,
                        reload_settings=refuse_to_read,
                        notifier=notifications,
                        reload_first=lambda: True,
                    )
                )
                await trying.wait()
                os.kill(os.getpid(), signal.SIGTERM)  # as systemd stops it
    assert notifications.sent == ["STOPPING=1"]

"""The cluster router's deadlines and broken links, on an in-memory broker in virtual time.

Three nodes share a :class:`tests.memory_broker.MemoryBroker`; trio's ``autojump_clock``
makes ``reply_timeout_s`` pass in no real time, so the deadlines are checked exactly. The
same behaviour against a real ``redis-server`` is in tests/test_cluster_router.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import structlog
import trio
import trio.testing

from relayd.config import ClusterSettings
from relayd.errors import IncompleteAnswer
from relayd.routing.cluster.router import ClusterRouter
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from tests.memory_broker import MemoryBroker, MemoryLink
from tests.test_cluster_router import Conn, Node

REPLY_TIMEOUT_S = 2.0
SETTINGS = ClusterSettings(enabled=True, reply_timeout_s=REPLY_TIMEOUT_S)


@asynccontextmanager
async def nodes(count: int) -> AsyncIterator[list[Node]]:
    broker = MemoryBroker()
    log = structlog.get_logger()
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run)
        stats = Stats()
        routers = [
            ClusterRouter(
                SETTINGS,
                node=f"n{i}",
                link_factory=broker.link,
                events=MessageEvents(log, stats),
                stats=stats,
            )
            for i in range(1, count + 1)
        ]
        for router in routers:
            await nursery.start(router.run)
        yield [Node(router) for router in routers]
        for router in routers:
            router.close()
        nursery.cancel_scope.cancel()


def memory(node: Node) -> MemoryLink:
    link = node.router.link
    assert isinstance(link, MemoryLink)
    return link


async def test_an_answer_that_never_comes_is_unconfirmed_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with nodes(2) as (one, two):
        alice = await one.connect(Conn("alice"))
        bob = await two.connect(Conn("bob"))
        memory(two).mute = True  # it receives, delivers, and its answers go nowhere
        sent = trio.current_time()
        await one.send(alice, "bob", ref="m1")
        assert (await bob.frames())[0]["message"] == "hi"
        [reply] = await alice.frames()
        assert reply["error"] == "delivery_unconfirmed"
        assert trio.current_time() - sent == REPLY_TIMEOUT_S


async def test_a_link_broken_while_waiting_answers_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with nodes(2) as (one, two):
        alice = await one.connect(Conn("alice"))
        await two.connect(Conn("bob"))
        memory(two).mute = True
        await one.send(alice, "bob", ref="m1")
        await trio.testing.wait_all_tasks_blocked()
        cut = trio.current_time()
        memory(one).cut_off()
        [reply] = await alice.frames()
        assert reply["error"] == "delivery_unconfirmed"
        assert trio.current_time() == cut
        await one.send(alice, "bob", ref="m2")  # down now: not even sent
        [reply] = await alice.frames()
        assert reply["error"] == "recipient_unreachable"


async def test_a_cut_off_node_makes_absent_ids_unreachable_not_unknown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with nodes(3) as (one, _, three):
        alice = await one.connect(Conn("alice"))
        memory(three).cut_off()
        await one.send(alice, "nobody", ref="m1")
        [reply] = await alice.frames()
        assert reply["error"] == "recipient_unreachable"
        memory(three).restore()
        await one.send(alice, "nobody", ref="m2")
        [reply] = await alice.frames()
        assert reply["error"] == "unknown_recipient"


async def test_a_cut_off_node_makes_questions_incomplete_at_once_and_messages_stay_delivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with nodes(3) as (one, two, three):
        alice = await one.connect(Conn("alice"))
        bob = await two.connect(Conn("bob"))
        await two.connect(Conn("subject"))
        await three.connect(Conn("subject"))
        assert await one.router.presence("subject") == 2
        memory(three).cut_off()
        asked = trio.current_time()
        with pytest.raises(IncompleteAnswer):
            await one.router.presence("subject")
        with pytest.raises(IncompleteAnswer):
            await one.router.list_ids(after=None, limit=10)
        assert trio.current_time() == asked
        await one.send(alice, "bob", ref="m1")
        assert await alice.frames() == [{"type": "ack", "ref": "m1"}]
        assert (await bob.frames())[0]["message"] == "hi"
        memory(three).restore()
        assert await one.router.presence("subject") == 2


async def test_one_busy_holder_and_one_silent_is_unconfirmed_not_busy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A subject on two nodes: one full, one silent. Busy needs every holder's word."""
    async with nodes(3) as (one, two, three):
        alice = await one.connect(Conn("alice"))
        full = await two.connect(Conn("subject", capacity=1))
        await three.connect(Conn("subject"))
        memory(three).mute = True
        await one.send(alice, "subject", "fills it", ref=None)
        await one.send(alice, "subject", "no room", ref="m2")
        sent = trio.current_time()
        [reply] = await alice.frames()  # nothing for the first: delivered, and no ref
        assert (reply["error"], reply["ref"]) == ("delivery_unconfirmed", "m2")
        assert trio.current_time() - sent == REPLY_TIMEOUT_S
        assert (await full.frames())[0]["message"] == "fills it"

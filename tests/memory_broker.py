"""An in-memory broker for fast, deterministic tests of the cluster router (not a substitute).

:class:`MemoryBroker` stands in for Redis pub/sub between several
:class:`~relayd.routing.cluster.router.ClusterRouter` instances in one trio run: its
links implement :class:`~relayd.routing.cluster.link.Link`. What it keeps of Redis: a
publish answers how many links hold the channel (-1 for nobody while some link is cut
off; for a question, -1 whenever some link is cut off), deliveries and answers arrive
later, in publish order, from the broker's own task.
What it lets a test do that Redis cannot: cut one link at a precise moment, or make one
swallow everything it would publish. Time is trio's, so ``autojump_clock`` tests see
``reply_timeout_s`` pass in virtual time. The real thing is tested against
``redis-server`` in tests/test_cluster_link.py and tests/test_cluster_router.py.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable

import trio

from relayd.routing.cluster.codec import Channels
from relayd.routing.cluster.link import Health, Link, NotSent, Published, Receiver
from relayd.routing.cluster.router import ClusterRouter

__all__ = ["MemoryBroker", "MemoryLink"]


class MemoryLink:
    """One node's link to a :class:`MemoryBroker` (a :class:`Link`)."""

    def __init__(self, broker: MemoryBroker, receiver: Receiver) -> None:
        self.health = Health()
        self._broker = broker
        self.receiver = receiver
        self.channels: collections.Counter[bytes] = collections.Counter()
        self.cut = False
        self.mute = False  # publish "succeeds" but nothing is sent: a frozen node
        self._closed = trio.Event()

    def publish(self, pairs: list[tuple[bytes, bytes]], done: Published) -> bool:
        if not self.health.up:  # refused, and not counted: as RedisLink's
            return False
        if not self.mute:
            self._broker.publish(pairs, done)
        self.health.published += len(pairs)
        return True

    def ask(self, pairs: list[tuple[bytes, bytes]], done: Published) -> bool:
        if not self.health.up:
            return False
        if not self.mute:
            self._broker.publish(pairs, done, questions=True)
        self.health.published += len(pairs)
        return True

    def send(self, pairs: list[tuple[bytes, bytes]]) -> bool:
        return self.publish(pairs, _no_counts)

    def subscribe(self, channel: bytes) -> None:
        self.channels[channel] += 1

    def unsubscribe(self, channel: bytes) -> None:
        self.channels[channel] -= 1
        if self.channels[channel] <= 0:
            del self.channels[channel]

    async def subscribed(self, channel: bytes) -> None:
        await trio.lowlevel.checkpoint()

    async def first_attempt(self) -> None:
        return

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.health.up = True
        task_status.started()
        await self._closed.wait()

    async def leave(self) -> None:
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        self.health.up = False
        self._closed.set()

    def cut_off(self) -> None:
        """The link breaks: down, its subscriptions ignored, the router told."""
        self.cut = True
        self.health.up = False
        self.receiver.link_down()

    def restore(self) -> None:
        """The link is back, with every subscription it held."""
        self.cut = False
        self.health.up = True


class MemoryBroker:
    """Channels to links, and a task that delivers in publish order."""

    def __init__(self) -> None:
        self.links: list[MemoryLink] = []
        self._queue: collections.deque[Callable[[], None]] = collections.deque()
        self._lot = trio.lowlevel.ParkingLot()

    def link(self, router: ClusterRouter, channels: Channels) -> Link:
        """A new node's link (the ``link_factory`` a ClusterRouter takes).

        Subscribed, as a RedisLink subscribes itself, to the nodes channel and the node's own.
        """
        link = MemoryLink(self, router)
        link.subscribe(channels.nodes)
        link.subscribe(channels.of_node(router.node))
        self.links.append(link)
        return link

    def publish(
        self, pairs: list[tuple[bytes, bytes]], done: Published, *, questions: bool = False
    ) -> None:
        """Count receivers now; deliver and answer from the broker's task.

        As :data:`~relayd.routing.cluster.redis_publisher.PUBLISH_SCRIPT` counts:
        -1 for nobody while some link is cut off, and for ``questions`` (what
        ``Link.ask`` publishes) -1 for every pair while some link is.
        """
        cut_off = any(link.cut for link in self.links)
        counts = []
        for channel, data in pairs:
            holders = [link for link in self.links if not link.cut and channel in link.channels]
            counts.append(-1 if cut_off and (questions or not holders) else len(holders))
            for holder in holders:
                self._queue.append(functools.partial(_deliver, holder, channel, data))
        self._queue.append(functools.partial(done, counts))
        self._lot.unpark()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver what was published, in order, until cancelled."""
        task_status.started()
        while True:
            while not self._queue:
                await self._lot.park()
            self._queue.popleft()()
            await trio.lowlevel.checkpoint()


def _deliver(link: MemoryLink, channel: bytes, data: bytes) -> None:
    if not link.cut:
        link.health.received += 1
        link.receiver.received([(channel, data)])


def _no_counts(counts: list[int] | NotSent | None) -> None:
    """What a link's send asks: nothing."""

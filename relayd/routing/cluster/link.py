"""The broker link as the cluster router sees it, and the health it reports (no I/O here).

:class:`Link` is what :class:`~relayd.routing.cluster.router.ClusterRouter`
needs of a broker: publish a batch without waiting, keep a set of
subscriptions (across reconnections), hand over what arrives. Two
implementations: :class:`~relayd.routing.cluster.redis.RedisLink` (the real
one) and ``tests/memory_broker.py``'s links (in memory, for fast tests of the
router).

:class:`Health` is the link's state in plain fields, for ``/readyz``,
``/metrics`` and ``systemctl status``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Final, Protocol

import trio

__all__ = ["NOT_SENT", "Health", "Link", "NotSent", "Published", "Receiver"]


class NotSent(enum.Enum):
    """The broker refused a batch before running any of it (:data:`NOT_SENT`)."""

    NOT_SENT = "not sent"


#: A batch the broker refused before running any of it: nothing was published
#: (Redis answered ``NOSCRIPT``: it had lost the script, after a ``SCRIPT FLUSH``
#: or a failover to a Redis without it).
NOT_SENT: Final = NotSent.NOT_SENT

#: Called with each PUBLISH's count of receiving nodes, in the order published
#: (-1: some node that may hold it is cut off from Redis: see :meth:`Link.publish`
#: and :meth:`Link.ask`); with :data:`NOT_SENT` when the broker refused the batch
#: unrun; or with None when the batch's fate is unknown (the link broke with it
#: in flight).
Published = Callable[[list[int] | NotSent | None], None]


class Receiver(Protocol):
    """What a link hands what it receives to: the cluster router."""

    def received(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Take ``(channel, data)`` pairs, as many as arrived at once; never waits."""

    def link_down(self) -> None:
        """The link broke: nothing in flight will be answered."""


@dataclasses.dataclass(slots=True)
class Health:
    """The link's state and counters since start (plain fields, read by metrics).

    Attributes:
        up: connected, subscriptions restored, and the last probe came back.
        connects: successful connections (the first one and every reconnection).
        losses: times the link broke after it was up.
        failed_attempts: attempts to connect that failed.
        publish_failures: batches the node tried to publish and could not: their
            fate unknown (the link broke with them in flight), refused by Redis
            unrun (``NOSCRIPT``), or refused with the link up (the buffer full,
            a write that failed). Not those refused while the link is known to
            be down: the node does not try then.
        published: messages published (counted as written; those of a batch
            Redis refused unrun, ``NOSCRIPT``, taken back).
        received: messages received on the subscriptions.
        undecodable: messages received that were not relayd's, dropped.
        subscriptions: channels Redis holds for this node now (its ids, plus two),
            as its last confirmation said; 0 while the link is down (its
            connections are closed, and Redis holds none for them). Counted
            again while it resubscribes: the metric shows 0 until :attr:`up`.
        probe_rtt_s: the last probe's round trip through Redis.
        inflight_bytes: published bytes Redis has not yet answered for.
    """

    up: bool = False
    connects: int = 0
    losses: int = 0
    failed_attempts: int = 0
    publish_failures: int = 0
    published: int = 0
    received: int = 0
    undecodable: int = 0
    subscriptions: int = 0
    probe_rtt_s: float = 0.0
    inflight_bytes: int = 0


class Link(Protocol):
    """A connection to the broker that reconnects by itself."""

    health: Health

    def publish(self, pairs: list[tuple[bytes, bytes]], done: Published) -> bool:
        """Publish ``(channel, data)`` pairs in one batch; never waits.

        A count is -1 only where it would be 0 (nobody holds the channel) while
        some node is cut off from the broker (its heartbeat fresh, its
        subscriptions gone): that node's clients may hold the id.

        Returns:
            False, without calling ``done``, when the link is down or the
            publish buffer is full: nothing was sent. True: ``done`` will be
            called exactly once (with :data:`NOT_SENT` if Redis refused the
            batch unrun: nothing was sent either).
        """

    def ask(self, pairs: list[tuple[bytes, bytes]], done: Published) -> bool:
        """Publish questions every live node must receive (the server API's), as :meth:`publish`.

        Each count is -1 whenever some node is cut off from the broker (its
        heartbeat fresh, its subscriptions gone), whatever PUBLISH counted: that
        node did not receive the question, and the answers of the others would
        be a part.
        """

    def send(self, pairs: list[tuple[bytes, bytes]]) -> bool:
        """Publish ``(channel, data)`` pairs and ask for no counts (answers); never waits.

        Returns:
            False when the link is down or the publish buffer is full: nothing
            was sent. True: written, or queued to be; whether it arrives is
            never known (a lost answer shows at its origin's deadline).
        """

    def subscribe(self, channel: bytes) -> None:
        """Hold a subscription to ``channel`` (one hold per call), across reconnections."""

    def unsubscribe(self, channel: bytes) -> None:
        """Release one hold on ``channel``; the last one unsubscribes."""

    async def subscribed(self, channel: bytes) -> None:
        """Return once ``channel`` is subscribed in the broker, or at once while the link is down.

        The caller bounds the wait.
        """

    async def first_attempt(self) -> None:
        """Return once the first connection to the broker is up, or has failed.

        Never raises; the caller bounds the wait.
        """

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and reconnect whenever the link breaks, until :meth:`close`.

        Reports started at once: relayd serves its own clients with the broker
        down.
        """

    async def leave(self) -> None:
        """Tell the cluster this node is going (its heartbeat removed); bounded, never raises."""

    def close(self) -> None:
        """Disconnect, and end :meth:`run`."""

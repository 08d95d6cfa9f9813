"""The server API's questions to every node: presence, disconnect, a page of ids.

Each is published once (on the id's channel, or on the nodes channel for a
page of ids) and answered by every node that holds something
(:class:`~relayd.routing.cluster.holder.Holder`); the answers are summed or
gathered by :class:`~relayd.routing.cluster.awaited.Awaited`. Every node's
answer within ``reply_timeout_s`` is the answer; when one is missing (a node
stalled, the link broke) the asker hears
:class:`~relayd.errors.IncompleteAnswer`, never the part that came as if it
were the whole. So does it, at once, when some live node did not receive the
question (it is cut off from Redis, its heartbeat still fresh:
:meth:`Link.ask <relayd.routing.cluster.link.Link.ask>`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from relayd.errors import BrokerUnavailable, IncompleteAnswer
from relayd.routing.cluster import codec
from relayd.routing.cluster.awaited import Awaited, Counted
from relayd.routing.cluster.link import Link

__all__ = ["Queries"]

#: What an incomplete answer's asker is told (the server API adds "; ask again").
_INCOMPLETE: Final = (
    "not every node answered in time, a node is cut off from Redis,"
    " or the link to Redis broke meanwhile"
)


class Queries:
    """Asks every node, for the server API: presence, disconnect, a page of ids.

    Args:
        node: this node's name (where the answers come back).
        channels: the cluster's channel names.
        link: where questions are published.
        awaited: where they wait for their answers.
    """

    __slots__ = ("_awaited", "_channels", "_link", "_node")

    def __init__(self, node: str, channels: codec.Channels, link: Link, awaited: Awaited) -> None:
        self._node = node
        self._channels = channels
        self._link = link
        self._awaited = awaited

    async def presence(self, client_id: str) -> int:
        """How many connections hold ``client_id``, on every node.

        Raises:
            BrokerUnavailable: the question was not sent (see :meth:`_ask`).
            IncompleteAnswer: some node's count did not come.
        """
        asker = await self._ask(
            lambda seq: (
                self._channels.of_id(client_id),
                codec.Query(self._node, seq, codec.QueryKind.PRESENCE),
            ),
            _INCOMPLETE,
        )
        return asker.total

    async def disconnect(self, client_id: str, code: int, reason: str) -> int:
        """Close every connection holding ``client_id``, on every node; how many were closed.

        Raises:
            BrokerUnavailable: the question was not sent; nothing was closed.
            IncompleteAnswer: some node's count did not come; that node may
                still close the id's connections, later.
        """
        query = codec.QueryKind.DISCONNECT
        asker = await self._ask(
            lambda seq: (
                self._channels.of_id(client_id),
                codec.Query(self._node, seq, query, code, reason),
            ),
            f"{_INCOMPLETE}: connections on a node that did not answer may still be closed",
        )
        return asker.total

    async def list_ids(self, *, after: str | None, limit: int) -> list[str]:
        """Ids connected anywhere in the cluster, sorted, after ``after``, at most ``limit``.

        Raises:
            BrokerUnavailable: the question was not sent (see :meth:`_ask`).
            IncompleteAnswer: some node's ids did not come.
        """
        asker = await self._ask(
            lambda seq: (self._channels.nodes, codec.ListIds(self._node, seq, after, limit)),
            _INCOMPLETE,
        )
        return sorted(set(asker.ids))[:limit]

    async def _ask(
        self, question: Callable[[int], tuple[bytes, codec.Message]], incomplete: str
    ) -> Counted:
        """Publish ``question(seq)`` and wait for every answer, bounded by the router's expiry.

        Raises:
            BrokerUnavailable: the question was not sent: the link refused it
                (down, its buffer full), or Redis did (it had lost the script).
            IncompleteAnswer: (saying ``incomplete``) not every answer came.
        """
        asker = Counted(trio.Event())
        awaited = self._awaited
        seq = awaited.count(asker)
        channel, message = question(seq)
        if not self._link.ask([(channel, codec.encode(message))], awaited.published([seq])):
            awaited.refused([seq])
        await asker.done.wait()
        if not asker.sent:
            raise BrokerUnavailable(
                "the question was not sent: this node's link to the cluster's broker is down"
                " or its buffer full, or Redis refused it unrun (it had lost relayd's scripts)"
            )
        if not asker.complete:
            raise IncompleteAnswer(incomplete)
        return asker

"""The holding side of a cluster node: messages and questions for ids held here, answered.

:class:`Holder` takes what another node published on the channel of an id
this node holds (a :class:`~relayd.routing.cluster.codec.Deliver`, a
:class:`~relayd.routing.cluster.codec.Query`) or on the nodes channel (a
:class:`~relayd.routing.cluster.codec.ListIds`), acts on it at once with the
never-waiting outbox calls, and owes the origin an answer. The answers of one
batch of received messages go out together: one
:class:`~relayd.routing.cluster.codec.Answers` per origin (:meth:`Holder.flush`).

An answer that cannot be published (the link is down or its buffer full) is
dropped: the origin's deadline then tells its sender ``delivery_unconfirmed``.
"""

from __future__ import annotations

import heapq
from typing import Final

import msgspec

from relayd.routing.cluster import codec
from relayd.routing.cluster.link import Link
from relayd.routing.fanout import offer
from relayd.routing.interface import Peer
from relayd.routing.table import Outcome, RoutingTable

__all__ = ["Holder"]

#: What a holding node answers for each outcome of its own offer.
_VERDICTS: Final = {
    Outcome.DELIVERED: codec.Verdict.DELIVERED,
    Outcome.RECIPIENT_BUSY: codec.Verdict.BUSY,
    Outcome.UNKNOWN_RECIPIENT: codec.Verdict.GONE,  # the id left between publish and here
}


class Holder:
    """Acts on what arrives for this node's ids and gathers the answers owed.

    Args:
        node: this node's name (its own deliveries are not taken twice).
        table: the node's routing table (read here; the router writes it).
        channels: the cluster's channel names.
        link: where answers are published.
    """

    __slots__ = ("_channels", "_ids", "_link", "_node", "_owed", "_table")

    def __init__(
        self, node: str, table: RoutingTable[Peer], channels: codec.Channels, link: Link
    ) -> None:
        self._node = node
        self._table = table
        self._channels = channels
        self._link = link
        self._owed: dict[str, list[codec.Answer]] = {}
        self._ids: list[tuple[str, codec.Ids]] = []

    def take(self, channel: bytes, message: codec.Message) -> None:
        """Act on one message received on ``channel``."""
        if isinstance(message, codec.Deliver):
            if message.origin != self._node:  # its holders here were offered it directly
                self._deliver(channel, message)
        elif isinstance(message, codec.Query):
            self._query(channel, message)
        elif isinstance(message, codec.ListIds):
            ids = heapq.nsmallest(
                message.limit,
                (
                    client_id
                    for client_id in self._table.ids()
                    if message.after is None or client_id > message.after
                ),
            )
            self._ids.append((message.origin, codec.Ids(self._node, message.seq, ids)))

    def flush(self) -> None:
        """Publish every answer owed, one message per origin."""
        if not self._owed and not self._ids:
            return
        pairs = [
            (self._channels.of_node(origin), codec.encode(codec.Answers(self._node, answers)))
            for origin, answers in self._owed.items()
        ]
        pairs += [(self._channels.of_node(origin), codec.encode(ids)) for origin, ids in self._ids]
        self._owed.clear()
        self._ids.clear()
        self._link.send(pairs)  # refused when the link is down: see the module docstring

    def _deliver(self, channel: bytes, message: codec.Deliver) -> None:
        client_id = self._channels.id_of(channel)
        holders = self._table.lookup(client_id) if client_id is not None else ()
        outcome = offer(holders, message.sender, msgspec.Raw(message.message))
        if message.seq:
            self._owe(message.origin, message.seq, _VERDICTS[outcome])

    def _query(self, channel: bytes, message: codec.Query) -> None:
        client_id = self._channels.id_of(channel)
        holders = self._table.lookup(client_id) if client_id is not None else ()
        if message.kind is codec.QueryKind.DISCONNECT:
            for peer in holders:
                peer.disconnect(message.code, message.reason)
        self._owe(message.origin, message.seq, len(holders))

    def _owe(self, origin: str, seq: int, value: int) -> None:
        answers = self._owed.get(origin)
        if answers is None:
            answers = self._owed[origin] = []
        answers.append(codec.Answer(seq, value))

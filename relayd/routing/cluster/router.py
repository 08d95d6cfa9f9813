"""The router of a cluster node: its own connections first, the others through the broker.

Data path, sending side: readers hand batches to the router's inbox as with
:class:`~relayd.routing.local.LocalRouter`. For each message the routing task
looks the recipient up here first; an id held here is delivered here and
answered at once, exactly as on one node. An id not held here is published
on its id channel (``relayd:id:<id>``), one script call per routing pass
(:meth:`Link.publish <relayd.routing.cluster.link.Link.publish>`), and the
sender's answer waits (:class:`~relayd.routing.cluster.pending.Waiting`):
Redis says how many nodes received it; each answers with its verdict.

Receiving side (:mod:`relayd.routing.cluster.holder`): a node that holds the
id hands the message to its connections' outboxes with the same
never-waiting ``offer`` and answers the origin on its node channel, all the
answers of one pass in one message per origin.

What a sender hears (docs/protocol.md, "Across nodes"):

==========================  =================================================
``ack`` / delivered         some holder's outbox took it
``recipient_busy``          every holder answered, every outbox was full
``unknown_recipient``       no node holds the id (PUBLISH reached nobody), or
                            every holder had let it go
``recipient_unreachable``   not sent: this node is cut off from Redis, its
                            publish buffer is full, Redis refused it unrun
                            (``NOSCRIPT``), or some node is cut off and
                            nobody else holds the id
``delivery_unconfirmed``    sent, but not every holder answered within
                            ``reply_timeout_s`` (or the link broke meanwhile):
                            it may have been delivered; never sent twice
==========================  =================================================

With authentication, one subject may hold connections on several nodes, and
all of them receive: a message to an id held here is then also published
(only then: generated ids are unique to one connection).

Resource handling: the router owns the link and runs it in its own nursery.
Shutdown: :meth:`ClusterRouter.close` refuses new items; :meth:`run`
delivers what is queued, waits (at most ``reply_timeout_s``) for the answers
its senders are owed, removes the node's heartbeat, closes every outbox and
the link, and returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import msgspec
import trio

from relayd.config import ClusterSettings
from relayd.errors import RouterClosed
from relayd.routing.cluster import codec
from relayd.routing.cluster.awaited import Awaited, Counted, Relayed
from relayd.routing.cluster.holder import Holder
from relayd.routing.cluster.link import Link
from relayd.routing.cluster.metrics import ClusterCollector
from relayd.routing.cluster.queries import Queries
from relayd.routing.fanout import offer
from relayd.routing.inbox import hand_over, try_hand_over
from relayd.routing.interface import Inbound, Peer, Relay
from relayd.routing.table import Outcome, RoutingTable
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats

__all__ = ["ClusterRouter"]

#: Batches the router's inbox holds before readers wait (as the local router's).
INBOX_SIZE: Final = 256


class ClusterRouter:
    """Routes for one node of a cluster (implements :class:`~relayd.routing.interface.Router`).

    Args:
        settings: the ``[cluster]`` settings.
        node: this node's name.
        link_factory: makes the link to the broker, given the receiver
            (this router) and the channel names.
        events: where message outcomes are counted and logged.
        stats: the counters to add to (errors, relay latency).
        shared_ids: whether ids may now be held on several nodes (authentication
            is on), read at each message to an id held here.
    """

    def __init__(
        self,
        settings: ClusterSettings,
        *,
        node: str,
        link_factory: Callable[[ClusterRouter, codec.Channels], Link],
        events: MessageEvents,
        stats: Stats,
        shared_ids: Callable[[], bool] = lambda: False,
    ) -> None:
        self.node = node
        self._settings = settings
        self._shared_ids = shared_ids
        # The longest a first session takes to be up or fail: its connection and its
        # resubscription each within connect_timeout_s, then the first probe.
        self._first_attempt_s = 2 * settings.connect_timeout_s + settings.probe_timeout_s
        self.stats = stats
        self.channels = codec.Channels(settings.channel_prefix)
        self._own = self.channels.of_node(node)
        self._table: RoutingTable[Peer] = RoutingTable()
        self._awaited = Awaited(settings.reply_timeout_s, events, stats)
        # What one routing pass publishes: (channel, data) pairs, and the
        # question number of each (0: nobody waits for an answer).
        self._pairs: list[tuple[bytes, bytes]] = []
        self._seqs: list[int] = []
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[list[Inbound]](INBOX_SIZE)
        self._closed = False
        self.link = link_factory(self, self.channels)
        self._holder = Holder(node, self._table, self.channels, self.link)
        self._queries = Queries(node, self.channels, self.link, self._awaited)

    # -- the Router interface ----------------------------------------------------------

    @property
    def routes(self) -> int:
        """How many client ids are routable here."""
        return len(self._table)

    @property
    def waiting(self) -> int:
        """Messages and questions waiting for other nodes' answers."""
        return len(self._awaited)

    @property
    def ready(self) -> bool:
        """True while the link to the cluster is up (``/readyz``)."""
        return self.link.health.up

    def collector(self) -> ClusterCollector:
        """The ``relayd_cluster_*`` metrics."""
        return ClusterCollector(self.link.health, lambda: len(self._awaited))

    async def register(self, peer: Peer) -> None:
        """Route ``peer.client_id`` to ``peer``, cluster-wide once this returns.

        Waits for Redis to confirm the id's subscription, at most
        ``probe_timeout_s`` (a frozen Redis is found out by then); while the
        link is down it returns at once: the id is routable here, and
        everywhere once the link is back and has resubscribed.

        Raises:
            RouterClosed: the router is shutting down.
        """
        if self._closed:
            raise RouterClosed("router is shutting down")
        first = not self._table.lookup(peer.client_id)
        self._table.add(peer.client_id, peer)
        if first:
            channel = self.channels.of_id(peer.client_id)
            self.link.subscribe(channel)
            with trio.move_on_after(self._settings.probe_timeout_s):
                await self.link.subscribed(channel)

    def unregister(self, peer: Peer) -> None:  # noqa: D102
        holders = self._table.lookup(peer.client_id)
        if any(holder is peer for holder in holders):
            self._table.discard(peer.client_id, peer)
            if len(holders) == 1:
                self.link.unsubscribe(self.channels.of_id(peer.client_id))

    def try_route(self, items: list[Inbound]) -> bool:  # noqa: D102
        return try_hand_over(self._inbox_send, items)

    async def route(self, items: list[Inbound]) -> None:  # noqa: D102
        await hand_over(self._inbox_send, items)

    def close(self) -> None:  # noqa: D102
        self._closed = True
        self._inbox_send.close()

    async def run(  # noqa: D102
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.link.run)
            nursery.start_soon(self._awaited.expire)
            # Started (then the accept loops, READY=1) once the broker is reached or the
            # first try failed: a restarted node's new clients are then reachable from
            # other nodes as soon as systemd hears it is ready. A broker that is down
            # fails fast (connection refused); one that hangs, within this bound.
            with trio.move_on_after(self._first_attempt_s):
                await self.link.first_attempt()
            task_status.started()
            try:
                await self._route_all()
                with trio.move_on_after(self._settings.reply_timeout_s):
                    await self._awaited.settled()
                # The connections first: each finishes its drain (its queue, then 1001)
                # once nothing more can come for it, and leaving may wait for a Redis that
                # hangs (up to connect_timeout_s), which is no reason to keep them.
                self._detach_all()
                await self.link.leave()
            finally:
                self._detach_all()
                self.link.close()
                nursery.cancel_scope.cancel()

    def _detach_all(self) -> None:
        """Unregister every connection and tell it nothing more will come; idempotent."""
        for peer in self._table.handles():
            self.unregister(peer)
            peer.detach()

    # -- the server API (presence, disconnect, ids, publish) -----------------------------

    async def presence(self, client_id: str) -> int:  # noqa: D102
        return await self._queries.presence(client_id)

    async def disconnect(self, client_id: str, code: int, reason: str) -> int:  # noqa: D102
        return await self._queries.disconnect(client_id, code, reason)

    async def list_ids(self, *, after: str | None, limit: int) -> list[str]:  # noqa: D102
        return await self._queries.list_ids(after=after, limit=limit)

    async def publish(self, to: str, message: msgspec.Raw, *, sender: str) -> Outcome:
        """Relay ``message`` to ``to`` from the server (``sender`` as its ``from``)."""
        asker = Relayed(None, sender, to, None, len(message), trio.current_time(), message)
        asker.done = trio.Event()
        with self._awaited.batch():
            self._send(asker, self._table.lookup(to))
            self._flush()
        await asker.done.wait()
        assert asker.outcome is not None
        return asker.outcome

    # -- sending -------------------------------------------------------------------------

    async def _route_all(self) -> None:
        inbox, awaited, lookup = self._inbox_receive, self._awaited, self._table.lookup
        reply = awaited.reply
        async for first in inbox:
            # Everything queued is routed before the router yields, then
            # published in one batch (as the local router's pass). The pass does
            # not await, so whether ids are shared cannot change within it.
            with awaited.batch():
                shared, record = self._shared_ids(), awaited.record
                items: list[Inbound] | None = first
                while items is not None:
                    for item in items:
                        if not isinstance(item, Relay):
                            reply(item.recipient, item.frame)
                            continue
                        envelope = item.envelope
                        to, body = envelope.to, envelope.message
                        holders = lookup(to)
                        if holders and not shared:
                            # Held here and nowhere else: decided now, as on one node,
                            # with no question to other nodes made for it.
                            sender = item.sender
                            outcome = offer(holders, sender.client_id, body)
                            awaited.tell(sender, envelope.ref, item.received, outcome)
                            record(sender.client_id, to, item.size, outcome, body)
                        else:
                            self._relay(item, holders)
                    try:
                        items = inbox.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        items = None
                self._flush()

    def _relay(self, item: Relay, holders: Sequence[Peer]) -> None:
        envelope = item.envelope
        asker = Relayed(
            item.sender,
            item.sender.client_id,
            envelope.to,
            envelope.ref,
            item.size,
            item.received,
            envelope.message,
        )
        self._send(asker, holders)

    def _send(self, asker: Relayed, holders: Sequence[Peer]) -> None:
        """Deliver to ``holders`` (``asker.to``'s here), or publish, or both.

        Answers now when the answer is known.
        """
        awaited = self._awaited
        seq = None  # the number of its question to other nodes (0: nobody waits)
        if holders:
            outcome = offer(holders, asker.sender_id, asker.body)
            if not self._shared_ids():
                awaited.decide(asker, outcome)
                return
            if outcome is Outcome.DELIVERED:
                awaited.decide(asker, outcome)
                seq = 0  # a copy for the subject's other nodes
        if seq is None:
            if not self.link.health.up:  # answered now, so in the order it came
                awaited.decide(
                    asker, Outcome.RECIPIENT_BUSY if holders else Outcome.RECIPIENT_UNREACHABLE
                )
                return
            # Holders here but all busy: that is this node's own verdict.
            seq = awaited.relay(asker, busy_here=bool(holders))
        deliver = codec.Deliver(self.node, seq, asker.sender_id, bytes(asker.body))
        self._pairs.append((self.channels.of_id(asker.to), codec.encode(deliver)))
        self._seqs.append(seq)

    def _flush(self) -> None:
        """Publish what this pass queued, as one batch."""
        if not self._pairs:
            return
        pairs, seqs = self._pairs, self._seqs
        self._pairs, self._seqs = [], []
        if not self.link.publish(pairs, self._awaited.published(seqs)):
            self._awaited.refused(seqs)

    # -- answers -------------------------------------------------------------------------

    def received(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Take what the link received (the :class:`~relayd.routing.cluster.link.Receiver` side)."""
        awaited = self._awaited
        waiting, answered = awaited.waiting, awaited.answered
        with awaited.batch():
            for channel, data in messages:
                try:
                    message = codec.decode(data)
                except msgspec.DecodeError:
                    self.link.health.undecodable += 1
                    continue
                if isinstance(message, codec.Answers):
                    for answer in message.answers:
                        decided = waiting.answer(answer.seq, answer.value)
                        if decided is not None:
                            answered(*decided)
                elif isinstance(message, codec.Ids):
                    asker = waiting.peek(message.seq)
                    if isinstance(asker, Counted):
                        asker.ids += message.ids
                    decided = waiting.answer(message.seq, 0)
                    if decided is not None:
                        answered(*decided)
                elif channel != self._own:
                    self._holder.take(channel, message)
            self._holder.flush()

    def link_down(self) -> None:
        """The link broke: every open question is decided now (the Receiver side)."""
        self._awaited.abandon()

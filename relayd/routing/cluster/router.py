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
                            publish buffer is full, or some node is cut off
                            and nobody else holds the id
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

import collections
import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Final

import msgspec
import trio

from relayd.config import ClusterSettings
from relayd.errors import BrokerUnavailable, RouterClosed
from relayd.routing.batch import routing_batch
from relayd.routing.cluster import codec
from relayd.routing.cluster.holder import Holder
from relayd.routing.cluster.link import Link
from relayd.routing.cluster.metrics import ClusterCollector
from relayd.routing.cluster.pending import Decided, Kind, Waiting
from relayd.routing.fanout import offer
from relayd.routing.inbox import hand_over, try_hand_over
from relayd.routing.interface import Inbound, Peer, Relay
from relayd.routing.replies import DETAILS, ack_frame, error_frame
from relayd.routing.table import Outcome, RoutingTable
from relayd.telemetry.log import batched
from relayd.telemetry.messages import MessageEvents, Recorder
from relayd.telemetry.metrics import Stats

__all__ = ["ClusterRouter"]

#: Batches the router's inbox holds before readers wait (as the local router's).
INBOX_SIZE: Final = 256

_VERDICTS: Final = {
    codec.Verdict.DELIVERED: Outcome.DELIVERED,
    codec.Verdict.BUSY: Outcome.RECIPIENT_BUSY,
    codec.Verdict.GONE: Outcome.UNKNOWN_RECIPIENT,
}


@dataclasses.dataclass(slots=True, eq=False)
class _Relayed:
    """A message waiting for other nodes; answered once, to its sender or to the server API."""

    sender: Peer | None  # None: the server API's publish, which waits on .done
    sender_id: str
    to: str
    ref: str | int | None
    size: int
    received: float
    body: msgspec.Raw
    done: trio.Event | None = None
    outcome: Outcome | None = None
    slot: _Slot | None = None  # its place among its sender's replies, once it waits


@dataclasses.dataclass(slots=True, eq=False)
class _Slot:
    """One reply owed to a sender that has messages waiting for other nodes."""

    frame: bytes | None = None
    decided: bool = False


@dataclasses.dataclass(slots=True, eq=False)
class _Counted:
    """A cluster-wide question (presence, disconnect, a page of ids) and what came back."""

    done: trio.Event
    total: int = 0
    ids: list[str] = dataclasses.field(default_factory=list)
    complete: bool = True


_Asker = _Relayed | _Counted


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
        self._events = events
        self._record: Recorder = events.recorder()  # made afresh per batch: see _batch
        self._shared_ids = shared_ids
        self.stats = stats
        self.channels = codec.Channels(settings.channel_prefix)
        self._own = self.channels.of_node(node)
        self._table: RoutingTable[Peer] = RoutingTable()
        self._waiting: Waiting[_Asker] = Waiting(settings.reply_timeout_s)
        self._asked = trio.lowlevel.ParkingLot()  # the expiry task, when nothing waits
        self._settled = trio.lowlevel.ParkingLot()  # run's end, waiting for answers owed
        # What one routing pass publishes: (channel, data) pairs, and the
        # question number of each (0: nobody waits for an answer).
        self._pairs: list[tuple[bytes, bytes]] = []
        self._seqs: list[int] = []
        # Senders with messages waiting for other nodes, and the replies they
        # are owed in order (replies reach a sender in the order it sent).
        self._held: dict[Peer, collections.deque[_Slot]] = {}
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[list[Inbound]](INBOX_SIZE)
        self._closed = False
        self.link = link_factory(self, self.channels)
        self._holder = Holder(node, self._table, self.channels, self.link)

    # -- the Router interface ----------------------------------------------------------

    @property
    def routes(self) -> int:
        """How many client ids are routable here."""
        return len(self._table)

    @property
    def waiting(self) -> int:
        """Messages and questions waiting for other nodes' answers."""
        return len(self._waiting)

    @property
    def ready(self) -> bool:
        """True while the link to the cluster is up (``/readyz``)."""
        return self.link.health.up

    def collector(self) -> ClusterCollector:
        """The ``relayd_cluster_*`` metrics."""
        return ClusterCollector(self.link.health, lambda: len(self._waiting))

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
            nursery.start_soon(self._expire)
            task_status.started()
            try:
                await self._route_all()
                with trio.move_on_after(self._settings.reply_timeout_s):
                    while len(self._waiting):
                        await self._settled.park()
                await self.link.leave()
            finally:
                for peer in self._table.handles():
                    self.unregister(peer)
                    peer.detach()
                self.link.close()
                nursery.cancel_scope.cancel()

    # -- the server API (presence, disconnect, ids, publish) -----------------------------

    async def presence(self, client_id: str) -> int:
        """How many connections hold ``client_id`` on every node that answers in time.

        Raises:
            BrokerUnavailable: the node is cut off from Redis.
        """
        asker = await self._ask_count(
            lambda seq: (
                self.channels.of_id(client_id),
                codec.Query(self.node, seq, codec.QueryKind.PRESENCE),
            )
        )
        return asker.total

    async def disconnect(self, client_id: str, code: int, reason: str) -> int:
        """Close every connection holding ``client_id``, on every node; how many were closed.

        Raises:
            BrokerUnavailable: the node is cut off from Redis.
        """
        query = codec.QueryKind.DISCONNECT
        asker = await self._ask_count(
            lambda seq: (
                self.channels.of_id(client_id),
                codec.Query(self.node, seq, query, code, reason),
            )
        )
        return asker.total

    async def list_ids(self, *, after: str | None, limit: int) -> list[str]:
        """Ids connected anywhere in the cluster, sorted, after ``after``, at most ``limit``.

        Raises:
            BrokerUnavailable: the node is cut off from Redis.
        """
        asker = await self._ask_count(
            lambda seq: (self.channels.nodes, codec.ListIds(self.node, seq, after, limit))
        )
        return sorted(set(asker.ids))[:limit]

    async def publish(self, to: str, message: msgspec.Raw, *, sender: str) -> Outcome:
        """Relay ``message`` to ``to`` from the server (``sender`` as its ``from``)."""
        asker = _Relayed(None, sender, to, None, len(message), trio.current_time(), message)
        asker.done = trio.Event()
        with self._batch():
            self._send(asker)
            self._flush()
        await asker.done.wait()
        assert asker.outcome is not None
        return asker.outcome

    async def _ask_count(self, question: Callable[[int], tuple[bytes, codec.Message]]) -> _Counted:
        asker = _Counted(trio.Event())
        seq = self._waiting.ask(asker, Kind.COUNT, trio.current_time())
        self._asked.unpark_all()
        channel, message = question(seq)
        if not self.link.publish([(channel, codec.encode(message))], self._expected([seq])):
            self._waiting.withdraw(seq)
            raise BrokerUnavailable("the cluster's broker cannot be reached from this node")
        await asker.done.wait()
        return asker

    # -- sending -------------------------------------------------------------------------

    async def _route_all(self) -> None:
        inbox = self._inbox_receive
        async for first in inbox:
            # Everything queued is routed before the router yields, then
            # published in one batch (as the local router's pass).
            with self._batch():
                items: list[Inbound] | None = first
                while items is not None:
                    for item in items:
                        if isinstance(item, Relay):
                            self._relay(item)
                        else:
                            self._reply(item.recipient, item.frame)
                    try:
                        items = inbox.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        items = None
                self._flush()

    def _relay(self, item: Relay) -> None:
        envelope = item.envelope
        asker = _Relayed(
            item.sender,
            item.sender.client_id,
            envelope.to,
            envelope.ref,
            item.size,
            item.received,
            envelope.message,
        )
        self._send(asker)

    def _send(self, asker: _Relayed) -> None:
        """Deliver here, or publish, or both; answer now when the answer is known."""
        holders = self._table.lookup(asker.to)
        if holders:
            outcome = offer(holders, asker.sender_id, asker.body)
            if not self._shared_ids():
                self._decide(asker, outcome)
                return
            if outcome is Outcome.DELIVERED:
                self._decide(asker, outcome)
                self._queue(asker, 0)  # a copy for the subject's other nodes
                return
        if not self.link.health.up:  # answered now, so in the order it came
            self._decide(
                asker, Outcome.RECIPIENT_BUSY if holders else Outcome.RECIPIENT_UNREACHABLE
            )
            return
        seq = self._waiting.ask(asker, Kind.RELAY, trio.current_time())
        self._asked.unpark_all()
        sender = asker.sender
        if sender is not None:
            asker.slot = _Slot()
            held = self._held.get(sender)
            if held is None:
                held = self._held[sender] = collections.deque()
            held.append(asker.slot)
        if holders:  # all busy here: this node's own verdict, as its subscription counts it
            self._waiting.answer(seq, codec.Verdict.BUSY)
        self._queue(asker, seq)

    def _queue(self, asker: _Relayed, seq: int) -> None:
        deliver = codec.Deliver(self.node, seq, asker.sender_id, bytes(asker.body))
        self._pairs.append((self.channels.of_id(asker.to), codec.encode(deliver)))
        self._seqs.append(seq)

    def _flush(self) -> None:
        """Publish what this pass queued, as one batch."""
        if not self._pairs:
            return
        pairs, seqs = self._pairs, self._seqs
        self._pairs, self._seqs = [], []
        if not self.link.publish(pairs, self._expected(seqs)):
            for seq in seqs:
                asker = self._waiting.withdraw(seq) if seq else None
                if isinstance(asker, _Relayed):
                    self._decide(asker, Outcome.RECIPIENT_UNREACHABLE)

    def _expected(self, seqs: list[int]) -> Callable[[list[int] | None], None]:
        def published(counts: list[int] | None) -> None:
            with self._batch():
                for index, seq in enumerate(seqs):
                    if not seq:
                        continue
                    count = None if counts is None else counts[index]
                    if count is None or count < 0:
                        asker = self._waiting.withdraw(seq)
                        if asker is not None:
                            self._answered(asker, None if count is None else Decided.UNREACHABLE)
                        continue
                    decided = self._waiting.expect(seq, count)
                    if decided is not None:
                        self._answered(*decided)

        return published

    # -- answers -------------------------------------------------------------------------

    def received(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Take what the link received (the :class:`~relayd.routing.cluster.link.Receiver` side)."""
        with self._batch():
            for channel, data in messages:
                try:
                    message = codec.decode(data)
                except msgspec.DecodeError:
                    self.link.health.undecodable += 1
                    continue
                if isinstance(message, codec.Answers):
                    for answer in message.answers:
                        decided = self._waiting.answer(answer.seq, answer.value)
                        if decided is not None:
                            self._answered(*decided)
                elif isinstance(message, codec.Ids):
                    asker = self._waiting.peek(message.seq)
                    if isinstance(asker, _Counted):
                        asker.ids += message.ids
                    decided = self._waiting.answer(message.seq, 0)
                    if decided is not None:
                        self._answered(*decided)
                elif channel != self._own:
                    self._holder.take(channel, message)
            self._holder.flush()

    def link_down(self) -> None:
        """The link broke: every open question is decided now (the Receiver side)."""
        with self._batch():
            for asker, result in self._waiting.abandon():
                if isinstance(asker, _Counted):
                    asker.complete = False
                self._answered(asker, result)

    def _answered(self, asker: _Asker, result: codec.Verdict | Decided | int | None) -> None:
        """Finish a question decided by answers, a deadline, or a broken link (None)."""
        if isinstance(asker, _Counted):
            if isinstance(result, int) and not isinstance(result, codec.Verdict):
                asker.total = result
            asker.done.set()
        elif result is None or result is Decided.UNCONFIRMED:
            self._decide(asker, Outcome.DELIVERY_UNCONFIRMED)
        elif result is Decided.UNREACHABLE:
            self._decide(asker, Outcome.RECIPIENT_UNREACHABLE)
        elif isinstance(result, codec.Verdict):
            self._decide(asker, _VERDICTS[result])
        if not len(self._waiting):
            self._settled.unpark_all()

    def _decide(self, asker: _Relayed, outcome: Outcome) -> None:
        """Tell the sender (or the server API) what became of its message, and record it."""
        code = outcome.error
        if code is None:
            self.stats.observe_latency(trio.current_time() - asker.received)
        sender = asker.sender
        if sender is not None:
            frame = (
                ack_frame(sender.dialect, asker.ref)
                if code is None
                else error_frame(sender.dialect, code, DETAILS[code], asker.ref, self.stats)
            )
            self._reply(sender, frame, asker.slot)
        if asker.done is not None:
            asker.outcome = outcome
            asker.done.set()
        self._record(asker.sender_id, asker.to, asker.size, outcome, asker.body)

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        """One batch of decisions: log lines, and each connection's frames, written together.

        Its recorder logs as the settings are now.

        The block must not await (see :func:`relayd.telemetry.log.batched`).
        """
        with batched(), routing_batch():
            self._record = self._events.recorder()
            yield

    def _reply(self, sender: Peer, frame: bytes | None, slot: _Slot | None = None) -> None:
        """Fill ``sender``'s next reply slot, keeping its replies in the order it sent.

        A reply decided now waits behind the sender's earlier messages that
        still wait for other nodes; ``slot`` is the place of a reply decided
        late, which releases every reply behind it that is decided too.
        """
        held = self._held.get(sender)
        if held is None:
            sender.reply(frame)
            return
        if slot is None:
            held.append(_Slot(frame, decided=True))
            return
        slot.frame, slot.decided = frame, True
        while held and held[0].decided:
            sender.reply(held.popleft().frame)
        if not held:
            del self._held[sender]

    async def _expire(self) -> None:
        """Decide questions whose deadline passed, as it passes."""
        waiting = self._waiting
        while True:
            deadline = waiting.next_deadline
            if deadline is None:
                await self._asked.park()
                continue
            await trio.sleep_until(deadline)
            with self._batch():
                for asker, result in waiting.expire(trio.current_time()):
                    if isinstance(asker, _Counted):
                        asker.complete = False
                    self._answered(asker, result)

"""What a cluster node's senders are owed: their replies, in order, and the answers awaited.

A message for an id held elsewhere is answered once the other nodes have
answered, their deadline has passed or the link broke
(:class:`~relayd.routing.cluster.pending.Waiting` decides which, purely);
:class:`Awaited` turns that decision into what the asker hears. A sender
hears its replies in the order it sent its messages: a reply decided at once
waits behind the sender's earlier messages still waiting for other nodes.

The askers: a :class:`Relayed` message (from a connection, or the server
API's publish, which waits on its event) and a :class:`Counted` question
(presence, disconnect, a page of ids; :mod:`~relayd.routing.cluster.queries`).

Resource handling: the router runs :meth:`Awaited.expire` in its nursery.
Bound: a relayed message holds the reply slot its sender's reader reserved,
so at most ``outbox_messages`` per connection wait (docs/scaling.md).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import secrets
from collections.abc import Iterator
from typing import Final

import msgspec
import trio

from relayd.routing.batch import routing_batch
from relayd.routing.cluster import codec
from relayd.routing.cluster.link import NotSent, Published
from relayd.routing.cluster.pending import Decided, Kind, Waiting
from relayd.routing.interface import Peer, Replied
from relayd.routing.replies import DETAILS, ack_frame, error_frame
from relayd.routing.table import Outcome
from relayd.telemetry.line_sink import batched
from relayd.telemetry.messages import MessageEvents, Recorder
from relayd.telemetry.metrics import Stats

__all__ = ["Asker", "Awaited", "Counted", "Relayed", "Slot"]

_VERDICTS: Final = {
    codec.Verdict.DELIVERED: Outcome.DELIVERED,
    codec.Verdict.BUSY: Outcome.RECIPIENT_BUSY,
    codec.Verdict.GONE: Outcome.UNKNOWN_RECIPIENT,
}


def _first_number() -> int:
    """Where this process's question numbers start: at random, never 0, within msgpack's uint64."""
    return secrets.randbelow(1 << 62) + 1


@dataclasses.dataclass(slots=True, eq=False)
class Relayed:
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
    slot: Slot | None = None  # its place among its sender's replies, once it waits


@dataclasses.dataclass(slots=True, eq=False)
class Slot:
    """One reply owed to a sender that has messages waiting for other nodes."""

    frame: bytes | None = None
    decided: bool = False


@dataclasses.dataclass(slots=True, eq=False)
class Counted:
    """A cluster-wide question (presence, disconnect, a page of ids) and what came back.

    ``complete`` is False once it was decided without every node's answer (its
    deadline, a broken link, a node cut off): then ``total`` and ``ids`` are a part.
    ``sent`` is False once the question was refused, by the link or by Redis,
    before any node could receive it: nothing was asked.
    """

    done: trio.Event
    total: int = 0
    ids: list[str] = dataclasses.field(default_factory=list)
    complete: bool = True
    sent: bool = True


Asker = Relayed | Counted


class Awaited:
    """The questions open to other nodes, and the replies owed to senders until they are decided.

    Args:
        timeout_s: how long a question waits for its answers (``reply_timeout_s``).
        events: where message outcomes are counted and logged.
        stats: the counters to add to (errors, relay latency).

    Attributes:
        waiting: the open questions; the router records answers there and
            hands what they decide to :meth:`answered`.
    """

    __slots__ = ("_asked", "_events", "_held", "_now", "_record", "_settled", "stats", "waiting")

    def __init__(self, timeout_s: float, events: MessageEvents, stats: Stats) -> None:
        self.stats = stats
        self._events = events
        self._record: Recorder = events.recorder()  # made afresh per batch: see batch
        self._now = 0.0  # trio's clock, read afresh per batch: see batch
        # Answers find their question by its number alone, on the node's channel,
        # which is the node's name: a late answer meant for an earlier process of
        # the same name (a restart, under systemd's relayd@PORT name) or for
        # another node given the same name by mistake must match none of this
        # process's questions, or it would decide one (a false ack). So each
        # process numbers from its own random start, one of 2**62.
        self.waiting: Waiting[Asker] = Waiting(timeout_s, first=_first_number())
        self._asked = trio.lowlevel.ParkingLot()  # the expiry task, when nothing waits
        self._settled = trio.lowlevel.ParkingLot()  # who waits for every answer owed
        # Senders with messages waiting for other nodes, and the replies they
        # are owed in order (replies reach a sender in the order it sent).
        self._held: dict[Replied, collections.deque[Slot]] = {}

    def __len__(self) -> int:
        return len(self.waiting)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One batch of decisions: log lines, and each connection's frames, written together.

        Its recorder logs as the settings are now, and it reads trio's clock
        once, as it begins: the questions it asks and the latencies it observes
        use that time, early by at most the time one pass takes (microseconds,
        a few milliseconds for a large pass: nothing next to
        ``reply_timeout_s``), for one clock read per pass, not per message.

        The block must not await (see :func:`relayd.telemetry.line_sink.batched`).
        """
        with batched(), routing_batch():
            self._record = self._events.recorder()
            self._now = trio.current_time()
            yield

    def relay(self, asker: Relayed, *, busy_here: bool) -> int:
        """Make ``asker`` wait for other nodes; its question's number.

        Its reply keeps its place among its sender's. ``busy_here``: every
        holder on this node was full (this node's own verdict, as its
        subscription counts it). Called in a :meth:`batch`.
        """
        waiting = self.waiting
        if not waiting:  # the expiry task parks only when no question is open
            self._asked.unpark_all()
        seq = waiting.ask(asker, Kind.RELAY, self._now)
        sender = asker.sender
        if sender is not None:
            asker.slot = Slot()
            held = self._held.get(sender)
            if held is None:
                held = self._held[sender] = collections.deque()
            held.append(asker.slot)
        if busy_here:
            self.waiting.answer(seq, codec.Verdict.BUSY)
        return seq

    def count(self, asker: Counted) -> int:
        """Make ``asker`` wait for other nodes' counts; its question's number."""
        waiting = self.waiting
        if not waiting:  # as in relay
            self._asked.unpark_all()
        return waiting.ask(asker, Kind.COUNT, trio.current_time())

    def refused(self, seqs: list[int]) -> None:
        """The link or Redis refused the batch asking ``seqs`` (0: nobody waits): nothing was sent.

        A message's sender is told ``recipient_unreachable`` (called in a
        :meth:`batch`); a question's asker finds it not :attr:`~Counted.sent`.
        """
        for seq in seqs:
            asker = self.waiting.withdraw(seq) if seq else None
            if isinstance(asker, Relayed):
                self.decide(asker, Outcome.RECIPIENT_UNREACHABLE)
            elif isinstance(asker, Counted):
                asker.sent = asker.complete = False
                asker.done.set()
        if not len(self.waiting):
            self._settled.unpark_all()

    def published(self, seqs: list[int]) -> Published:
        """What to call with the counts of receivers of the batch asking ``seqs``."""

        def published(counts: list[int] | NotSent | None) -> None:
            with self.batch():
                if isinstance(counts, NotSent):  # Redis refused it unrun
                    self.refused(seqs)
                    return
                for index, seq in enumerate(seqs):
                    if not seq:
                        continue
                    count = None if counts is None else counts[index]
                    if count is None or count < 0:
                        asker = self.waiting.withdraw(seq)
                        if asker is not None:
                            self.answered(asker, None if count is None else Decided.UNREACHABLE)
                        continue
                    decided = self.waiting.expect(seq, count)
                    if decided is not None:
                        self.answered(*decided)

        return published

    def abandon(self) -> None:
        """The link broke: every open question is decided now."""
        with self.batch():
            for asker, result in self.waiting.abandon():
                if isinstance(asker, Counted):
                    asker.complete = False
                self.answered(asker, result)

    def answered(self, asker: Asker, result: codec.Verdict | Decided | int | None) -> None:
        """Finish a question decided by answers, a deadline, or a broken link (None)."""
        if isinstance(asker, Counted):
            if isinstance(result, int) and not isinstance(result, codec.Verdict):
                asker.total = result
            else:  # the publish failed, or some node that may hold it is cut off
                asker.complete = False
            asker.done.set()
        elif result is None or result is Decided.UNCONFIRMED:
            self.decide(asker, Outcome.DELIVERY_UNCONFIRMED)
        elif result is Decided.UNREACHABLE:
            self.decide(asker, Outcome.RECIPIENT_UNREACHABLE)
        elif isinstance(result, codec.Verdict):
            self.decide(asker, _VERDICTS[result])
        if not len(self.waiting):
            self._settled.unpark_all()

    def decide(self, asker: Relayed, outcome: Outcome) -> None:
        """Tell the sender (or the server API) what became of its message, and record it.

        Called in a :meth:`batch`.
        """
        self.tell(asker.sender, asker.ref, asker.received, outcome, asker.slot)
        if asker.done is not None:
            asker.outcome = outcome
            asker.done.set()
        self._record(asker.sender_id, asker.to, asker.size, outcome, asker.body)

    def tell(
        self,
        sender: Peer | None,
        ref: str | int | None,
        received: float,
        outcome: Outcome,
        slot: Slot | None = None,
    ) -> None:
        """Count a delivery's latency and give ``sender`` (if any) its ack or error, in order.

        Without recording the outcome (:meth:`decide` does, and so does the
        caller with :attr:`record`, for a message decided before it was a
        question). Called in a :meth:`batch`.
        """
        code = outcome.error
        if code is None:
            self.stats.observe_latency(self._now - received)
        if sender is not None:
            frame = (
                ack_frame(sender.dialect, ref)
                if code is None
                else error_frame(sender.dialect, code, DETAILS[code], ref, self.stats)
            )
            self.reply(sender, frame, slot)

    @property
    def record(self) -> Recorder:
        """Records outcomes as the settings were when the current :meth:`batch` began."""
        return self._record

    def reply(self, sender: Replied, frame: bytes | None, slot: Slot | None = None) -> None:
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
            held.append(Slot(frame, decided=True))
            return
        slot.frame, slot.decided = frame, True
        while held and held[0].decided:
            sender.reply(held.popleft().frame)
        if not held:
            del self._held[sender]

    async def settled(self) -> None:
        """Return once no question is open; the caller bounds the wait."""
        while len(self.waiting):
            await self._settled.park()

    async def expire(self) -> None:
        """Decide questions whose deadline passed, as it passes."""
        waiting = self.waiting
        while True:
            deadline = waiting.next_deadline
            if deadline is None:
                await self._asked.park()
                continue
            await trio.sleep_until(deadline)
            with self.batch():
                for asker, result in waiting.expire(self._now):
                    if isinstance(asker, Counted):
                        asker.complete = False
                    self.answered(asker, result)

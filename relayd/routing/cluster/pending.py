"""Questions waiting for other nodes' answers, and what their askers hear (pure: time passed in).

A message for an id held elsewhere is published once, and PUBLISH says how
many nodes received it. Each of those answers with a
:class:`~relayd.routing.cluster.codec.Verdict`; :class:`Waiting` gathers the
verdicts and decides the outcome the sender hears, exactly once:

* the first ``DELIVERED`` decides at once: ``delivered`` (the ack goes out);
* once every node answered without one: ``recipient_busy`` if any holder was
  full, else ``unknown_recipient`` (every holder had let the id go);
* at the deadline, whatever is missing: ``delivery_unconfirmed``. The message
  may have been delivered (an answer lost with a broken link); relayd never
  sends it again, so it is delivered at most once;
* when the link to Redis is lost: ``delivery_unconfirmed`` too, at once.

Questions to count (presence, disconnect) sum the answers instead, and are
decided when all came or at the deadline, with what came.

Bound: a relay question holds the reply slot its sender's reader reserved, so
at most ``outbox_messages`` per connection wait; a count question is asked by
the server API, one at a time per request. The order questions were asked in
is kept as their numbers, at most twice the open questions plus
:data:`ORDER_SLACK`, about 40 bytes each (the number and its slot).
"""

from __future__ import annotations

import collections
import enum
import itertools
from collections.abc import Iterator
from typing import Final, Generic, TypeVar

from relayd.routing.cluster.codec import Verdict

__all__ = ["Decided", "Kind", "Waiting"]

T = TypeVar("T")

#: Numbers of answered questions :class:`Waiting` may keep beyond twice the open ones
#: (about 40 bytes each: the number and its slot in a deque) before it drops them all.
ORDER_SLACK: Final = 1024


class Kind(enum.Enum):
    """How the answers to a question combine."""

    RELAY = "relay"  # verdicts: the first DELIVERED wins
    COUNT = "count"  # integers: summed


class Decided(enum.Enum):
    """How a relay question was decided, besides by an answer."""

    UNCONFIRMED = "unconfirmed"  # deadline passed, or the link was lost
    UNREACHABLE = "unreachable"  # some node that may hold it is cut off (Link.publish, .ask)


class _Question(Generic[T]):
    __slots__ = ("asker", "deadline", "expected", "kind", "received", "total", "verdicts")

    def __init__(self, asker: T, kind: Kind, deadline: float) -> None:
        self.asker = asker
        self.kind = kind
        self.expected: int | None = None  # until the publish's reply says
        self.deadline = deadline
        self.received = 0
        self.total = 0  # COUNT: the sum so far
        self.verdicts = 0  # RELAY: bit i set when Verdict i was received


class Waiting(Generic[T]):
    """Open questions by number, each with the asker to answer.

    Args:
        timeout_s: how long a question waits for its answers.
        first: the first question's number; the next are numbered on from it. 0 is
            never a question's number (it means "nobody waits"), so it must be > 0.
    """

    __slots__ = ("_numbers", "_open", "_order", "timeout_s")

    def __init__(self, timeout_s: float, first: int = 1) -> None:
        if first <= 0:
            raise ValueError(f"question numbers start above 0, not at {first}")
        self.timeout_s = timeout_s
        self._open: dict[int, _Question[T]] = {}
        # Every question gets the same timeout and the clock only goes forward, so
        # the order questions were asked in is their deadlines' order. Numbers
        # only (the dict's keys: nothing allocated); answered ones are skipped
        # when met at the front, and dropped all at once when they outnumber the
        # open ones (see ask). Not the dict's own order: finding its first key
        # steps over every deleted entry before it, which made expiry quadratic.
        self._order: collections.deque[int] = collections.deque()
        self._numbers = itertools.count(first)

    def ask(self, asker: T, kind: Kind, now: float) -> int:
        """Open a question; its number, to publish with it.

        ``now`` must never be less than at the call before (trio's clock).
        How many nodes will answer is known only once Redis answers the
        publish (:meth:`expect`); answers may come before that.
        """
        seq = next(self._numbers)
        questions, order = self._open, self._order
        questions[seq] = _Question(asker, kind, now + self.timeout_s)
        order.append(seq)
        if len(order) > 2 * len(questions) + ORDER_SLACK:
            # Mostly answered: O(n), once per n questions asked. In place: an
            # expire() under way holds this deque.
            kept = [seq for seq in order if seq in questions]
            order.clear()
            order.extend(kept)
        return seq

    def expect(self, seq: int, receivers: int) -> tuple[T, Verdict | int] | None:
        """Learn how many nodes received question ``seq``; the decision if that completes it.

        Zero receivers decide a relay question as ``GONE`` (nobody holds the
        id) and a count question as 0.
        """
        question = self._open.get(seq)
        if question is None:
            return None
        question.expected = receivers
        return self._decide(seq, question)

    def withdraw(self, seq: int) -> T | None:
        """Close question ``seq`` unanswered (it was never sent); its asker, if it was open."""
        question = self._open.pop(seq, None)
        return None if question is None else question.asker

    def peek(self, seq: int) -> T | None:
        """The asker of open question ``seq``, or None."""
        question = self._open.get(seq)
        return None if question is None else question.asker

    def answer(self, seq: int, value: int) -> tuple[T, Verdict | int] | None:
        """Take one node's answer; the asker and the outcome if this decides the question.

        For a relay question the outcome is a :class:`Verdict`: ``DELIVERED``,
        ``BUSY`` (every holder full) or ``GONE`` (no holder left); for a count
        question, the sum. Answers to questions already decided (or never
        asked) are ignored: None.
        """
        question = self._open.get(seq)
        if question is None:
            return None
        question.received += 1
        if question.kind is Kind.COUNT:
            question.total += max(value, 0)
        elif value == Verdict.DELIVERED:
            del self._open[seq]
            return question.asker, Verdict.DELIVERED
        elif 0 <= value < len(Verdict):
            question.verdicts |= 1 << value
        return self._decide(seq, question)

    def _decide(self, seq: int, question: _Question[T]) -> tuple[T, Verdict | int] | None:
        if question.expected is None or question.received < question.expected:
            return None
        del self._open[seq]
        if question.kind is Kind.COUNT:
            return question.asker, question.total
        busy = question.verdicts & (1 << Verdict.BUSY)
        return question.asker, Verdict.BUSY if busy else Verdict.GONE

    def expire(self, now: float) -> Iterator[tuple[T, Decided | int]]:
        """Decide every question whose deadline has passed, oldest first.

        Yields:
            ``(asker, Decided.UNCONFIRMED)`` for relay questions, ``(asker,
            sum so far)`` for count questions.
        """
        questions, order = self._open, self._order
        while order:
            question = questions.get(order[0])
            if question is not None:
                if question.deadline > now:
                    return
                del questions[order[0]]
            order.popleft()
            if question is not None:
                yield question.asker, _timed_out(question)

    def abandon(self) -> Iterator[tuple[T, Decided | int]]:
        """Decide every open question now (the link was lost), as :meth:`expire` would."""
        questions, self._open = self._open, {}
        self._order.clear()
        for question in questions.values():
            yield question.asker, _timed_out(question)

    @property
    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has something to do; None when nothing waits."""
        questions, order = self._open, self._order
        while order:
            question = questions.get(order[0])
            if question is not None:
                return question.deadline  # the oldest's (see __init__)
            order.popleft()  # answered already
        return None

    def __len__(self) -> int:
        """How many questions are open."""
        return len(self._open)


def _timed_out(question: _Question[T]) -> Decided | int:
    return question.total if question.kind is Kind.COUNT else Decided.UNCONFIRMED

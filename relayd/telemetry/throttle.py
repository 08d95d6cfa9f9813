"""How many lines of a noisy event to write, and a count of those left out; without I/O.

Some events are written whenever a client does something it can do at will:
a refused handshake, a limit that closes its connection, the error relayd
contains at its boundary, a library's warning when descriptors run out. A
client must not be able to decide how much the operator's journal holds, nor
drown the lines that matter, so each such event goes through a
:class:`LineBudget`: per *kind* of line (the event and the field that tells
its kinds apart: a status, a limit, a logger), a bucket of :data:`BURST`
lines refilled at :data:`LINES_PER_S`. A line with no budget left is not
written; it is counted, and :meth:`LineBudget.take_suppressed` hands the
counts out, for a ``log.suppressed`` line that says how many of each kind
were left out (:mod:`relayd.telemetry.log` writes it every
:data:`SUMMARY_INTERVAL_S`).

So one kind of line costs at most ``BURST + LINES_PER_S x t`` lines over
``t`` seconds, plus one summary line per interval, whatever a client does;
and lines of other kinds keep their own budget.

Memory: one bucket per kind of line; kinds are relayd's own names and HTTP
statuses, a few dozen at most.

Time is passed in (the monotonic clock in the daemon, plain floats in tests).
"""

from __future__ import annotations

import dataclasses
from typing import Final

__all__ = ["BURST", "LINES_PER_S", "SUMMARY_INTERVAL_S", "LineBudget", "Suppressed"]

#: Lines of one kind written at once before the budget applies: enough to see
#: what is going on, few enough that a flood costs the journal nothing.
BURST: Final = 10
#: Lines of one kind written per second on average after the burst.
LINES_PER_S: Final = 1.0
#: How often the counts of lines left out are written, in seconds.
SUMMARY_INTERVAL_S: Final = 10.0

Kind = tuple[str, object]


@dataclasses.dataclass(frozen=True, slots=True)
class Suppressed:
    """Lines of one kind left out since the last summary."""

    event: str
    kind: object
    count: int


class LineBudget:
    """Per kind of line, whether the next one may be written.

    Args:
        burst: lines of one kind written at once.
        per_second: lines of one kind written per second after that.
    """

    __slots__ = ("_buckets", "_burst", "_per_second", "_suppressed")

    def __init__(self, burst: int = BURST, per_second: float = LINES_PER_S) -> None:
        self._burst = burst
        self._per_second = per_second
        self._buckets: dict[Kind, tuple[float, float]] = {}  # kind -> (lines left, when)
        self._suppressed: dict[Kind, int] = {}

    def allow(self, event: str, kind: object, now: float) -> bool:
        """Whether a line of ``event`` and ``kind`` at ``now`` is written (counted if not)."""
        key = (event, kind)
        left, then = self._buckets.get(key, (float(self._burst), now))
        left = min(float(self._burst), left + (now - then) * self._per_second)
        if left >= 1:
            self._buckets[key] = (left - 1, now)
            return True
        self._buckets[key] = (left, now)
        self._suppressed[key] = self._suppressed.get(key, 0) + 1
        return False

    def refill(self) -> None:
        """Give every kind its whole burst again; the counts of lines left out stay."""
        self._buckets.clear()

    def take_suppressed(self) -> list[Suppressed]:
        """The lines left out since the last call, by kind; the counts start again at 0."""
        taken = [Suppressed(event, kind, n) for (event, kind), n in self._suppressed.items()]
        self._suppressed.clear()
        return taken

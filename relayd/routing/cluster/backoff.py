"""How long to wait before the next attempt to reach Redis (pure: randomness passed in)."""

from __future__ import annotations

import random
from typing import Final

__all__ = ["FIRST_WAIT_S", "Backoff"]

#: The wait before the first retry: a Redis restart takes a fraction of a
#: second, and a node that is back quickly loses little.
FIRST_WAIT_S: Final = 0.1


class Backoff:
    """Doubling waits from :data:`FIRST_WAIT_S` up to ``max_s``, with full jitter.

    Full jitter (a wait drawn uniformly between half the step and the step)
    keeps the nodes of a cluster, which all lost Redis at the same moment,
    from knocking on it in step when it comes back.

    Args:
        max_s: the longest wait (``cluster.reconnect_max_s``).
        rng: the source of jitter (seeded in tests).
    """

    __slots__ = ("_max_s", "_rng", "_step")

    def __init__(self, max_s: float, rng: random.Random | None = None) -> None:
        self._max_s = max_s
        self._rng = rng or random.Random()
        self._step = FIRST_WAIT_S

    def next_wait(self) -> float:
        """The wait before the next attempt; each call doubles the next one, up to ``max_s``."""
        step = min(self._step, self._max_s)
        self._step = step * 2
        return self._rng.uniform(step / 2, step)

    def reset(self) -> None:
        """Start again from the shortest wait (after a connection that worked)."""
        self._step = FIRST_WAIT_S

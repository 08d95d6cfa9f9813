"""When to try connecting again, without I/O: exponential backoff with full jitter."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from relayd.client.options import is_count

__all__ = ["Backoff"]

#: The first ceiling: a relayd restarted by systemd listens again within about
#: a second, so the first attempts come soon after the close.
FIRST_S: Final = 0.5
#: The largest ceiling: a client never waits more than this between attempts,
#: however long the server has been gone.
MAX_S: Final = 30.0
#: Each failed attempt doubles the ceiling.
FACTOR: Final = 2.0


@dataclass(frozen=True)
class Backoff:
    """How a client waits between attempts to reconnect.

    Before attempt *n* (from 0) it waits a random time between 0 and
    ``min(max_s, first_s * factor ** n)`` seconds ("full jitter"), so the
    clients a restart disconnected at once do not all come back at once.

    Attributes:
        first_s: the ceiling of the first wait, in seconds.
        max_s: the largest ceiling, in seconds.
        factor: how much the ceiling grows after each failed attempt.
        attempts: how many attempts after one connection is lost before the
            client gives up and raises; None to keep trying. Counting starts
            again after each successful connection.

    Raises:
        ValueError: a figure that cannot work (not positive, a ceiling below
            the first, a factor below 1, fewer than one attempt).
    """

    first_s: float = FIRST_S
    max_s: float = MAX_S
    factor: float = FACTOR
    attempts: int | None = None

    def __post_init__(self) -> None:
        figures = (self.first_s, self.max_s, self.factor)
        if not all(
            isinstance(f, int | float) and not isinstance(f, bool) and math.isfinite(f)
            for f in figures
        ):
            raise ValueError("first_s, max_s and factor must be finite numbers")
        if not 0 < self.first_s <= self.max_s:
            raise ValueError("need 0 < first_s <= max_s")
        if self.factor < 1:
            raise ValueError("factor must be at least 1")
        if self.attempts is not None and not is_count(self.attempts, 1):
            raise ValueError("attempts must be a whole number, at least 1, or None to keep trying")

    def delays(self, uniform: Callable[[], float] = random.random) -> Iterator[float]:
        """The waits before each attempt, in seconds; ends after :attr:`attempts`.

        Args:
            uniform: a source of numbers in [0, 1); tests pass their own.
        """
        ceiling = self.first_s
        made = 0
        while self.attempts is None or made < self.attempts:
            yield uniform() * ceiling
            ceiling = min(self.max_s, ceiling * self.factor)
            made += 1

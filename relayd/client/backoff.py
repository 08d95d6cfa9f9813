"""When to try connecting again, without I/O: exponential backoff with full jitter."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from relayd.client.options import is_count

__all__ = ["Backoff", "Pacing"]

#: The first ceiling: a relayd restarted by systemd listens again within about
#: a second, so the first attempts come soon after the close.
FIRST_S: Final = 0.5
#: The largest ceiling: a client never waits more than this between attempts,
#: however long the server has been gone.
MAX_S: Final = 30.0
#: Each attempt doubles the ceiling, until a connection stays up ``stable_s``.
FACTOR: Final = 2.0


@dataclass(frozen=True)
class Backoff:
    """How a client waits between attempts to reconnect.

    Before attempt *n* (from 0) it waits a random time between 0 and
    ``min(max_s, first_s * factor ** n)`` seconds ("full jitter"), so the
    clients a restart disconnected at once do not all come back at once. *n*
    counts the attempts since the last connection that stayed up ``stable_s``
    (:class:`Pacing`): one that succeeded and was closed sooner counts too.

    Attributes:
        first_s: the ceiling of the first wait, in seconds.
        max_s: the largest ceiling, in seconds.
        factor: how much the ceiling grows after each failed attempt.
        attempts: how many attempts after one connection is lost before the
            client gives up and raises; None to keep trying. Counting starts
            again after each successful connection.
        stable_s: how long a connection must stay up for the ceiling to start
            again from ``first_s`` when it is lost; None (the default) for
            ``max_s``. A connection closed sooner (a relayd that accepts and
            closes at once, with 1011 or 1013, or drops the connection after
            its welcome) counts as a failed attempt: the ceiling goes on
            growing, so such a relayd is not retried every ``first_s`` by all
            its clients at once. ``max_s`` because a connection that lasted
            that long already kept its attempts as far apart as the longest
            wait does.

    Raises:
        ValueError: a figure that cannot work (not positive, a ceiling below
            the first, a factor below 1, fewer than one attempt, a
            ``stable_s`` that is not positive).
    """

    first_s: float = FIRST_S
    max_s: float = MAX_S
    factor: float = FACTOR
    attempts: int | None = None
    stable_s: float | None = None

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
        stable = self.stable_s
        if stable is not None and not (
            isinstance(stable, int | float)
            and not isinstance(stable, bool)
            and math.isfinite(stable)
            and stable > 0
        ):
            raise ValueError("stable_s must be a finite number above 0, or None for max_s")

    @property
    def stable_after_s(self) -> float:
        """How long a connection must stay up for its loss to start from ``first_s``."""
        return self.max_s if self.stable_s is None else self.stable_s

    def delays(self, uniform: Callable[[], float] = random.random) -> Iterator[float]:
        """The waits before each attempt, in seconds; ends after :attr:`attempts`.

        Args:
            uniform: a source of numbers in [0, 1); tests pass their own.
        """
        return Pacing(self, uniform).waits()


class Pacing:
    """One client's waits, across its connections: a :class:`Backoff` with a memory.

    The ceiling grows with each attempt, whether it failed or made a
    connection, and starts again from ``first_s`` only once a connection
    stayed up :attr:`Backoff.stable_after_s` (:meth:`lost_after`). The count
    of attempts that ``attempts`` bounds starts again after each connection.
    """

    def __init__(self, backoff: Backoff, uniform: Callable[[], float] | None = None) -> None:
        """Args: uniform: a source of numbers in [0, 1); None for :func:`random.random`."""
        self.backoff = backoff
        self._uniform = random.random if uniform is None else uniform
        self._ceiling = backoff.first_s

    @property
    def ceiling(self) -> float:
        """The ceiling of the next wait, in seconds."""
        return self._ceiling

    def lost_after(self, up_s: float) -> None:
        """A connection was lost after ``up_s`` seconds up: start again if it was stable."""
        if up_s >= self.backoff.stable_after_s:
            self._ceiling = self.backoff.first_s

    def waits(self) -> Iterator[float]:
        """The waits before each attempt after one loss; ends after ``attempts``."""
        backoff = self.backoff
        made = 0
        while backoff.attempts is None or made < backoff.attempts:
            wait = self._uniform() * self._ceiling
            # Grown as the attempt starts: if it connects, and the connection is
            # closed at once, the next wait is longer.
            self._ceiling = min(backoff.max_s, self._ceiling * backoff.factor)
            made += 1
            yield wait

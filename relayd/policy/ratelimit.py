"""Per-connection message rate limiting, without I/O.

A connection may send ``rate`` messages per second on average and ``burst`` at
once (a token bucket). A message over the limit is refused with
``rate_limited``; refusals are themselves counted in a second bucket of the
same shape, so a client that keeps sending at more than twice the allowed rate
runs that one dry too and is closed with 1008. A client that slips over the
limit now and then is only told, never closed.

Time is passed in (trio's clock in the daemon, plain floats in tests).
"""

from __future__ import annotations

import enum

__all__ = ["RateLimiter", "TokenBucket", "Verdict"]


class TokenBucket:
    """A token bucket: ``capacity`` tokens, refilled at ``rate`` per second.

    Starts full.
    """

    __slots__ = ("_capacity", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError("rate must be > 0 and capacity >= 1")
        self._rate = rate
        self._capacity = capacity
        self._tokens = capacity
        self._stamp = now

    def take(self, now: float) -> bool:
        """Take one token if there is one; True if taken."""
        tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if tokens >= 1:
            self._tokens = tokens - 1
            return True
        self._tokens = tokens
        return False


class Verdict(enum.Enum):
    """What to do with one incoming message."""

    ALLOW = "allow"
    REFUSE = "refuse"  # answer rate_limited, keep the connection
    CLOSE = "close"  # sustained abuse: close with 1008


class RateLimiter:
    """The message and abuse buckets of one connection."""

    __slots__ = ("_abuse", "_messages")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._messages = TokenBucket(rate, burst, now)
        self._abuse = TokenBucket(rate, burst, now)

    def check(self, now: float) -> Verdict:
        """Judge a message arriving at ``now``."""
        if self._messages.take(now):
            return Verdict.ALLOW
        if self._abuse.take(now):
            return Verdict.REFUSE
        return Verdict.CLOSE

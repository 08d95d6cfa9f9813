"""Per-connection message rate limiting and frame pacing, without I/O.

A connection may send ``rate`` messages per second on average and ``burst`` at
once (a token bucket). A message over the limit is refused with
``rate_limited``; refusals are themselves counted in a second bucket of the
same shape, so a client that keeps sending at more than twice the allowed rate
runs that one dry too and is closed with 1008. A client that slips over the
limit now and then is only told, never closed.

Frames are paced apart from messages (:class:`FramePacer`): every frame a
client sends (a fragment, a ping, an empty continuation frame) takes a token
from a bucket of ``frame_burst`` refilled at ``frames_per_second``. The frame
parser is told how many tokens there are before each read and refuses the
frame past them with 1008, so a flood of frames that never make a message is
closed however little each frame carries.

Time is passed in (trio's clock in the daemon, plain floats in tests).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["ALLOW", "CLOSE", "REFUSE", "FramePacer", "RateLimiter", "TokenBucket", "Verdict"]


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
        # A comparison, not min(): this runs for every message, and a call to a
        # builtin costs more than the arithmetic.
        tokens = self._tokens + (now - self._stamp) * self._rate
        if tokens >= self._capacity:
            tokens = self._capacity
        self._stamp = now
        if tokens >= 1:
            self._tokens = tokens - 1
            return True
        self._tokens = tokens
        return False

    def until_token(self, now: float) -> float:
        """Seconds from ``now`` until the bucket holds a whole token; 0 if it holds one."""
        tokens = self._tokens + (now - self._stamp) * self._rate
        return 0.0 if tokens >= 1 else (1 - tokens) / self._rate

    def available(self, now: float, spent: int = 0) -> int:
        """Whole tokens there are at ``now``, once ``spent`` tokens (taken since) are paid for."""
        tokens = self._tokens - spent + (now - self._stamp) * self._rate
        if tokens >= self._capacity:
            tokens = self._capacity
        self._tokens = tokens
        self._stamp = now
        return int(tokens)


class Verdict(enum.Enum):
    """What to do with one incoming message."""

    ALLOW = "allow"
    REFUSE = "refuse"  # answer rate_limited, keep the connection
    CLOSE = "close"  # sustained abuse: close with 1008


#: The verdicts as module globals, for code that judges every message: an
#: attribute of an enum class (``Verdict.ALLOW``) is looked up through
#: ``EnumType.__getattr__``'s slot, several times a global's cost.
ALLOW: Final = Verdict.ALLOW
REFUSE: Final = Verdict.REFUSE
CLOSE: Final = Verdict.CLOSE


class RateLimiter:
    """The message and abuse buckets of one connection."""

    __slots__ = ("_abuse", "_messages")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._messages = TokenBucket(rate, burst, now)
        self._abuse = TokenBucket(rate, burst, now)

    def check(self, now: float) -> Verdict:
        """Judge a message arriving at ``now``."""
        if self._messages.take(now):
            return ALLOW
        if self._abuse.take(now):
            return REFUSE
        return CLOSE

    def retry_after_ms(self, now: float) -> int:
        """Whole milliseconds from ``now`` until a message would be allowed; at least 1.

        Rounded up past the exact time, so that a message sent that long after
        a refusal arrives at a bucket that holds its token, not one a rounding
        short of it.
        """
        return int(self._messages.until_token(now) * 1000) + 1


class FramePacer(TokenBucket):
    """The frames one connection may send: a token bucket over its parser's count.

    A token bucket itself rather than an owner of one: one object less for
    every connection (some 40 bytes). Its users call :meth:`allowance` only
    (``take`` and ``available`` would skip the count it keeps).

    Args:
        rate: frames per second, on average.
        burst: frames at once (the bucket's size).
        now: the time the connection opened.
    """

    __slots__ = ("_counted",)

    def __init__(self, rate: float, burst: int, now: float) -> None:
        super().__init__(rate, burst, now)
        self._counted = 0

    def allowance(self, now: float, frames: int) -> int:
        """How many more frames may arrive at ``now``.

        Args:
            now: the time.
            frames: every frame the connection has sent so far (the parser's
                count); those not yet paid for are taken from the bucket.
        """
        allowed = self.available(now, frames - self._counted)
        self._counted = frames
        return allowed

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
import math
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

    @property
    def capacity(self) -> float:
        """The most tokens the bucket holds (the burst)."""
        return self._capacity

    def until_token(self, now: float) -> float:
        """Seconds from ``now`` until the bucket holds a whole token; 0 if it holds one."""
        return self._until(now, 1)

    def until_full(self, now: float) -> float:
        """Seconds from ``now`` until the bucket is full; 0 if it is."""
        return self._until(now, self._capacity)

    def _until(self, now: float, level: float) -> float:
        tokens = self._tokens + (now - self._stamp) * self._rate
        return 0.0 if tokens >= level else (level - tokens) / self._rate

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


#: No turn promised yet (one float for every limiter: a limiter is made per connection).
_NO_TURN: Final = -math.inf


class RateLimiter:
    """The message and abuse buckets of one connection, and the turns promised to refusals.

    Args:
        rate: messages per second, on average.
        burst: messages at once (each bucket's size).
        now: the time.
        owed: refusals that take nothing from the abuse bucket, used before it (see
            :meth:`renewed`).
    """

    __slots__ = ("_abuse", "_gap", "_largest", "_messages", "_owed", "_promised")

    def __init__(self, rate: float, burst: int, now: float, *, owed: int = 0) -> None:
        self._messages = TokenBucket(rate, burst, now)
        self._abuse = TokenBucket(rate, burst, now)
        # When the turn promised to the last refused message is due (see retry_after_ms),
        # and the least time between two turns: an interval of the rate.
        self._promised = _NO_TURN
        self._gap = 1 / rate
        self._owed = owed
        # The largest burst of this limiter and those it follows (see renewed).
        self._largest = burst

    def check(self, now: float) -> Verdict:
        """Judge a message arriving at ``now``."""
        if self._messages.take(now):
            return ALLOW
        if self._owed:
            self._owed -= 1
            return REFUSE
        if self._abuse.take(now):
            return REFUSE
        return CLOSE

    def renewed(self, rate: float, burst: int, now: float) -> RateLimiter:
        """The limiter that follows this one when a reload changes the rate or burst.

        Made at the connection's first message after the reload (``now``). The
        new rate starts with full buckets. It keeps the turns this limiter
        promised: a turn it promises comes an interval of the new rate and a
        millisecond after the turn before it, or later. And it owes refusals
        that take nothing from its abuse bucket, used before it: as many as the
        largest burst of this limiter and those it followed. A client sends the
        messages refused before the reload again at the turns it was told (at
        most that burst of them, if it sent at most a burst at once), whether or
        not the new rate has room for them; each is then refused and told a new
        turn. Sent at their turns, late by a steady delay, none is closed,
        however small the new burst; a delay that varies by about the new
        interval can bunch them, and with many waiting and a new burst of 1 or 2
        their refusals may outrun what is owed.

        What is owed is used up by refusals only, and does not expire (a client
        late by minutes still finds it): a flood after the reload is refused
        that many more times before the 1008. Each reload owes it afresh, never
        more than the largest burst in force before it.
        """
        renewed = RateLimiter(rate, burst, now, owed=self._largest)
        renewed._largest = max(self._largest, burst)
        renewed._promised = self._promised
        # Its turns are an interval and a millisecond apart: a wait is told in whole
        # milliseconds, and at a rate of hundreds a second two messages then come back
        # within the same millisecond, which a new burst of 1 has no room for (the
        # old bucket's burst had).
        renewed._gap += 0.001
        return renewed

    def retry_after_ms(self, now: float) -> int:
        """The wait to tell a message refused at ``now``: whole milliseconds until its turn.

        Each refused message is promised a turn of its own: the first time the
        message bucket holds a token, or one interval after the turn promised
        to the refusal before it, whichever is later (messages refused together
        then each get a token, where one wait for all let one through and
        refused the others again); and never before the abuse bucket is full
        again, so that the messages sent after the last turn, as many at once as
        the burst, are at worst refused and told, never the 1008 (with the abuse
        bucket one token short, a group sent at once after a group's turns was
        refused in part and closed). That costs nothing for a group's last
        refusal (the abuse bucket refills in the turns it waits anyway), and at
        most an interval for a lone one. A message sent again at its turn, with
        nothing new sent meanwhile and no reload since, is allowed; after a
        reload that changed the rate or burst it may be refused again, each time
        told a new turn, and is never closed (:meth:`renewed`). A turn not taken
        up only makes later ones later, by an interval each.

        Rounded down to the millisecond and two more, so that float rounding
        (relayd's clock runs from an arbitrary offset) never leaves a message
        sent that long after its refusal a hair short of its turn.
        """
        due = max(
            now + self._messages.until_token(now),
            self._promised + self._gap,
            now + self._abuse.until_full(now),
        )
        self._promised = due
        return int((due - now) * 1000) + 2


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

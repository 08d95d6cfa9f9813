"""One connection's deadlines, without I/O: keepalive, idle timeout, slow consumer.

* **Keepalive:** a ping every ``ping_interval_s``; a pong must come within
  ``pong_timeout_s`` of the first unanswered ping, or the connection closes
  with 1011.
* **Idle:** no message either way for ``idle_timeout_s`` closes it with 1000.
* **Slow consumer:** from the first delivery its full outbox refused, its
  writer must take frames within ``slow_consumer_timeout_s``, or it closes
  with 1013.

The connection's reader waits for its socket until :meth:`Timers.deadline`,
then asks :meth:`Timers.due` what to do. The limits are passed in at each
call (a reload may change them; 0 turns a timer off), and so is the time.
Tested with plain values in ``tests/test_timers.py``.
"""

from __future__ import annotations

import enum
import math

from relayd.config import LimitsSettings

__all__ = ["Due", "Timers"]


class Due(enum.Enum):
    """What a timer that came due asks of the connection."""

    NOTHING = "nothing"
    PING = "ping"  # send a ping
    NO_PONG = "no_pong"  # close with 1011: the keepalive went unanswered
    IDLE = "idle"  # close with 1000
    STUCK = "stuck"  # close with 1013: a slow consumer


class Timers:
    """The deadlines of one connection.

    Args:
        limits: the limits when the connection opened; its
            ``slow_consumer_timeout_s`` is kept for the connection's life, like
            the size of its outbox.
        now: when it opened.

    Attributes:
        stuck_deadline: when the connection closes as a slow consumer; inf
            while its outbox takes deliveries.
    """

    __slots__ = ("_last_activity", "_next_ping", "_pong_deadline", "_slow_s", "stuck_deadline")

    def __init__(self, limits: LimitsSettings, now: float) -> None:
        self._last_activity = now
        self._next_ping = now + (limits.ping_interval_s or math.inf)
        self._pong_deadline = math.inf
        self._slow_s = limits.slow_consumer_timeout_s
        self.stuck_deadline = math.inf

    @property
    def slow_consumer_timeout_s(self) -> float:
        """How long the outbox may refuse, and the reader wait for reply slots."""
        return self._slow_s

    def active(self, now: float) -> None:
        """A message went either way at ``now``."""
        self._last_activity = now

    def pong(self) -> None:
        """A pong came: the keepalive is answered."""
        self._pong_deadline = math.inf

    def refused(self, now: float) -> float | None:
        """A delivery was refused at ``now``; the new slow-consumer deadline, if this starts it."""
        if self.stuck_deadline != math.inf:
            return None
        self.stuck_deadline = now + self._slow_s
        return self.stuck_deadline

    def progress(self) -> None:
        """The writer took frames: the slow-consumer clock stops."""
        self.stuck_deadline = math.inf

    def deadline(self, limits: LimitsSettings) -> float:
        """The time of the next thing due."""
        idle = limits.idle_timeout_s or math.inf
        return min(
            self._next_ping, self._last_activity + idle, self._pong_deadline, self.stuck_deadline
        )

    def due(self, now: float, limits: LimitsSettings) -> Due:
        """What is due at ``now``, most serious first; a ping due is scheduled as sent."""
        if now >= self.stuck_deadline:
            return Due.STUCK
        if now >= self._pong_deadline:
            return Due.NO_PONG
        if now >= self._last_activity + (limits.idle_timeout_s or math.inf):
            return Due.IDLE
        if now >= self._next_ping:
            self._next_ping = now + (limits.ping_interval_s or math.inf)
            if self._pong_deadline == math.inf:
                self._pong_deadline = now + limits.pong_timeout_s
            return Due.PING
        return Due.NOTHING

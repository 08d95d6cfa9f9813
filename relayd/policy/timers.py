"""One connection's deadlines, without I/O: keepalive, idle timeout, slow consumer.

* **Keepalive:** a ping once nothing has come from the client for
  ``ping_interval_s`` (no message or ping of its own), and every ``ping_interval_s``
  while that lasts; a pong must come within ``pong_timeout_s`` of the first
  unanswered ping, or the connection closes with 1011. A client heard from
  more often is never pinged: what it sent shows it is there, and kept every
  middlebox's state for the connection alive, as a ping would. A dead one is
  still found within ``ping_interval_s + pong_timeout_s`` of the last frame it
  sent. (A ping cycle, ping, pong and two deadline moves, costs relayd about
  1.5 lone messages' work: with a message every 5 s per connection, pinging
  every connection every 30 s added a fifth to each message's bytecodes.)
* **Idle:** no message either way for ``idle_timeout_s`` closes it with 1000.
* **Slow consumer:** from the first delivery its full outbox refused, its
  writer must take frames within ``slow_consumer_timeout_s``, or it closes
  with 1013.

The connection's reader waits for its socket until :meth:`Timers.deadline`,
then asks :meth:`Timers.due` what to do. The limits are passed in at each
call (a reload may change them; 0 turns a timer off), and so is the time.
Tested with plain values in ``tests/test_timers.py``.

**A message does not move the deadline.** The idle timeout is looked at, not
pushed back: :meth:`Timers.deadline` gives the time it was last armed for, and
:meth:`Timers.due` at that time arms it again for the connection's last
activity if there was any since (it is then :attr:`Due.NOTHING`). Each move
of the reader's deadline costs trio a heap entry and a context manager; with
pings off, the idle timeout is the next deadline, and every message would move
it (8.3% of a lone message's bytecodes). Armed lazily, it costs one wake-up
per ``idle_timeout_s`` of a busy connection, and the connection still closes
exactly ``idle_timeout_s`` after its last message.
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

    __slots__ = (
        "_idle_at",
        "_idle_s",
        "_last_activity",
        "_last_heard",
        "_next_ping",
        "_ping_s",
        "_pong_deadline",
        "_push_ping_after",
        "_slow_s",
        "stuck_deadline",
    )

    def __init__(self, limits: LimitsSettings, now: float) -> None:
        self._last_activity = self._last_heard = now
        # The idle timeout's check: armed for _last_activity + _idle_s, as it was
        # then; _idle_s is kept to see a reload change it.
        self._idle_s = limits.idle_timeout_s or math.inf
        self._idle_at = now + self._idle_s
        self._arm_ping(now, limits.ping_interval_s or math.inf)  # _next_ping and its kin
        self._pong_deadline = math.inf
        self._slow_s = limits.slow_consumer_timeout_s
        self.stuck_deadline = math.inf

    @property
    def slow_consumer_timeout_s(self) -> float:
        """How long the outbox may refuse, and the reader wait for reply slots."""
        return self._slow_s

    def active(self, now: float) -> None:
        """A message went to the client at ``now``."""
        self._last_activity = now

    def received(self, now: float) -> None:
        """A message came from the client at ``now``: activity, and the client heard from.

        A ping armed for less than half an interval from now is put off to an
        interval from now: the deadline moves at most twice an interval, and a
        client that talks more often never has its reader woken for keepalive.
        """
        self._last_activity = self._last_heard = now
        if now >= self._push_ping_after:
            self._arm_ping(now, self._ping_s)

    def _arm_ping(self, now: float, interval: float) -> None:
        """The next ping, an ``interval`` after ``now``."""
        self._next_ping = now + interval
        self._ping_s = interval
        self._push_ping_after = now + interval / 2

    def heard(self, now: float) -> None:
        """A control frame came from the client at ``now``: not activity, but it is there."""
        self._last_heard = now

    def pong(self) -> None:
        """A pong came: the keepalive is answered.

        Not counted as heard: the next ping is already due an interval after the
        one it answers, and moving it by the round trip would cost a wake-up.
        """
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
        """When to call :meth:`due` next: the next thing due, or the idle timeout's check.

        A reload's idle timeout and ping interval apply here, at once: the idle
        check is armed for the last activity, the next ping for an interval
        after the client was last heard from (pings turned on by a reload reach
        a connection at its next read or timer, as they would have it then).
        """
        idle = limits.idle_timeout_s or math.inf
        if idle != self._idle_s:  # a reload changed it: it applies at once
            self._idle_s = idle
            self._idle_at = self._last_activity + idle
        ping = limits.ping_interval_s or math.inf
        if ping != self._ping_s:  # so does a reload's ping interval
            self._arm_ping(self._last_heard, ping)
        return min(self._next_ping, self._idle_at, self._pong_deadline, self.stuck_deadline)

    def due(self, now: float, limits: LimitsSettings) -> Due:
        """What is due at ``now``, most serious first; a ping due is scheduled as sent.

        The idle timeout's check, come due, is armed again for the last activity.
        """
        self.deadline(limits)  # a reload's idle timeout, if it changed
        if now >= self.stuck_deadline:
            return Due.STUCK
        if now >= self._pong_deadline:
            return Due.NO_PONG
        if now >= self._idle_at:
            self._idle_at = self._last_activity + self._idle_s
            if now >= self._idle_at:
                return Due.IDLE
        if now >= self._next_ping:
            interval = limits.ping_interval_s or math.inf
            if now < self._last_heard + interval:  # heard from within it: no ping yet
                self._arm_ping(self._last_heard, interval)
                return Due.NOTHING
            self._arm_ping(now, interval)
            if self._pong_deadline == math.inf:
                self._pong_deadline = now + limits.pong_timeout_s
            return Due.PING
        return Due.NOTHING

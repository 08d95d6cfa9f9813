"""Tests for relayd.policy.timers: a connection's deadlines, time passed in as plain floats."""

from __future__ import annotations

import math

import pytest

from relayd.config import LimitsSettings
from relayd.policy.timers import Due, Timers

LIMITS = LimitsSettings(idle_timeout_s=100.0, ping_interval_s=30.0, pong_timeout_s=15.0)
#: Keepalive alone: no idle timeout's check among the deadlines.
KEEPALIVE = LimitsSettings(idle_timeout_s=0, ping_interval_s=30.0, pong_timeout_s=15.0)


def timers(limits: LimitsSettings = LIMITS, slow_s: float = 10.0) -> Timers:
    return Timers(limits.model_copy(update={"slow_consumer_timeout_s": slow_s}), 0.0)


def test_the_first_deadline_is_the_first_ping() -> None:
    assert timers().deadline(LIMITS) == 30.0
    assert timers().due(29.9, LIMITS) is Due.NOTHING


def test_a_ping_is_due_every_interval_and_starts_the_pong_clock_once() -> None:
    t = timers()
    assert t.due(30.0, LIMITS) is Due.PING
    assert t.deadline(LIMITS) == 45.0  # the pong deadline comes before the next ping
    assert t.due(44.0, LIMITS) is Due.NOTHING
    assert t.due(45.0, LIMITS) is Due.NO_PONG


def test_a_pong_stops_the_pong_clock() -> None:
    t = timers()
    t.due(30.0, LIMITS)
    t.pong()
    assert t.deadline(LIMITS) == 60.0
    assert t.due(60.0, LIMITS) is Due.PING


def test_a_client_heard_from_within_the_interval_is_not_pinged() -> None:
    t = timers(KEEPALIVE)
    t.received(20.0)  # a message from the client
    assert t.due(30.0, KEEPALIVE) is Due.NOTHING  # heard 10 s ago: no ping
    assert t.deadline(KEEPALIVE) == 50.0  # one interval after it was last heard
    t.heard(45.0)  # a ping of its own
    assert t.due(50.0, KEEPALIVE) is Due.NOTHING
    assert t.deadline(KEEPALIVE) == 75.0
    assert t.due(75.0, KEEPALIVE) is Due.PING  # silent for an interval
    assert t.deadline(KEEPALIVE) == 90.0  # its pong's deadline
    t.pong()
    assert t.deadline(KEEPALIVE) == 105.0  # the next ping an interval after this one


def test_a_talking_clients_ping_is_put_off_at_most_twice_an_interval_and_never_due() -> None:
    t = timers(KEEPALIVE)
    deadlines = []
    for tenth in range(1, 3001):  # a message every 0.1 s for 300 s
        now = tenth / 10
        assert now < t.deadline(KEEPALIVE)  # the reader is never woken for keepalive
        t.received(now)
        if t.deadline(KEEPALIVE) not in deadlines:
            deadlines.append(t.deadline(KEEPALIVE))
    # Put off once half an interval has passed since it was armed: at 15, 30, ... 300 s.
    assert deadlines == [30.0 + 15.0 * n for n in range(21)]
    assert t.due(330.0, KEEPALIVE) is Due.PING  # silent since 300 s: pinged at 330


def test_messages_to_the_client_do_not_put_off_its_ping() -> None:
    t = timers(KEEPALIVE)
    for now in (10.0, 20.0, 29.0):
        t.active(now)  # relayd wrote to it: that says nothing of the client
    assert t.due(30.0, KEEPALIVE) is Due.PING


def test_a_client_gone_silent_is_closed_within_an_interval_and_a_pong_timeout() -> None:
    t = timers(KEEPALIVE)
    t.received(100.0)  # its last frame
    now = t.deadline(KEEPALIVE)
    while (due := t.due(now, KEEPALIVE)) is not Due.NO_PONG:
        assert due in (Due.NOTHING, Due.PING)
        now = t.deadline(KEEPALIVE)
    assert now == 100.0 + 30.0 + 15.0


def test_a_second_ping_does_not_move_an_unanswered_pongs_deadline() -> None:
    limits = LimitsSettings(ping_interval_s=10.0, pong_timeout_s=15.0)
    t = timers(limits)
    assert t.due(10.0, limits) is Due.PING
    assert t.due(20.0, limits) is Due.PING
    assert t.due(25.0, limits) is Due.NO_PONG  # 10 + 15, not 20 + 15


def test_silence_for_the_idle_timeout_is_due_and_activity_postpones_it() -> None:
    limits = LimitsSettings(idle_timeout_s=100.0, ping_interval_s=0)
    t = timers(limits)
    assert t.deadline(limits) == 100.0
    t.active(70.0)
    # Activity does not move the deadline (a move costs the reader's cancel scope a
    # heap entry per message); the check at 100 finds it and arms for 170.
    assert t.deadline(limits) == 100.0
    assert t.due(100.0, limits) is Due.NOTHING
    assert t.deadline(limits) == 170.0
    assert t.due(169.0, limits) is Due.NOTHING
    assert t.due(170.0, limits) is Due.IDLE


def test_a_busy_connection_closes_exactly_one_idle_timeout_after_its_last_message() -> None:
    limits = LimitsSettings(idle_timeout_s=100.0, ping_interval_s=0)
    t = timers(limits)
    deadlines = []
    for second in range(1, 251):  # a message a second for 250 s, as the reader sees them
        now = float(second)
        if now >= t.deadline(limits):
            assert t.due(now, limits) is Due.NOTHING
        t.active(now)
        if t.deadline(limits) not in deadlines:
            deadlines.append(t.deadline(limits))
    # What the reader waits for moved at the checks only, not with each message.
    assert deadlines == [100.0, 199.0, 298.0]
    # The reader wakes at each deadline it was given until the last message's timeout.
    now = t.deadline(limits)
    while (due := t.due(now, limits)) is Due.NOTHING:
        assert t.deadline(limits) > now
        now = t.deadline(limits)
    assert (due, now) == (Due.IDLE, 350.0)


def test_a_reload_of_the_idle_timeout_after_activity_counts_from_the_last_message() -> None:
    limits = LimitsSettings(idle_timeout_s=100.0, ping_interval_s=0)
    t = timers(limits)
    t.active(70.0)
    shorter = LimitsSettings(idle_timeout_s=5.0, ping_interval_s=0)
    assert t.deadline(shorter) == 75.0
    assert t.due(74.0, shorter) is Due.NOTHING
    assert t.due(75.0, shorter) is Due.IDLE


def test_zero_turns_pings_and_idle_off() -> None:
    limits = LimitsSettings(idle_timeout_s=0, ping_interval_s=0)
    t = timers(limits)
    assert t.deadline(limits) == math.inf
    assert t.due(1e9, limits) is Due.NOTHING


def test_a_reload_of_the_idle_timeout_applies_at_once() -> None:
    t = timers()
    shorter = LimitsSettings(idle_timeout_s=5.0, ping_interval_s=30.0)
    assert t.deadline(shorter) == 5.0
    assert t.due(5.0, shorter) is Due.IDLE


def test_a_reload_that_turns_pings_on_reaches_an_open_connection() -> None:
    # Opened with pings off, then a reload turns them on: the next ping is due an
    # interval after the client was last heard from, as if they had been on then.
    off = LimitsSettings(idle_timeout_s=0, ping_interval_s=0, pong_timeout_s=5.0)
    t = timers(off)
    t.received(20.0)
    assert t.deadline(off) == math.inf
    on = LimitsSettings(idle_timeout_s=0, ping_interval_s=30.0, pong_timeout_s=5.0)
    assert t.deadline(on) == 50.0
    assert t.due(49.0, on) is Due.NOTHING
    assert t.due(50.0, on) is Due.PING
    assert t.deadline(on) == 55.0  # the pong's deadline
    assert t.due(55.0, on) is Due.NO_PONG


def test_a_reload_of_the_ping_interval_applies_at_once() -> None:
    t = timers(KEEPALIVE)
    t.received(10.0)
    shorter = LimitsSettings(idle_timeout_s=0, ping_interval_s=5.0, pong_timeout_s=15.0)
    assert t.deadline(shorter) == 15.0  # not 40, the old interval's
    assert t.due(15.0, shorter) is Due.PING
    off = LimitsSettings(idle_timeout_s=0, ping_interval_s=0, pong_timeout_s=15.0)
    t.pong()
    assert t.deadline(off) == math.inf  # and pings turned off stop


def test_the_slow_consumer_clock_starts_at_the_first_refusal_only() -> None:
    t = timers(slow_s=10.0)
    assert t.refused(3.0) == 13.0
    assert t.refused(5.0) is None  # already running: not pushed back
    assert t.stuck_deadline == 13.0
    assert t.deadline(LIMITS) == 13.0
    assert t.due(13.0, LIMITS) is Due.STUCK
    assert t.slow_consumer_timeout_s == 10.0


def test_progress_stops_the_slow_consumer_clock_and_a_later_refusal_restarts_it() -> None:
    t = timers(slow_s=10.0)
    t.refused(3.0)
    t.progress()
    assert t.stuck_deadline == math.inf
    assert t.due(13.0, LIMITS) is Due.NOTHING
    assert t.refused(20.0) == 30.0


@pytest.mark.parametrize(
    ("now", "due"),
    [(45.0, Due.STUCK), (44.0, Due.NOTHING)],
)
def test_a_slow_consumer_is_more_serious_than_everything_else(now: float, due: Due) -> None:
    limits = LimitsSettings(idle_timeout_s=40.0, ping_interval_s=30.0, pong_timeout_s=5.0)
    t = timers(limits, slow_s=45.0)
    t.refused(0.0)
    t.due(30.0, limits)  # a ping goes out; its pong is due at 35
    if due is Due.STUCK:
        assert t.due(now, limits) is Due.STUCK
    else:
        assert t.due(now, limits) is Due.NO_PONG

"""Tests for relayd.policy.ratelimit, with time passed in as plain floats."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.policy.ratelimit import FramePacer, RateLimiter, TokenBucket, Verdict

RATE = 10.0  # messages per second
BURST = 5


def take_many(bucket: TokenBucket, count: int, now: float) -> list[bool]:
    return [bucket.take(now) for _ in range(count)]


def verdicts_at_rate(limiter: RateLimiter, per_second: float, count: int) -> list[Verdict]:
    """Send ``count`` messages evenly spaced at ``per_second``, starting at t=0."""
    return [limiter.check(i / per_second) for i in range(count)]


def test_bucket_starts_full() -> None:
    bucket = TokenBucket(rate=2.0, capacity=3, now=100.0)
    assert take_many(bucket, 4, now=100.0) == [True, True, True, False]


def test_bucket_refills_at_rate() -> None:
    bucket = TokenBucket(rate=2.0, capacity=3, now=0.0)
    assert take_many(bucket, 3, now=0.0) == [True, True, True]
    assert bucket.take(0.25) is False  # half a token
    assert bucket.take(0.5) is True  # one whole token by now
    assert bucket.take(0.5) is False
    assert take_many(bucket, 3, now=1.5) == [True, True, False]  # two more in one second


def test_bucket_is_capped_at_capacity() -> None:
    bucket = TokenBucket(rate=2.0, capacity=3, now=0.0)
    assert take_many(bucket, 3, now=0.0) == [True, True, True]
    assert take_many(bucket, 4, now=1000.0) == [True, True, True, False]


def test_failed_take_keeps_partial_tokens() -> None:
    bucket = TokenBucket(rate=1.0, capacity=1, now=0.0)
    assert bucket.take(0.0) is True
    assert bucket.take(0.6) is False
    assert bucket.take(1.0) is True  # 0.6 + 0.4 of refill


@pytest.mark.parametrize(
    ("rate", "capacity"),
    [(0.0, 5), (-1.0, 5), (1.0, 0), (1.0, 0.5), (1.0, -3)],
)
def test_bucket_rejects_invalid_arguments(rate: float, capacity: float) -> None:
    with pytest.raises(ValueError, match=r"^rate must be > 0 and capacity >= 1$"):
        TokenBucket(rate, capacity, now=0.0)


def test_limiter_allows_burst_at_once_then_refuses() -> None:
    limiter = RateLimiter(RATE, BURST, now=0.0)
    verdicts = [limiter.check(0.0) for _ in range(BURST + 1)]
    assert verdicts == [Verdict.ALLOW] * BURST + [Verdict.REFUSE]


def test_limiter_allows_again_after_refill() -> None:
    limiter = RateLimiter(RATE, BURST, now=0.0)
    assert [limiter.check(0.0) for _ in range(BURST + 1)][-1] is Verdict.REFUSE
    assert limiter.check(1 / RATE) is Verdict.ALLOW


@pytest.mark.parametrize("per_second", [RATE / 10, RATE / 2, RATE])
def test_client_at_the_allowed_rate_is_never_refused(per_second: float) -> None:
    limiter = RateLimiter(RATE, BURST, now=0.0)
    assert set(verdicts_at_rate(limiter, per_second, 10_000)) == {Verdict.ALLOW}


@pytest.mark.parametrize("per_second", [RATE * 1.2, RATE * 1.5, RATE * 1.9])
def test_client_between_one_and_two_times_the_rate_is_refused_never_closed(
    per_second: float,
) -> None:
    limiter = RateLimiter(RATE, BURST, now=0.0)
    verdicts = verdicts_at_rate(limiter, per_second, 10_000)
    assert Verdict.REFUSE in verdicts
    assert Verdict.CLOSE not in verdicts


@pytest.mark.parametrize("per_second", [RATE * 2.5, RATE * 3, RATE * 100])
def test_client_above_twice_the_rate_is_eventually_closed(per_second: float) -> None:
    limiter = RateLimiter(RATE, BURST, now=0.0)
    verdicts = verdicts_at_rate(limiter, per_second, 1_000)
    assert verdicts[:BURST] == [Verdict.ALLOW] * BURST
    assert Verdict.CLOSE in verdicts
    first_close = verdicts.index(Verdict.CLOSE)
    assert Verdict.REFUSE in verdicts[:first_close]  # told before being closed


def test_client_slipping_over_now_and_then_is_only_refused() -> None:
    # Once a second, one message more than the burst arrives at once.
    limiter = RateLimiter(RATE, BURST, now=0.0)
    verdicts = [limiter.check(float(second)) for second in range(100) for _ in range(BURST + 1)]
    assert verdicts.count(Verdict.REFUSE) == 100
    assert verdicts.count(Verdict.ALLOW) == 100 * BURST
    assert Verdict.CLOSE not in verdicts


@pytest.mark.parametrize(("rate", "burst"), [(2.0, 3), (50.0, 100), (3.0, 7)])
@pytest.mark.parametrize("late", [0.0, 0.13])
def test_a_lone_refusal_waits_an_interval_and_is_allowed_after_it(
    rate: float, burst: int, late: float
) -> None:
    # A refusal takes a token of the abuse bucket, full before it: the message's turn
    # is when that token is back, an interval on (the message bucket's token comes
    # then or sooner), so that a burst sent after it can at worst be refused, not closed.
    limiter = RateLimiter(rate, burst, now=100.0)
    assert [limiter.check(100.0) for _ in range(burst)] == [Verdict.ALLOW] * burst
    refused_at = 100.0 + late / rate  # part of a token refilled since
    assert limiter.check(refused_at) is Verdict.REFUSE
    wait_ms = limiter.retry_after_ms(refused_at)
    assert 1000 / rate + 1 - 1e-6 < wait_ms <= 1000 / rate + 2
    turn = refused_at + wait_ms / 1000
    assert limiter.check(turn) is Verdict.ALLOW
    verdicts = [limiter.check(turn) for _ in range(burst)]
    assert Verdict.CLOSE not in verdicts


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.01, 5000),
    burst=st.integers(1, 200),
    start=st.floats(0, 1e9),
    # (messages at once, pause in intervals, whether each refused one is given up)
    steps=st.lists(
        st.tuples(st.integers(1, 200), st.floats(0, 5), st.lists(st.booleans(), max_size=200)),
        min_size=1,
        max_size=12,
    ),
)
def test_a_client_that_sends_refused_messages_again_at_their_turns_is_never_closed(
    rate: float, burst: int, start: float, steps: list[tuple[int, float, list[bool]]]
) -> None:
    # Groups of up to the burst sent at once, or one at a time, after pauses; each
    # refused message sent again exactly at its turn, or given up, and nothing new
    # until the last turn. With the abuse bucket a token short at a turn, the next
    # group was refused in part and closed.
    limiter = RateLimiter(rate, burst, now=start)
    now = start
    for size, pause, given_up in steps:
        now += pause / rate
        turns = []
        for _ in range(min(size, burst)):
            verdict = limiter.check(now)
            assert verdict is not Verdict.CLOSE
            if verdict is Verdict.REFUSE:
                turns.append(now + limiter.retry_after_ms(now) / 1000)
        for n, turn in enumerate(turns):  # each an interval or more after the one before
            if n >= len(given_up) or not given_up[n]:
                assert limiter.check(turn) is Verdict.ALLOW
            now = turn


class Connection:
    """One connection's limiter as relayd's intake keeps it across reloads.

    A reload is applied at the connection's first message after it, as the
    intake does: with the limits in force then, by one :meth:`RateLimiter.renewed`.
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.limiter = RateLimiter(rate, burst, now)
        self.burst = burst
        self.largest_burst = burst
        self.reloads: list[tuple[float, float, int]] = []  # (when, rate, burst), in order

    def check(self, now: float) -> Verdict:
        due = [reload for reload in self.reloads if reload[0] <= now]
        if due:
            self.reloads = self.reloads[len(due) :]
            _, rate, burst = due[-1]
            self.limiter = self.limiter.renewed(rate, burst, now)
            self.burst = burst
            self.largest_burst = max(self.largest_burst, burst)
        return self.limiter.check(now)


def send_at_turns(
    connection: Connection, turns: list[float], late: tuple[float, float] = (0.0, 0.0)
) -> float:
    """Send each message again at its turn, and at each new turn it is told, until allowed.

    Each arrives ``late[0]`` seconds and ``late[1]`` of its wait after its turn (the
    network, and the client's margin for the two clocks). Returns when the last went
    through; fails on a 1008.
    """
    pending = sorted(turns)
    last = pending[-1] if pending else 0.0
    for _ in range(100 * (len(turns) + 1)):
        if not pending:
            return last
        now = last = pending.pop(0)
        verdict = connection.check(now)
        assert verdict is not Verdict.CLOSE
        if verdict is Verdict.REFUSE:
            wait = connection.limiter.retry_after_ms(now) / 1000
            pending.append(now + wait * (1 + late[1]) + late[0])
            pending.sort()
    pytest.fail("messages still refused after a hundred turns each")


def send_at_once(connection: Connection, size: int, now: float) -> list[float]:
    """Send ``size`` messages at ``now``; the turns of those refused. Fails on a 1008."""
    turns = []
    for _ in range(size):
        verdict = connection.check(now)
        assert verdict is not Verdict.CLOSE
        if verdict is Verdict.REFUSE:
            turns.append(now + connection.limiter.retry_after_ms(now) / 1000)
    return turns


@settings(max_examples=400, deadline=None)
@given(
    rate=st.floats(0.01, 5000),
    burst=st.integers(1, 200),
    start=st.floats(0, 1e9),
    size=st.integers(1, 200),
    # (when, in intervals of the first rate after the group, the new rate, the new burst)
    reloads=st.lists(
        st.tuples(st.floats(0.001, 400), st.floats(0.01, 5000), st.integers(1, 200)),
        min_size=1,
        max_size=3,
    ),
    late=st.tuples(st.floats(0, 0.2), st.floats(0, 0.05)),
)
def test_messages_sent_again_at_turns_a_reload_ended_are_told_new_turns_never_closed(
    rate: float,
    burst: int,
    start: float,
    size: int,
    reloads: list[tuple[float, float, int]],
    late: tuple[float, float],
) -> None:
    # The burst and a group of up to the burst past it sent at once, the group's
    # messages promised turns, then reloads that change the rate while they wait. Each
    # is sent again at its turn, late by up to 0.2 s and 5% of its wait: the new rate,
    # with its fresh buckets, took the first of them and refused the rest, each refusal
    # a token of a new abuse bucket of the new burst, and at a smaller burst the third
    # closed the connection. Now each is refused and told a new turn, and goes through
    # in the end; and the next group sent at once, within the burst in force, too.
    connection = Connection(rate, burst, start)
    connection.reloads = sorted((start + when / rate, r, b) for when, r, b in reloads)
    assert send_at_once(connection, burst, start) == []
    turns = send_at_once(connection, min(size, burst), start)
    assert len(turns) == min(size, burst)
    done = send_at_turns(connection, turns, late)
    connection.reloads = []  # any reload not yet applied
    turns = send_at_once(connection, connection.burst, done + late[0])
    send_at_turns(connection, turns, late)


@settings(max_examples=200, deadline=None)
@given(
    start=st.floats(0, 1e9),
    limits=st.lists(st.tuples(st.floats(0.01, 5000), st.integers(1, 50)), min_size=2, max_size=60),
)
def test_what_a_reload_owes_is_never_more_than_the_largest_burst(
    start: float, limits: list[tuple[float, int]]
) -> None:
    # Reloads, one after another, each while a refused message's turn is still to come,
    # and each met by the burst in force and one message more at once (that one refused,
    # as owed): a flood after them is closed once the new burst is allowed, at most the
    # largest burst refused as owed, and the new burst's own refusals: what is owed
    # never adds up over reloads.
    now = start
    connection = Connection(limits[0][0], limits[0][1], now)
    send_at_once(connection, limits[0][1] + 1, now)
    for rate, burst in limits[1:]:
        now += 1e-3  # the turn of the message just refused is still to come
        connection.reloads = [(now, rate, burst)]
        send_at_once(connection, burst + 1, now)
    now += 1e6  # every bucket full again
    burst = limits[-1][1]
    verdicts = [connection.check(now) for _ in range(2 * burst + connection.largest_burst + 1)]
    assert verdicts[-1] is Verdict.CLOSE


def test_a_reload_to_a_burst_of_one_refuses_messages_sent_again_at_old_turns_but_never_closes() -> (
    None
):
    # Six at once at 2 a second with a burst of 3: three refused, their turns 0.5, 1 and
    # 1.5 s on. A reload then lowers the rate to one message in 2 s with a burst of 1.
    limiter = RateLimiter(2.0, 3, now=0.0)
    assert [limiter.check(0.0) for _ in range(3)] == [Verdict.ALLOW] * 3
    turns = []
    for _ in range(3):
        assert limiter.check(0.0) is Verdict.REFUSE
        turns.append(limiter.retry_after_ms(0.0) / 1000)
    assert turns == [0.502, 1.002, 1.502]
    limiter = limiter.renewed(0.5, 1, now=0.502)  # at the first message after the reload
    assert limiter.check(0.502) is Verdict.ALLOW  # the new bucket's one token
    # Refused and told a new turn, though the new abuse bucket holds one refusal: the
    # second refusal (at 1.502 s) was the 1008. The new turns come after the old ones,
    # an interval of the new rate and a millisecond apart.
    assert limiter.check(1.002) is Verdict.REFUSE
    second = 1.002 + limiter.retry_after_ms(1.002) / 1000
    assert limiter.check(1.502) is Verdict.REFUSE
    third = 1.502 + limiter.retry_after_ms(1.502) / 1000
    assert (round(second, 3), round(third, 3)) == (3.502, 5.504)
    assert limiter.check(second) is Verdict.ALLOW
    assert limiter.check(third) is Verdict.ALLOW
    # It owed the old burst, 3, and used 2: one refusal is still owed, then the abuse
    # bucket's one, and a flood is closed at the third.
    verdicts = [limiter.check(third) for _ in range(3)]
    assert verdicts == [Verdict.REFUSE, Verdict.REFUSE, Verdict.CLOSE]


@pytest.mark.parametrize("late", [0.0, 0.13, 0.6])
def test_at_a_burst_of_one_the_wait_also_lets_the_next_refusal_be_told_not_closed(
    late: float,
) -> None:
    # The abuse bucket holds one refusal. A message sent again at its turn is allowed;
    # the next, sent at once, is refused: that refusal must find the abuse bucket's
    # token back, or it is the 1008 (the turn was the message bucket's alone: a
    # chat line typed 0.6 s after the one before, then one at once, was closed).
    rate = 1.0
    limiter = RateLimiter(rate, 1, now=0.0)
    assert limiter.check(0.0) is Verdict.ALLOW
    refused_at = late / rate
    assert limiter.check(refused_at) is Verdict.REFUSE
    wait_ms = limiter.retry_after_ms(refused_at)
    assert 1001 - 1e-6 < wait_ms <= 1002  # the abuse bucket's token, an interval on
    turn = refused_at + wait_ms / 1000
    assert limiter.check(turn) is Verdict.ALLOW
    assert limiter.check(turn) is Verdict.REFUSE  # told, not closed


@pytest.mark.parametrize("start", [0.0, 8e8])  # relayd's clock runs from an arbitrary offset
def test_messages_refused_together_are_each_allowed_when_sent_again_after_their_own_wait(
    start: float,
) -> None:
    # Sent at once past the burst, each refusal is promised its own token, an interval
    # after the one before: one wait for all let one through at it and refused the
    # others again, each refusal a token of the abuse bucket, towards the 1008.
    limiter = RateLimiter(2.0, 3, now=start)
    assert [limiter.check(start) for _ in range(3)] == [Verdict.ALLOW] * 3
    waits = []
    for _ in range(3):  # each refusal told its wait as it is made, as relayd does
        assert limiter.check(start) is Verdict.REFUSE
        waits.append(limiter.retry_after_ms(start))
    assert waits == [502, 1002, 1502]
    for wait in waits:
        assert limiter.check(start + wait / 1000) is Verdict.ALLOW


def test_a_turn_promised_and_not_taken_up_only_delays_later_ones() -> None:
    limiter = RateLimiter(1.0, 2, now=0.0)
    assert [limiter.check(0.0) for _ in range(3)] == [Verdict.ALLOW] * 2 + [Verdict.REFUSE]
    assert limiter.retry_after_ms(0.0) == 1002  # never sent again
    assert limiter.check(0.5) is Verdict.REFUSE
    # The bucket's next token is at 1 s, but it is promised to the first refusal: this
    # one's turn is the token after, at 2 s, though the first is not sent again.
    assert limiter.retry_after_ms(0.5) == 1502
    # Once the turns promised are past, a wait is the bucket's again.
    assert limiter.check(10.0) is Verdict.ALLOW
    assert limiter.check(10.0) is Verdict.ALLOW
    assert limiter.check(10.0) is Verdict.REFUSE
    assert limiter.retry_after_ms(10.0) == 1002


def test_a_bucket_with_a_token_needs_no_wait() -> None:
    bucket = TokenBucket(rate=4.0, capacity=2, now=0.0)
    assert bucket.until_token(0.0) == 0.0
    assert bucket.take(0.0)
    assert bucket.take(0.0)
    assert bucket.until_token(0.0) == 0.25
    assert bucket.until_token(0.1) == pytest.approx(0.15)
    assert bucket.until_token(0.3) == 0.0


# -- frame pacing ----------------------------------------------------------------------


def test_frame_pacer_allows_the_burst_then_the_rate() -> None:
    pacer = FramePacer(rate=100.0, burst=20, now=0.0)
    assert pacer.allowance(0.0, frames=0) == 20
    assert pacer.allowance(0.0, frames=20) == 0  # the parser used them all
    assert pacer.allowance(0.05, frames=20) == 5  # 100/s for 50 ms
    assert pacer.allowance(0.05, frames=22) == 3
    assert pacer.allowance(10.0, frames=22) == 20  # never more than the burst


def test_frame_pacer_counts_frames_once() -> None:
    pacer = FramePacer(rate=1.0, burst=10, now=0.0)
    for _ in range(5):  # asking again without new frames spends nothing
        assert pacer.allowance(0.0, frames=4) == 6


def test_asking_what_is_available_takes_nothing() -> None:
    bucket = TokenBucket(rate=1.0, capacity=3, now=0.0)
    assert [bucket.available(0.0), bucket.available(0.0)] == [3, 3]
    assert bucket.available(0.0, spent=2) == 1
    assert bucket.available(0.5) == 1  # half a token more: not yet a whole one

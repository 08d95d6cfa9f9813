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


def resend_at_turns(
    limiter: RateLimiter, turns: list[float], reload: tuple[float, float, int] | None = None
) -> tuple[RateLimiter, int]:
    """Send each message again at its turn, and at each new turn it is told, until allowed.

    ``reload`` is (when, rate, burst): the limiter is renewed then. Returns the limiter in
    force at the end and how many times a message was refused again.
    """
    pending = sorted(turns)
    refused_again = 0
    for _ in range(100 * (len(turns) + 1)):
        if not pending:
            return limiter, refused_again
        now = pending.pop(0)
        if reload is not None and reload[0] <= now:
            limiter, reload = limiter.renewed(reload[1], reload[2], reload[0]), None
        verdict = limiter.check(now)
        assert verdict is not Verdict.CLOSE
        if verdict is Verdict.REFUSE:
            refused_again += 1
            pending.append(now + limiter.retry_after_ms(now) / 1000)
            pending.sort()
    pytest.fail("messages still refused after a hundred turns each")


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.01, 5000),
    burst=st.integers(1, 200),
    new_rate=st.floats(0.01, 5000),
    new_burst=st.integers(1, 200),
    size=st.integers(1, 200),
    # when the reload comes, in the old intervals after the group was sent
    reload_after=st.floats(0, 400),
    start=st.floats(0, 1e9),
)
def test_messages_sent_again_at_turns_a_reload_ended_are_told_new_turns_never_closed(
    rate: float,
    burst: int,
    new_rate: float,
    new_burst: int,
    size: int,
    reload_after: float,
    start: float,
) -> None:
    # A group of up to the burst sent at once, its refused messages promised turns, then
    # a reload that changes the rate while they wait. Each is sent again at its turn: the
    # new rate, with its fresh buckets, took the first of them and refused the rest,
    # each refusal a token of a new abuse bucket of the new burst: at a smaller burst
    # the third closed the connection. Now each is refused and told a new turn, and
    # sent again then it is allowed.
    limiter = RateLimiter(rate, burst, now=start)
    turns = []
    for _ in range(burst):
        assert limiter.check(start) is Verdict.ALLOW
    for _ in range(min(size, burst)):  # a group of up to the burst, past it
        assert limiter.check(start) is Verdict.REFUSE
        turns.append(start + limiter.retry_after_ms(start) / 1000)
    reload = (start + reload_after / rate, new_rate, new_burst)
    limiter, _ = resend_at_turns(limiter, turns, reload)
    # And the limiter owes no more than it was promised: a flood after it is closed.
    verdicts = [limiter.check(turns[-1] + 1e6) for _ in range(2 * new_burst + 2 * burst + 1)]
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
    limiter = limiter.renewed(0.5, 1, now=0.1)
    assert limiter.check(0.502) is Verdict.ALLOW  # the new bucket's one token
    # Refused and told a new turn, though the new abuse bucket holds one refusal: the
    # second refusal (at 1.502 s) was the 1008.
    assert limiter.check(1.002) is Verdict.REFUSE
    second = 1.002 + limiter.retry_after_ms(1.002) / 1000
    assert limiter.check(1.502) is Verdict.REFUSE
    third = 1.502 + limiter.retry_after_ms(1.502) / 1000
    assert (round(second, 3), round(third, 3)) == (2.503, 4.504)  # the new rate's tokens
    assert limiter.check(second) is Verdict.ALLOW
    assert limiter.check(third) is Verdict.ALLOW
    # Three turns were to come and two refusals were needed (the new bucket's token
    # took the first): one refusal is still owed, then the abuse bucket's one, and a
    # flood is closed at the third.
    verdicts = [limiter.check(third) for _ in range(3)]
    assert verdicts == [Verdict.REFUSE, Verdict.REFUSE, Verdict.CLOSE]


def test_a_reload_with_no_turn_to_come_owes_nothing() -> None:
    limiter = RateLimiter(2.0, 3, now=0.0)
    assert [limiter.check(0.0) for _ in range(4)] == [Verdict.ALLOW] * 3 + [Verdict.REFUSE]
    assert limiter.retry_after_ms(0.0) == 502
    limiter = limiter.renewed(0.5, 1, now=0.6)  # the turn has passed
    assert [limiter.check(0.6) for _ in range(3)] == [
        Verdict.ALLOW,
        Verdict.REFUSE,
        Verdict.CLOSE,
    ]


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

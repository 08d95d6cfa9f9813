"""Tests for relayd.telemetry.throttle: which lines of a noisy event are written; time passed in."""

from __future__ import annotations

from relayd.telemetry.throttle import BURST, LINES_PER_S, LineBudget, Suppressed


def written(budget: LineBudget, event: str, kind: object, count: int, now: float) -> int:
    return sum(budget.allow(event, kind, now) for _ in range(count))


def test_a_burst_then_nothing_until_the_budget_refills() -> None:
    budget = LineBudget(burst=5, per_second=2.0)
    assert written(budget, "limit.exceeded", "frames_per_second", 100, now=0.0) == 5
    assert written(budget, "limit.exceeded", "frames_per_second", 100, now=0.25) == 0
    assert written(budget, "limit.exceeded", "frames_per_second", 100, now=1.0) == 2  # 2/s
    assert written(budget, "limit.exceeded", "frames_per_second", 100, now=1000.0) == 5


def test_each_kind_has_its_own_budget() -> None:
    budget = LineBudget(burst=3, per_second=1.0)
    assert written(budget, "handshake.rejected", 503, 50, now=0.0) == 3
    assert written(budget, "handshake.rejected", 401, 50, now=0.0) == 3
    assert written(budget, "error", None, 50, now=0.0) == 3


def test_lines_left_out_are_counted_by_kind_and_handed_out_once() -> None:
    budget = LineBudget(burst=2, per_second=1.0)
    written(budget, "handshake.rejected", 503, 10, now=0.0)
    written(budget, "library.log", "trio", 4, now=0.0)
    assert sorted(budget.take_suppressed(), key=str) == sorted(
        [Suppressed("handshake.rejected", 503, 8), Suppressed("library.log", "trio", 2)], key=str
    )
    assert budget.take_suppressed() == []


def test_a_flood_costs_the_burst_and_the_rate_whatever_its_size() -> None:
    budget = LineBudget()
    # 100,000 lines a second for a minute: BURST + LINES_PER_S per second get out.
    out = sum(
        written(budget, "handshake.rejected", 408, 1000, now=second / 100) for second in range(6000)
    )
    assert out <= BURST + LINES_PER_S * 60 + 1
    [left_out] = budget.take_suppressed()
    assert left_out.count == 6_000_000 - out


def test_refill_gives_the_burst_back_and_keeps_the_counts() -> None:
    budget = LineBudget(burst=2, per_second=0.001)
    written(budget, "error", None, 5, now=0.0)
    budget.refill()
    assert written(budget, "error", None, 5, now=0.0) == 2
    assert budget.take_suppressed() == [Suppressed("error", None, 6)]

"""Tests for relayd.policy.failures: failed authentications per address, time passed in."""

from __future__ import annotations

import pytest

from relayd.policy.failures import AuthFailures

IP = "192.0.2.1"
OTHER_IP = "198.51.100.7"


def fail(failures: AuthFailures, ip: str, times: int, now: float = 0.0) -> None:
    for _ in range(times):
        failures.failed(ip, now)


def test_an_address_that_never_failed_is_not_blocked() -> None:
    failures = AuthFailures(10, 60.0)
    assert not failures.blocked(IP, 0.0)
    assert len(failures) == 0


def test_ten_failures_at_once_block_the_address_and_only_it() -> None:
    failures = AuthFailures(10, 60.0)
    fail(failures, IP, 9)
    assert not failures.blocked(IP, 0.0)
    fail(failures, IP, 1)
    assert failures.blocked(IP, 0.0)
    assert not failures.blocked(OTHER_IP, 0.0)


def test_a_blocked_address_gets_one_more_try_every_6_seconds() -> None:
    # The defaults: 10 failures refilled over 60 s, one every 6 s (docs/security.md).
    failures = AuthFailures(10, 60.0)
    fail(failures, IP, 10)
    # (6.01, not 6.0: 10 / 60 * 6 is 0.9999999999999999 in floating point.)
    assert failures.blocked(IP, 5.99)
    assert not failures.blocked(IP, 6.01)
    failures.failed(IP, 6.01)
    assert failures.blocked(IP, 6.01)
    assert failures.blocked(IP, 11.99)
    assert not failures.blocked(IP, 12.02)


def test_an_address_whose_budget_refilled_is_forgotten_when_next_looked_at() -> None:
    failures = AuthFailures(10, 60.0)
    fail(failures, IP, 3)
    assert not failures.blocked(IP, 17.9)  # 2.98 of 3 tokens back
    assert len(failures) == 1
    assert not failures.blocked(IP, 18.01)
    assert len(failures) == 0


def test_a_limit_of_0_turns_the_check_off() -> None:
    failures = AuthFailures(0, 60.0)
    fail(failures, IP, 100)
    assert not failures.blocked(IP, 0.0)
    assert len(failures) == 0


def test_at_most_4096_addresses_are_remembered_the_least_recent_forgotten_first() -> None:
    failures = AuthFailures(1, 60.0)
    addresses = [f"10.0.{n >> 8}.{n & 255}" for n in range(4097)]
    failures.failed(addresses[0], 0.0)
    failures.failed(addresses[1], 0.0)
    failures.failed(addresses[0], 1.0)  # failed again: now the most recent
    for address in addresses[2:]:
        failures.failed(address, 2.0)
    assert len(failures) == 4096
    assert not failures.blocked(addresses[1], 2.0)  # forgotten
    assert failures.blocked(addresses[0], 2.0)
    assert failures.blocked(addresses[4096], 2.0)


@pytest.mark.parametrize(("limit", "window_s"), [(5, 60.0), (10, 30.0)])
def test_new_limits_forget_what_was_counted(limit: int, window_s: float) -> None:
    failures = AuthFailures(10, 60.0)
    fail(failures, IP, 10)
    failures.configure(limit, window_s)
    assert not failures.blocked(IP, 0.0)
    assert len(failures) == 0


def test_the_same_limits_again_keep_what_was_counted() -> None:
    failures = AuthFailures(10, 60.0)
    fail(failures, IP, 10)
    failures.configure(10, 60.0)
    assert failures.blocked(IP, 0.0)


def test_new_limits_set_the_new_pace() -> None:
    # 5 failures over 30 s: one more try every 6 s, as with the defaults' 10 over 60.
    failures = AuthFailures(10, 60.0)
    failures.configure(5, 30.0)
    fail(failures, IP, 5)
    assert failures.blocked(IP, 5.99)
    assert not failures.blocked(IP, 6.01)

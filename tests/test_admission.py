"""Tests for relayd.policy.admission: capacity counting and the accept/refuse decision."""

from __future__ import annotations

import tracemalloc
from collections.abc import Sequence
from typing import Any

import pytest

from relayd.policy.admission import Accept, Capacity, Handshakes, decide
from relayd.wire.dialects import Dialect
from relayd.wire.handshake import Refusal

IP = "192.0.2.1"
OTHER_IP = "198.51.100.7"


def decide_for(
    capacity: Capacity,
    *,
    ip: str = IP,
    draining: bool = False,
    offered: Sequence[str] = (),
    **request: Any,
) -> Accept | Refusal:
    """``decide`` for a request from ``ip``; ``request`` holds path, origin and the like."""
    return decide(
        draining=draining, capacity=capacity, client_ip=ip, offered_subprotocols=offered, **request
    )


def with_room() -> Capacity:
    """Counts with this connection in, and room for it."""
    capacity = Capacity(max_total=1, max_per_ip=1)
    capacity.opened(IP)
    return capacity


def test_capacity_counts_total_and_per_ip() -> None:
    capacity = Capacity(max_total=10, max_per_ip=3)
    assert (capacity.total, capacity.from_ip(IP)) == (0, 0)
    capacity.opened(IP)
    capacity.opened(IP)
    capacity.opened(OTHER_IP)
    assert capacity.total == 3
    assert capacity.from_ip(IP) == 2
    assert capacity.from_ip(OTHER_IP) == 1
    assert capacity.from_ip("203.0.113.9") == 0


def test_capacity_closed_removes() -> None:
    capacity = Capacity(max_total=10, max_per_ip=3)
    capacity.opened(IP)
    capacity.opened(IP)
    capacity.opened(OTHER_IP)
    capacity.closed(IP)
    assert (capacity.total, capacity.from_ip(IP)) == (2, 1)
    capacity.closed(IP)
    capacity.closed(OTHER_IP)
    assert (capacity.total, capacity.from_ip(IP), capacity.from_ip(OTHER_IP)) == (0, 0, 0)


def test_closing_an_address_never_counted_does_not_raise() -> None:
    # The gate calls closed() in a finally: a miscount there must not take the
    # connections' nursery down with a KeyError.
    capacity = Capacity(max_total=10, max_per_ip=3)
    capacity.opened(IP)
    capacity.closed(OTHER_IP)
    assert (capacity.from_ip(IP), capacity.from_ip(OTHER_IP)) == (1, 0)


def test_capacity_within_limits_has_no_refusal() -> None:
    capacity = Capacity(max_total=2, max_per_ip=2)
    capacity.opened(IP)
    capacity.opened(IP)
    assert capacity.refusal(IP) is None


def test_closing_frees_room_again() -> None:
    capacity = Capacity(max_total=1, max_per_ip=1)
    capacity.opened(IP)
    capacity.opened(IP)
    assert capacity.refusal(IP) is not None
    capacity.closed(IP)
    assert capacity.refusal(IP) is None


def test_decide_accepts_within_limits() -> None:
    capacity = Capacity(max_total=2, max_per_ip=1)
    capacity.opened(IP)
    capacity.opened(OTHER_IP)  # exactly at both limits, this connection counted
    assert decide_for(capacity) == Accept(Dialect.SEED)
    assert decide_for(capacity, ip=OTHER_IP) == Accept(Dialect.SEED)


def test_decide_refuses_while_draining() -> None:
    capacity = Capacity(max_total=10, max_per_ip=10)
    capacity.opened(IP)
    assert decide_for(capacity, draining=True) == Refusal(
        503, "server shutting down", "shutting_down"
    )


def test_draining_wins_over_capacity() -> None:
    capacity = Capacity(max_total=0, max_per_ip=0)
    capacity.opened(IP)
    assert decide_for(capacity, draining=True) == Refusal(
        503, "server shutting down", "shutting_down"
    )


def test_decide_refuses_over_total() -> None:
    capacity = Capacity(max_total=2, max_per_ip=5)
    for ip in ("10.0.0.1", "10.0.0.2", IP):
        capacity.opened(ip)
    assert decide_for(capacity) == Refusal(503, "server at capacity", "max_connections")


def test_decide_refuses_over_per_ip() -> None:
    capacity = Capacity(max_total=100, max_per_ip=2)
    for _ in range(3):
        capacity.opened(IP)
    capacity.opened(OTHER_IP)
    assert decide_for(capacity) == Refusal(
        503, "too many connections from this address", "max_connections_per_ip"
    )
    assert decide_for(capacity, ip=OTHER_IP) == Accept(Dialect.SEED)


@pytest.mark.parametrize(
    ("offered", "dialect", "subprotocol"),
    [
        ((), Dialect.SEED, None),
        (("relayd.v1",), Dialect.V1, "relayd.v1"),
        (("chat", "relayd.v1"), Dialect.V1, "relayd.v1"),
    ],
)
def test_decide_accepts_in_the_offered_dialect(
    offered: tuple[str, ...], dialect: Dialect, subprotocol: str | None
) -> None:
    capacity = Capacity(max_total=1, max_per_ip=1)
    capacity.opened(IP)
    decision = decide_for(capacity, offered=offered)
    assert decision == Accept(dialect)
    assert isinstance(decision, Accept)
    assert decision.subprotocol == subprotocol


@pytest.mark.parametrize("offered", [("chat",), ("chat", "graphql-ws")])
def test_decide_refuses_an_offer_without_relayd_v1_with_400(offered: tuple[str, ...]) -> None:
    capacity = Capacity(max_total=1, max_per_ip=1)
    capacity.opened(IP)
    assert decide_for(capacity, offered=offered) == Refusal(
        400, "unsupported subprotocol; offer relayd.v1 or none", "unsupported_subprotocol"
    )


@pytest.mark.parametrize(
    ("dialect", "subprotocol"), [(Dialect.SEED, None), (Dialect.V1, "relayd.v1")]
)
def test_accept_subprotocol(dialect: Dialect, subprotocol: str | None) -> None:
    assert Accept(dialect).subprotocol == subprotocol


@pytest.mark.parametrize(
    ("path", "enabled", "expected"),
    [
        ("/echo", True, Accept(Dialect.SEED, echo=True)),
        ("/echo?case=1", True, Accept(Dialect.SEED, echo=True)),
        ("/echo", False, Accept(Dialect.SEED)),  # off: a relay path like any other
        ("/", True, Accept(Dialect.SEED)),
        ("/echoes", True, Accept(Dialect.SEED)),
    ],
)
def test_decide_serves_the_echo_route_only_when_enabled(
    path: str, enabled: bool, expected: Accept
) -> None:
    assert decide_for(with_room(), path=path, echo_route=enabled) == expected


# -- handshakes in progress -----------------------------------------------------------


def test_handshakes_are_admitted_up_to_the_per_ip_share_then_named_by_their_limit() -> None:
    handshakes = Handshakes(max_total=10, max_per_ip=2)
    assert [handshakes.admit(IP) for _ in range(3)] == [None, None, "max_handshakes_per_ip"]
    assert (handshakes.total, handshakes.from_ip(IP)) == (2, 2)  # the third was not counted
    assert handshakes.admit(OTHER_IP) is None  # another address has its own share


def test_handshakes_are_admitted_up_to_the_total() -> None:
    handshakes = Handshakes(max_total=3, max_per_ip=3)
    assert [handshakes.admit(f"10.0.0.{n}") for n in range(4)] == [
        None,
        None,
        None,
        "max_handshakes",
    ]
    handshakes.closed("10.0.0.1")
    assert handshakes.admit("10.0.0.9") is None


def test_handshakes_never_count_against_established_connections() -> None:
    capacity = Capacity(max_total=1, max_per_ip=1)
    handshakes = Handshakes(max_total=100, max_per_ip=100)
    for _ in range(50):
        handshakes.admit(IP)
    capacity.opened(IP)  # the one being decided
    assert decide_for(capacity) == Accept(Dialect.SEED)


def test_a_relay_accept_is_not_the_echo_route() -> None:
    # Compared with echo=False spelled out: Accept's own default must be the relay.
    decision = decide_for(with_room())
    assert decision == Accept(Dialect.SEED, echo=False)
    assert isinstance(decision, Accept)
    assert decision.echo is False


def test_the_echo_route_is_off_unless_asked_for() -> None:
    assert decide_for(with_room(), path="/echo") == Accept(Dialect.SEED, echo=False)


ALLOWED = ("https://chat.example", "https://example.org")


def decide_origin(origin: str | None, allowed: Sequence[str] = ALLOWED) -> Accept | Refusal:
    return decide_for(with_room(), origin=origin, allowed_origins=allowed)


@pytest.mark.parametrize("origin", ALLOWED)
def test_an_allowed_origin_is_accepted(origin: str) -> None:
    assert decide_origin(origin) == Accept(Dialect.SEED, echo=False)


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "http://chat.example", "https://chat.example:8443", ""]
)
def test_an_origin_not_in_the_list_is_refused_with_403(origin: str) -> None:
    assert decide_origin(origin) == Refusal(403, "origin not allowed", "origin")


def test_a_client_without_origin_is_not_a_browser_and_is_accepted() -> None:
    assert decide_origin(None) == Accept(Dialect.SEED, echo=False)


@pytest.mark.parametrize("origin", ["https://evil.example", None])
def test_an_empty_list_allows_every_origin(origin: str | None) -> None:
    assert decide_origin(origin, allowed=()) == Accept(Dialect.SEED, echo=False)


def test_the_origin_check_comes_after_capacity() -> None:
    capacity = Capacity(max_total=0, max_per_ip=0)
    capacity.opened(IP)
    decision = decide_for(capacity, origin="https://evil.example", allowed_origins=ALLOWED)
    assert decision == Refusal(503, "server at capacity", "max_connections")


def test_addresses_that_came_and_went_hold_no_memory() -> None:
    # A public port sees a stream of source addresses; counting them must not
    # keep an entry for each one once its connections are closed.
    capacity = Capacity(max_total=10, max_per_ip=3)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for n in range(10_000):
            ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
            capacity.opened(ip)
            capacity.opened(ip)
            capacity.closed(ip)
            capacity.closed(ip)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert capacity.total == 0
    assert held < 16_384  # bytes; an entry per address seen would be about a megabyte


def test_a_share_of_one_handshake_per_address_admits_the_first() -> None:
    handshakes = Handshakes(max_total=10, max_per_ip=1)
    assert [handshakes.admit(IP) for _ in range(2)] == [None, "max_handshakes_per_ip"]

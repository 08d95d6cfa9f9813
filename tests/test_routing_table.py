"""Tests for relayd.routing.table: the routing table and message outcomes, as plain values."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import pytest

from relayd.errors import ErrorCode
from relayd.routing.table import Outcome, RoutingTable, outcome_of


class Handle:
    """A connection stand-in; compared by identity, like relayd's Peer."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Handle({self.name!r})"


@dataclasses.dataclass(frozen=True)
class ValueHandle:
    """A handle whose type defines equality by value."""

    name: str


def test_empty_table() -> None:
    table: RoutingTable[Handle] = RoutingTable()
    assert len(table) == 0
    assert "a" not in table
    assert table.lookup("a") == ()
    assert table.handles() == []


def test_add_and_lookup() -> None:
    table: RoutingTable[Handle] = RoutingTable()
    a, b = Handle("a"), Handle("b")
    table.add("id-a", a)
    table.add("id-b", b)
    assert len(table) == 2
    assert "id-a" in table
    assert "id-b" in table
    assert "id-c" not in table
    assert table.lookup("id-a") == (a,)
    assert table.lookup("id-b") == (b,)
    assert table.handles() == [a, b]


def test_contains_is_false_for_non_strings() -> None:
    table: RoutingTable[Handle] = RoutingTable()
    table.add("1", Handle("a"))
    assert 1 not in table
    assert None not in table


def test_several_handles_under_one_id_in_order_added() -> None:
    table: RoutingTable[Handle] = RoutingTable()
    first, second, third = Handle("1"), Handle("2"), Handle("3")
    for handle in (first, second, third):
        table.add("shared", handle)
    assert len(table) == 1
    assert table.lookup("shared") == (first, second, third)
    assert table.handles() == [first, second, third]


def test_discard_one_of_several_keeps_the_others() -> None:
    table: RoutingTable[Handle] = RoutingTable()
    first, second, third = Handle("1"), Handle("2"), Handle("3")
    for handle in (first, second, third):
        table.add("shared", handle)
    table.discard("shared", second)
    assert table.lookup("shared") == (first, third)
    assert "shared" in table
    assert len(table) == 1


def test_discard_last_handle_removes_the_id() -> None:
    table: RoutingTable[Handle] = RoutingTable()
    a, other = Handle("a"), Handle("other")
    table.add("id-a", a)
    table.add("id-o", other)
    table.discard("id-a", a)
    assert "id-a" not in table
    assert table.lookup("id-a") == ()
    assert len(table) == 1
    assert table.handles() == [other]


def test_discard_absent_pairs_is_ignored() -> None:
    table: RoutingTable[Handle] = RoutingTable()
    a, stranger = Handle("a"), Handle("stranger")
    table.add("id-a", a)
    table.discard("nobody", a)  # unknown id
    table.discard("id-a", stranger)  # known id, other handle
    table.discard("id-a", a)
    table.discard("id-a", a)  # twice
    assert len(table) == 0
    assert table.handles() == []


def test_same_handle_under_two_ids_discarded_from_one() -> None:
    table: RoutingTable[Handle] = RoutingTable()
    h = Handle("h")
    table.add("x", h)
    table.add("y", h)
    table.discard("x", h)
    assert "x" not in table
    assert table.lookup("y") == (h,)


def test_handles_lists_a_handle_once_per_id_it_holds() -> None:
    table: RoutingTable[Handle] = RoutingTable()
    h = Handle("h")
    table.add("x", h)
    table.add("y", h)
    assert table.handles() == [h, h]


def test_discard_compares_handles_by_identity() -> None:
    table: RoutingTable[ValueHandle] = RoutingTable()
    kept = ValueHandle("conn-1")
    table.add("id", kept)
    table.discard("id", ValueHandle("conn-1"))  # equal, but another connection
    assert table.lookup("id") == (kept,)


@pytest.mark.parametrize(
    ("accepted", "outcome"),
    [
        ([], Outcome.UNKNOWN_RECIPIENT),
        ([False], Outcome.RECIPIENT_BUSY),
        ([False, False, False], Outcome.RECIPIENT_BUSY),
        ([True], Outcome.DELIVERED),
        ([True, True], Outcome.DELIVERED),
        ([False, True], Outcome.DELIVERED),
        ([True, False], Outcome.DELIVERED),
    ],
)
def test_outcome_of(accepted: list[bool], outcome: Outcome) -> None:
    assert outcome_of(accepted) is outcome


def _generator(values: list[bool]) -> Iterable[bool]:
    return (ok for ok in values)


@pytest.mark.parametrize(
    ("accepted", "outcome"),
    [
        ([], Outcome.UNKNOWN_RECIPIENT),
        ([False, False], Outcome.RECIPIENT_BUSY),
        ([False, True], Outcome.DELIVERED),
    ],
)
@pytest.mark.parametrize("one_pass", [iter, _generator], ids=["iterator", "generator"])
def test_outcome_of_takes_any_iterable(
    accepted: list[bool], outcome: Outcome, one_pass: Callable[[list[bool]], Iterable[bool]]
) -> None:
    # Made in the test, not at collection: an iterator is used up by one run.
    assert outcome_of(one_pass(accepted)) is outcome


@pytest.mark.parametrize(
    ("outcome", "error"),
    [
        (Outcome.DELIVERED, None),
        (Outcome.UNKNOWN_RECIPIENT, ErrorCode.UNKNOWN_RECIPIENT),
        (Outcome.RECIPIENT_BUSY, ErrorCode.RECIPIENT_BUSY),
    ],
)
def test_outcome_error(outcome: Outcome, error: ErrorCode | None) -> None:
    assert outcome.error is error


def test_outcome_values_are_the_logged_strings() -> None:
    assert [o.value for o in Outcome] == [
        "delivered",
        "unknown_recipient",
        "recipient_busy",
        "recipient_unreachable",
        "delivery_unconfirmed",
    ]


def test_ids_lists_each_routable_id_once() -> None:
    table: RoutingTable[object] = RoutingTable()
    a, b = object(), object()
    table.add("alice", a)
    table.add("alice", b)
    table.add("bob", b)
    assert sorted(table.ids()) == ["alice", "bob"]
    table.discard("alice", a)
    table.discard("alice", b)
    assert table.ids() == ["bob"]

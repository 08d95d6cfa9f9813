"""relayd.routing.batch: what connections ask to run when a router's batch ends."""

from __future__ import annotations

import pytest

from relayd.routing.batch import at_batch_end, routing_batch


def test_outside_a_batch_nothing_is_deferred() -> None:
    ran: list[str] = []
    assert not at_batch_end(lambda: ran.append("now"))
    assert ran == []  # the caller runs it itself


def test_what_a_batch_was_asked_runs_once_at_its_end_in_order() -> None:
    ran: list[str] = []
    with routing_batch():
        assert at_batch_end(lambda: ran.append("a"))
        assert at_batch_end(lambda: ran.append("b"))
        assert ran == []
    assert ran == ["a", "b"]
    with routing_batch():
        pass
    assert ran == ["a", "b"]  # a later batch runs nothing of an earlier one
    assert not at_batch_end(lambda: ran.append("c"))


def test_an_inner_batch_joins_the_outer_one() -> None:
    ran: list[str] = []
    with routing_batch():
        with routing_batch():
            assert at_batch_end(lambda: ran.append("inner"))
        assert ran == []  # not at the inner block's end
        assert at_batch_end(lambda: ran.append("outer"))
    assert ran == ["inner", "outer"]


def test_a_batch_that_fails_still_runs_what_it_was_asked() -> None:
    ran: list[str] = []

    def route_with_a_bug() -> None:
        with routing_batch():
            at_batch_end(lambda: ran.append("written"))
            raise RuntimeError("bug while routing")

    with pytest.raises(RuntimeError):
        route_with_a_bug()
    assert ran == ["written"]
    assert not at_batch_end(lambda: None)  # and the batch is over


def test_one_that_raises_does_not_keep_the_others_from_running() -> None:
    ran: list[str] = []

    def buggy() -> None:
        raise RuntimeError("bug in a connection's write")

    def route() -> None:
        with routing_batch():
            at_batch_end(lambda: ran.append("before"))
            at_batch_end(buggy)
            at_batch_end(lambda: ran.append("after"))

    with pytest.raises(RuntimeError, match="bug in a connection"):
        route()
    assert ran == ["before", "after"]
    assert not at_batch_end(lambda: None)  # and the batch is over

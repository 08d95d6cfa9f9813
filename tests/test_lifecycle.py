"""Tests for relayd.wire.lifecycle: a connection's phases and endings, as plain values."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.wire.lifecycle import TRANSITIONS, Close, Event, Lifecycle, Phase

Step = Callable[[Lifecycle], bool]

STEPS: dict[str, Step] = {
    "drain": lambda life: life.drain(),
    "policy": lambda life: life.close_for_policy(1008, "rate limit exceeded"),
    "violate": lambda life: life.violate(1002, "client frames must be masked"),
    "close_frame": lambda life: life.receive_close(1000, "bye"),
    "end": lambda life: life.end(),
}


def test_a_new_connection_is_open_reading_and_owes_no_close_frame() -> None:
    life = Lifecycle()
    assert (life.phase, life.close, life.reading, life.flushing) == (Phase.OPEN, None, True, False)
    assert life.close_frame is None
    assert not life.awaits_client_close


@pytest.mark.parametrize(
    ("step", "phase", "close", "flushing", "frame", "awaits"),
    [
        (
            "drain",
            Phase.DRAINING,
            Close(1001, "server shutting down", "server"),
            True,
            (1001, "server shutting down"),
            True,
        ),
        (
            "policy",
            Phase.CLOSING,
            Close(1008, "rate limit exceeded", "server"),
            True,
            (1008, "rate limit exceeded"),
            True,
        ),
        (
            "violate",
            Phase.FAILED,
            Close(1002, "client frames must be masked", "server"),
            False,
            (1002, "client frames must be masked"),
            False,
        ),
        (
            "close_frame",
            Phase.CLOSE_RECEIVED,
            Close(1000, "bye", "client"),
            False,
            (1000, ""),
            False,
        ),
        ("end", Phase.GONE, Close(1006, "", "client"), False, None, False),
    ],
)
def test_each_first_decision_has_one_answer_for_outbox_close_frame_and_wait(
    step: str,
    phase: Phase,
    close: Close,
    flushing: bool,
    frame: tuple[int, str] | None,
    awaits: bool,
) -> None:
    life = Lifecycle()
    assert STEPS[step](life) is True
    assert life.phase is phase
    assert life.close == close
    assert life.reading is False
    assert life.flushing is flushing
    assert life.close_frame == frame
    assert life.awaits_client_close is awaits


def test_a_client_close_without_a_code_is_answered_without_one() -> None:
    life = Lifecycle()
    life.receive_close(1005, "")
    assert life.close == Close(1005, "", "client")
    assert life.close_frame == (None, "")


def test_a_client_close_is_echoed_with_its_code_but_not_its_reason() -> None:
    life = Lifecycle()
    life.receive_close(4000, "my own reason")
    assert life.close_frame == (4000, "")


@pytest.mark.parametrize("first", ["drain", "policy", "violate", "close_frame", "end"])
@pytest.mark.parametrize("later", ["drain", "policy", "violate", "close_frame", "end"])
def test_after_the_first_decision_later_events_change_nothing(first: str, later: str) -> None:
    life = Lifecycle()
    STEPS[first](life)
    phase, close = life.phase, life.close
    assert STEPS[later](life) is False
    assert (life.phase, life.close) == (phase, close)


@pytest.mark.parametrize("before", ["open", "drain", "policy", "violate", "close_frame", "end"])
def test_a_bug_ends_any_phase_failed_with_1011_and_nothing_overrides_it(before: str) -> None:
    life = Lifecycle()
    if before != "open":
        STEPS[before](life)
    life.crash()
    assert life.phase is Phase.FAILED
    assert life.close == Close(1011, "internal error", "server")
    assert not life.end()
    assert life.close.code == 1011
    assert not life.awaits_client_close


def test_only_an_open_connection_changes_phase_and_every_event_can_end_it() -> None:
    assert {before for before, _ in TRANSITIONS} == {Phase.OPEN}
    assert {event for _, event in TRANSITIONS} == set(Event)


@given(st.lists(st.sampled_from(sorted(STEPS)), max_size=8))
def test_any_sequence_of_events_decides_the_ending_once(steps: list[str]) -> None:
    life = Lifecycle()
    changes = [name for name in steps if STEPS[name](life)]
    assert changes == steps[:1]
    assert life.reading is (not steps)

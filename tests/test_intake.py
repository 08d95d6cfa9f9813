"""Tests for relayd.daemon.intake: what each client message becomes, as plain values."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import structlog
from structlog.typing import EventDict

from relayd.config import LimitsSettings
from relayd.daemon.intake import Intake
from relayd.daemon.live import LiveLimits
from relayd.errors import ErrorCode
from relayd.routing.interface import Relay, Reply
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from relayd.wire.dialects import Dialect, error_payload
from relayd.wire.frames import OP_BINARY, OP_TEXT
from tests.wire import text_of


@dataclass
class FakePeer:
    client_id: str = "alice"
    dialect: Dialect = Dialect.V1
    conn: int = 1

    def deliver(self, frame: bytes) -> bool:
        raise AssertionError("the intake never delivers")

    def reply(self, frame: bytes | None) -> None:
        raise AssertionError("the intake never replies itself")

    def detach(self) -> None:
        raise AssertionError

    def disconnect(self, code: int, reason: str) -> None:
        raise AssertionError


def intake(**limits: float) -> tuple[Intake, LiveLimits, Stats]:
    live = LiveLimits(LimitsSettings.model_validate(limits))
    stats = Stats()
    events = MessageEvents(structlog.get_logger(), stats)
    return Intake(FakePeer(), live, events, stats), live, stats


def reply_of(item: object) -> dict[str, object]:
    assert isinstance(item, Reply)
    assert item.frame is not None  # a refusal's frame: None is only a reader's marker
    result: dict[str, object] = json.loads(text_of(item.frame))
    return result


def test_an_envelope_becomes_a_relay_with_its_size_and_arrival() -> None:
    judge, _, _ = intake()
    payload = b'{"to": "bob", "message": [1], "ref": 3}'
    item = judge.judge(OP_TEXT, payload, 2.5)
    assert isinstance(item, Relay)
    assert (item.envelope.to, bytes(item.envelope.message), item.envelope.ref) == ("bob", b"[1]", 3)
    assert (item.size, item.received) == (len(payload), 2.5)


def test_over_the_burst_a_message_is_refused_with_its_ref_then_the_flood_closes() -> None:
    with structlog.testing.capture_logs() as logs:
        judge, _, stats = intake(messages_per_second=1, message_burst=2)
        envelope = b'{"to": "bob", "message": 1, "ref": "r%d"}'
        items = [judge.judge(OP_TEXT, envelope % n, 0.0) for n in range(5)]
    assert [type(item) for item in items[:2]] == [Relay, Relay]
    assert [reply_of(item) for item in items[2:4]] == [
        {
            "type": "error",
            "error": "rate_limited",
            "ref": f"r{n}",
            "detail": "too many messages; slow down",
            # A token a second, none left: the first refused gets the next token, a
            # second after, and the second the one after that (each a millisecond more).
            "retry_after_ms": wait,
        }
        for n, wait in ((2, 1002), (3, 2002))
    ]
    assert items[4] is None  # past twice the allowance: the connection closes (1008)
    assert (stats.messages["rate_limited"], stats.errors["rate_limited"]) == (2, 2)
    assert [(e["outcome"], e["to"]) for e in logs] == [("rate_limited", None)] * 2


def test_a_refusal_for_the_rate_says_when_there_is_room_at_the_rate_in_force() -> None:
    judge, live, _ = intake(messages_per_second=4, message_burst=1)
    envelope = b'{"to": "bob", "message": 1}'
    assert isinstance(judge.judge(OP_TEXT, envelope, 10.0), Relay)
    # A token every 0.25 s: the next at 10.25 s; but this refusal took the abuse
    # bucket's one token, back at 10.35 s: its turn (and 1-2 ms for rounding).
    wait = reply_of(judge.judge(OP_TEXT, envelope, 10.1))["retry_after_ms"]
    assert isinstance(wait, int)
    assert 251 <= wait <= 252
    # A reload lowered the rate: the wait is the new rate's, which the 101 never said.
    live.current = LimitsSettings(messages_per_second=0.5, message_burst=1)
    assert isinstance(judge.judge(OP_TEXT, envelope, 11.0), Relay)
    assert reply_of(judge.judge(OP_TEXT, b"not even JSON", 11.0))["retry_after_ms"] == 2002
    assert isinstance(judge.judge(OP_TEXT, envelope, 13.001), Relay)


def test_no_other_error_and_no_seed_refusal_carries_a_wait() -> None:
    # The seed dialect's frames stay as the seed post's relay sent them.
    stats = Stats()
    events = MessageEvents(structlog.get_logger(), stats)
    limits = LiveLimits(LimitsSettings(messages_per_second=1, message_burst=1))
    seed = Intake(FakePeer(dialect=Dialect.SEED), limits, events, stats)
    envelope = b'{"to": "bob", "message": 1, "ref": 7}'
    assert isinstance(seed.judge(OP_TEXT, envelope, 0.0), Relay)
    assert reply_of(seed.judge(OP_TEXT, envelope, 0.0)) == {
        "error": "rate_limited",
        "detail": "too many messages; slow down",
        "ref": 7,
    }
    judge, _, _ = intake()
    for opcode, payload in [(OP_BINARY, b"\x00"), (OP_TEXT, b"hi"), (OP_TEXT, b"[]")]:
        assert "retry_after_ms" not in reply_of(judge.judge(opcode, payload, 0.0))
    with pytest.raises(ValueError, match="for rate_limited only"):
        error_payload(Dialect.V1, ErrorCode.RECIPIENT_BUSY, "busy", None, 100)


def test_a_message_over_a_limit_lowered_by_a_reload_is_refused_with_its_ref() -> None:
    judge, live, _ = intake(max_message_bytes=1000)
    live.current = LimitsSettings(max_message_bytes=10)
    payload = b'{"to": "bob", "message": 1, "ref": 9}'
    assert reply_of(judge.judge(OP_TEXT, payload, 0.0)) == {
        "type": "error",
        "error": "message_too_large",
        "ref": 9,
        "detail": "message is larger than 10 bytes",
    }


def test_binary_and_bad_json_and_bad_envelopes_get_their_codes() -> None:
    judge, _, stats = intake()
    binary = reply_of(judge.judge(OP_BINARY, b"\x00\x01", 0.0))
    assert (binary["error"], binary["ref"]) == ("unsupported_data", None)
    assert binary["detail"] == "binary frames are not supported; send JSON text frames"
    assert reply_of(judge.judge(OP_TEXT, b"hi", 0.0))["error"] == "invalid_json"
    bad = reply_of(judge.judge(OP_TEXT, b'{"to": 5, "message": 1, "ref": "x"}', 0.0))
    assert (bad["error"], bad["ref"]) == ("invalid_envelope", "x")
    assert sorted(stats.errors.items()) == [
        ("invalid_envelope", 1),
        ("invalid_json", 1),
        ("unsupported_data", 1),
    ]


def test_a_reload_that_keeps_the_rate_keeps_the_bucket() -> None:
    # A reload that changed nothing (or only other limits) gave every connection a full
    # bucket and a fresh abuse budget: a flooder's next burst went through.
    judge, live, _ = intake(messages_per_second=1, message_burst=2)
    envelope = b'{"to": "bob", "message": 1}'
    assert [type(judge.judge(OP_TEXT, envelope, 0.0)) for _ in range(3)] == [Relay, Relay, Reply]
    live.current = LimitsSettings(messages_per_second=1, message_burst=2, max_connections=5)
    assert type(judge.judge(OP_TEXT, envelope, 0.0)) is Reply  # still empty


def test_a_reload_of_the_rate_starts_a_fresh_bucket() -> None:
    judge, live, _ = intake(messages_per_second=1, message_burst=1)
    envelope = b'{"to": "bob", "message": 1}'
    assert isinstance(judge.judge(OP_TEXT, envelope, 0.0), Relay)
    assert isinstance(judge.judge(OP_TEXT, envelope, 0.0), Reply)
    live.current = LimitsSettings(messages_per_second=1, message_burst=3)
    assert [type(judge.judge(OP_TEXT, envelope, 0.0)) for _ in range(3)] == [Relay] * 3


def test_a_reload_of_the_rate_keeps_the_turns_promised_and_refuses_without_the_1008() -> None:
    # Three refused at 2 a second with a burst of 3; a reload to one message in 2 s with
    # a burst of 1. The intake made a fresh limiter that forgot the turns: the messages
    # sent again at them were one allowed, one refused, and the third the 1008 (None).
    judge, live, _ = intake(messages_per_second=2, message_burst=3)
    envelope = b'{"to": "bob", "message": 1}'
    assert [type(judge.judge(OP_TEXT, envelope, 0.0)) for _ in range(3)] == [Relay] * 3
    waits = [reply_of(judge.judge(OP_TEXT, envelope, 0.0))["retry_after_ms"] for _ in range(3)]
    assert waits == [502, 1002, 1502]
    live.current = LimitsSettings(messages_per_second=0.5, message_burst=1)
    assert isinstance(judge.judge(OP_TEXT, envelope, 0.502), Relay)
    refused = [reply_of(judge.judge(OP_TEXT, envelope, turn)) for turn in (1.002, 1.502)]
    # Turns after the last promised (due at 1.5 s), 2.001 s apart: due at 3.501 and 5.502 s.
    assert [reply["retry_after_ms"] for reply in refused] == [2500, 4002]


def test_the_echo_route_sends_text_and_binary_back_unjudged() -> None:
    live = LiveLimits(LimitsSettings())
    stats = Stats()
    events = MessageEvents(structlog.get_logger(), stats)
    echo = Intake(FakePeer(), live, events, stats, echo=True)
    item = echo.judge(OP_BINARY, b"\x00raw", 0.0)
    assert isinstance(item, Reply)
    assert item.frame == b"\x82\x04\x00raw"
    assert stats.messages["echoed"] == 1


def test_refusals_are_not_logged_with_message_logging_off_but_still_counted() -> None:
    live = LiveLimits(LimitsSettings())
    stats = Stats()
    events = MessageEvents(structlog.get_logger(), stats, messages="off")
    judge = Intake(FakePeer(), live, events, stats)
    with structlog.testing.capture_logs() as logs:
        judge.judge(OP_TEXT, b"not json", 0.0)
    empty: list[EventDict] = []
    assert logs == empty
    assert stats.messages["invalid_json"] == 1

"""Tests for relayd.routing.replies: the ack and error frames a sender reads, and their count."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from relayd.errors import CloseCode, ErrorCode
from relayd.routing.replies import DETAILS, ack_frame, error_frame, too_large_detail
from relayd.telemetry.metrics import Stats
from relayd.wire.dialects import Dialect
from tests.wire import server_frames

#: The details docs/protocol.md shows, written out.
DOCUMENTED_DETAILS = {
    ErrorCode.UNKNOWN_RECIPIENT: "no client with that id is connected",
    ErrorCode.RECIPIENT_BUSY: "the recipient is not reading fast enough; try again later",
    ErrorCode.RATE_LIMITED: "too many messages; slow down",
    ErrorCode.UNSUPPORTED_DATA: "binary frames are not supported; send JSON text frames",
    ErrorCode.RECIPIENT_UNREACHABLE: (
        "the recipient may be on a node this one cannot reach now; not delivered, try again"
    ),
    ErrorCode.DELIVERY_UNCONFIRMED: (
        "the recipient's node did not confirm delivery in time; it may or may not have it"
    ),
}


def read_text(frame: bytes) -> object:
    """The JSON of the one text frame in ``frame``, as a client reads it."""
    ((opcode, payload),) = server_frames(frame, after_head=False)
    assert opcode == 0x1
    return json.loads(payload)


def test_each_fixed_detail_is_the_documented_text() -> None:
    assert DETAILS == DOCUMENTED_DETAILS


def test_message_too_large_names_the_limit_in_bytes() -> None:
    assert too_large_detail(1024) == "message is larger than 1024 bytes"


@pytest.mark.parametrize(
    ("dialect", "ref", "expected"),
    [
        (
            "relayd.v1",
            "c-2",
            {
                "type": "error",
                "error": "unknown_recipient",
                "ref": "c-2",
                "detail": "no client with that id is connected",
            },
        ),
        (
            "relayd.v1",
            None,
            {
                "type": "error",
                "error": "unknown_recipient",
                "ref": None,
                "detail": "no client with that id is connected",
            },
        ),
        (
            "seed",
            7,
            {
                "error": "unknown_recipient",
                "detail": "no client with that id is connected",
                "ref": 7,
            },
        ),
        (
            "seed",
            None,
            {"error": "unknown_recipient", "detail": "no client with that id is connected"},
        ),
    ],
)
def test_an_error_frame_is_a_text_frame_in_the_senders_dialect(
    dialect: str, ref: str | int | None, expected: dict[str, object]
) -> None:
    frame = error_frame(
        Dialect(dialect),
        ErrorCode.UNKNOWN_RECIPIENT,
        "no client with that id is connected",
        ref,
        Stats(),
    )
    assert read_text(frame) == expected


def test_every_error_frame_is_counted_under_its_code() -> None:
    stats = Stats()
    for code in (ErrorCode.RATE_LIMITED, ErrorCode.RATE_LIMITED, ErrorCode.INVALID_JSON):
        error_frame(Dialect.V1, code, "x", None, stats)
    assert stats.errors == {"rate_limited": 2, "invalid_json": 1}


def test_an_ack_names_the_ref_in_relayd_v1() -> None:
    frame = ack_frame(Dialect.V1, "c-1")
    assert frame is not None
    assert read_text(frame) == {"type": "ack", "ref": "c-1"}
    assert read_text(ack_frame(Dialect.V1, 0) or b"") == {"type": "ack", "ref": 0}


@pytest.mark.parametrize(("dialect", "ref"), [("relayd.v1", None), ("seed", "c-1"), ("seed", None)])
def test_no_ack_without_a_ref_or_in_the_seed_dialect(dialect: str, ref: str | None) -> None:
    assert ack_frame(Dialect(dialect), ref) is None


def test_the_docs_tables_name_every_error_and_close_code_and_no_other() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs"
    protocol = (docs / "protocol.md").read_text()

    def section(text: str, heading: str) -> str:
        return text.partition(f"\n{heading}\n")[2].partition("\n## ")[0]

    def first_column(text: str, pattern: str) -> set[str]:
        return set(re.findall(rf"^\| {pattern} \|", text, re.MULTILINE))

    errors = first_column(section(protocol, "## Error codes"), r"`([a-z_]+)`")
    assert errors - {"error"} == set(ErrorCode)  # "error" heads the table
    # logging.md's message.relay outcomes: delivered, or the error the sender was told.
    relay = section((docs / "logging.md").read_text(), "### message.relay")
    outcomes = set(re.findall(r"`([a-z_]+)`", " ".join(re.findall(r"^\| (`.*?) \|", relay, re.M))))
    assert {"delivered", *ErrorCode} <= outcomes
    # Every code relayd closes with; 1005 (a close frame without a code) never goes out.
    closes = first_column(section(protocol, "## Close codes"), r"(\d{4})")
    assert {int(code) for code in closes} == set(CloseCode) - {CloseCode.NO_STATUS}

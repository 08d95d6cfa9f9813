"""What a sender hears about its message: the reply frames, built in one place.

Both places that decide a message's fate build its reply here: the connection
that refuses a message on arrival (``invalid_json``, ``rate_limited``, ...)
and the router that routes it (an ``ack``, ``unknown_recipient``,
``recipient_busy``). Every error frame is counted in ``relayd_errors_total``.
"""

from __future__ import annotations

from typing import Final

from relayd.errors import ErrorCode
from relayd.telemetry.metrics import Stats
from relayd.wire.dialects import Dialect, ack_payload, error_payload
from relayd.wire.server_frames import text_frame

__all__ = ["DETAILS", "ack_frame", "error_frame", "too_large_detail"]

#: The ``detail`` of each error whose text does not depend on the message.
DETAILS: Final = {
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


def too_large_detail(limit: int) -> str:
    """The ``detail`` of ``message_too_large`` under a limit of ``limit`` bytes."""
    return f"message is larger than {limit} bytes"


def error_frame(
    dialect: Dialect,
    code: ErrorCode,
    detail: str,
    ref: str | int | None,
    stats: Stats,
    retry_after_ms: int | None = None,
) -> bytes:
    """The text frame telling a sender its message was not relayed; counted in ``stats``.

    ``retry_after_ms`` goes with ``rate_limited`` (relayd.v1 only, see
    :func:`~relayd.wire.dialects.error_payload`).
    """
    stats.errors[code] += 1
    return text_frame(error_payload(dialect, code, detail, ref, retry_after_ms))


def ack_frame(dialect: Dialect, ref: str | int | None) -> bytes | None:
    """The text frame acknowledging a delivered message; None without a ``ref`` or in seed."""
    payload = None if ref is None else ack_payload(dialect, ref)
    return None if payload is None else text_frame(payload)

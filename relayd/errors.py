"""relayd's exception tree and the close codes it speaks.

Every error a peer can cause knows how relayd answers it, so the code that
catches it never has to decide::

    RelaydError
    ├── EnvelopeError          a client frame relayd cannot relay; answered with
    │                          an error frame, the connection stays open
    └── (config errors live in :mod:`relayd.config`: they are the operator's,
         answered with exit status 78 before anything listens)

Close codes and handshake statuses are named here once, so logs, docs and tests
all read the same numbers (RFC 6455 §7.4.1).
"""

from __future__ import annotations

import enum

__all__ = ["CloseCode", "EnvelopeError", "ErrorCode", "RelaydError"]


class CloseCode(enum.IntEnum):
    """WebSocket close codes relayd sends (DESIGN §1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    ABNORMAL = 1006  # never sent on the wire: the peer vanished without a close frame
    INVALID_DATA = 1007  # e.g. a text message that is not UTF-8
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


class ErrorCode(enum.StrEnum):
    """The stable ``"error"`` strings of error frames (docs/protocol.md)."""

    INVALID_JSON = "invalid_json"
    INVALID_ENVELOPE = "invalid_envelope"
    UNKNOWN_RECIPIENT = "unknown_recipient"
    RECIPIENT_BUSY = "recipient_busy"
    RATE_LIMITED = "rate_limited"
    UNSUPPORTED_DATA = "unsupported_data"
    MESSAGE_TOO_LARGE = "message_too_large"


class RelaydError(Exception):
    """Base of every exception relayd raises on purpose."""


class EnvelopeError(RelaydError):
    """A client frame that cannot be relayed; the peer misbehaved, not relayd.

    Attributes:
        code: the error code sent back to the client.
        detail: human-readable text for the client (never includes the body).
        ref: the client's ``ref`` when it could be read, echoed in the reply.
    """

    def __init__(self, code: ErrorCode, detail: str, ref: str | int | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.ref = ref

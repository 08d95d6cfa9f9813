"""relayd's exception tree and the codes it answers with.

Every error relayd raises on purpose is a :class:`RelaydError`, and every one a
peer or an operator can cause knows how relayd answers it, so the code that
catches it never has to decide (h11's and wsproto's split: "the peer
misbehaved" errors carry the reply)::

    RelaydError
    ├── ProtocolError      the client broke RFC 6455, or sent frames faster than
    │                      paced: close with .code (1002, 1007, 1009, 1008) and
    │                      .reason, at once
    ├── EnvelopeError      a client message relayd cannot relay: answered with an
    │                      error frame (.code, .detail, .ref); the connection stays
    ├── RouterClosed       the router is shutting down: the connection drains
    ├── BrokerUnavailable  a cluster-wide question (presence, a page of ids)
    │                      cannot be asked: the node is cut off from Redis
    ├── IncompleteAnswer   a cluster-wide question was asked, but not every node
    │                      answered it in time: what came is not the answer
    └── ConfigError        bad settings, files or keys: one line per problem for the
                           operator, every problem at once; exit status 78
                           (EX_CONFIG) before anything listens, or a refused reload

Handshake refusals are values, not exceptions: a
:class:`~relayd.wire.handshake.Refusal` carries its HTTP status and reason.

Close codes and error codes are named here once, so logs, docs and tests all
read the same numbers (RFC 6455 §7.4.1; docs/protocol.md).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

__all__ = [
    "BrokerUnavailable",
    "CloseCode",
    "ConfigError",
    "EnvelopeError",
    "ErrorCode",
    "IncompleteAnswer",
    "ProtocolError",
    "RelaydError",
    "RouterClosed",
]


class CloseCode(enum.IntEnum):
    """WebSocket close codes relayd sends (DESIGN §1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    NO_STATUS = 1005  # never sent on the wire: a close frame without a code
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
    # Cluster only (docs/protocol.md, "Across nodes"):
    RECIPIENT_UNREACHABLE = "recipient_unreachable"
    DELIVERY_UNCONFIRMED = "delivery_unconfirmed"


class RelaydError(Exception):
    """Base of every exception relayd raises on purpose."""


class ProtocolError(RelaydError):
    """The client broke RFC 6455 (or its frame pacing); close the connection with :attr:`code`.

    Raised by :class:`~relayd.wire.frames.FrameParser`.

    Attributes:
        code: the close code to send (1002, 1007, 1009; 1008 for frames past
            the pacing budget).
        reason: the close reason to send, short enough for a close frame.
        parsed: what the parser completed before the violation, in the same
            read; served before the close.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.parsed: list[tuple[int, bytes]] = []


class EnvelopeError(RelaydError):
    """A client message that cannot be relayed; the peer misbehaved, not relayd.

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


class RouterClosed(RelaydError):
    """The router is shutting down and takes no more connections or messages."""


class BrokerUnavailable(RelaydError):
    """The node cannot reach the cluster's broker now; a cluster-wide answer cannot be had."""


class IncompleteAnswer(RelaydError):
    """A cluster-wide question was asked, but not every node's answer came.

    Some node did not answer within ``reply_timeout_s``, the link to the broker
    broke while the question waited, or a node that counts as alive (its
    heartbeat fresh) is cut off from the broker and did not receive it. The
    answers that came are a part, not the answer: a connected id would look
    offline, a disconnect that goes on later would look like none. Retrying is
    safe (presence and ids ask; disconnect is idempotent).
    """


class ConfigError(RelaydError):
    """Bad configuration: one or more problems, each one line for the operator.

    For example ``limits.max_conections: unknown key; did you mean limits.max_connections?
    (in /etc/relayd/relayd.toml)`` or ``server.port: Input should be less than or equal to
    65535 (from environment PORT)``. ``str(err)`` is every problem's line, one per line.

    Attributes:
        key: the dotted key of the first problem, or None when a whole file is at fault
            (unreadable, not TOML).
        source: where the first problem's value came from, as printed: ``in PATH``,
            ``from environment NAME``, ``from command line`` or ``from built-in defaults``.
        reason: what is wrong with it.
        line: the first problem as one line: ``key: reason (source)``, or the reason alone.
        problems: every problem found, each a :class:`ConfigError` of its own, this one's
            first; ``(self,)`` when there is one.
    """

    def __init__(
        self,
        reason: str,
        *,
        source: str,
        key: str | None = None,
        problems: Sequence[ConfigError] = (),
    ) -> None:
        self.key = key
        self.source = source
        self.reason = reason
        self.line = reason if key is None else f"{key}: {reason} ({source})"
        self.problems: tuple[ConfigError, ...] = tuple(problems) or (self,)
        super().__init__("\n".join(problem.line for problem in self.problems))

    @classmethod
    def of(cls, problems: Sequence[ConfigError]) -> ConfigError:
        """One error for several problems; its own attributes are the first one's."""
        if len(problems) == 1:
            return problems[0]
        first = problems[0]
        return cls(first.reason, source=first.source, key=first.key, problems=problems)

"""What :mod:`relayd.client` raises: one class per outcome a program can act on.

Every exception here is a :class:`ClientError`, itself a
:class:`~relayd.errors.RelaydError`::

    ClientError
    ├── ConnectError          no connection was made (.url; __cause__ says why)
    │   ├── HandshakeRefused  relayd answered the upgrade with an HTTP status
    │   │                     (.status, .body): 401/403 auth, 503 at capacity...
    │   ├── ConnectTimeout    no welcome within ``connect_timeout``
    │   └── TLSError          the TLS handshake failed (a hint when the server
    │                         answered in plain text: a ws:// server)
    ├── SendError             relayd did not relay a message (.code, .detail);
    │   │                     the connection stays open
    │   ├── InvalidJSON          invalid_json
    │   ├── InvalidEnvelope      invalid_envelope
    │   ├── UnknownRecipient     unknown_recipient
    │   ├── RecipientBusy        recipient_busy
    │   ├── RateLimited          rate_limited
    │   ├── UnsupportedData      unsupported_data
    │   ├── MessageTooLarge      message_too_large (also refused locally,
    │   │                        before sending, over the server's limit)
    │   ├── RecipientUnreachable recipient_unreachable (a cluster: not sent)
    │   └── DeliveryUnconfirmed  delivery_unconfirmed (a cluster: maybe
    │                            delivered, maybe not)
    └── ConnectionClosed      the connection ended (.code, .reason)
        ├── NormalClosure        1000, e.g. relayd's idle timeout
        ├── ServerShuttingDown   1001
        ├── ProtocolViolation    1002
        ├── InvalidData          1007
        ├── PolicyViolation      1008, e.g. sustained rate-limit abuse
        ├── MessageTooBig        1009
        ├── InternalError        1011, e.g. no keepalive pong
        ├── TryAgainLater        1013, e.g. a slow consumer
        └── ConnectionLost       1006: no close frame (the network, or
                                 relayd dropping a slow consumer)

``retryable`` on a :class:`ConnectError` or :class:`ConnectionClosed` says
whether connecting again can help; the client's reconnect uses it.

Nothing here does I/O; :func:`send_error` and :func:`closed_error` build the
exception for a code read off the wire.
"""

from __future__ import annotations

import math
from typing import ClassVar, Final

import msgspec

from relayd.errors import CloseCode, ErrorCode, RelaydError

__all__ = [
    "ClientError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionClosed",
    "ConnectionLost",
    "DeliveryUnconfirmed",
    "HandshakeRefused",
    "InternalError",
    "InvalidData",
    "InvalidEnvelope",
    "InvalidJSON",
    "MessageTooBig",
    "MessageTooLarge",
    "NormalClosure",
    "PolicyViolation",
    "ProtocolViolation",
    "RateLimited",
    "RecipientBusy",
    "RecipientUnreachable",
    "SendError",
    "ServerShuttingDown",
    "TLSError",
    "TryAgainLater",
    "UnknownRecipient",
    "UnsupportedData",
    "closed_error",
    "send_error",
]


class ClientError(RelaydError):
    """Base of everything :mod:`relayd.client` raises about relayd or the network."""


# -- connecting ------------------------------------------------------------------------


class ConnectError(ClientError):
    """No connection: the network, TLS, or relayd's answer to the handshake.

    Attributes:
        url: the URL that was being connected to.
        retryable: whether trying again later can help (a refused TCP
            connection or a 503 can; a bad token or certificate cannot).
    """

    def __init__(self, url: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.url = url
        self.retryable = retryable


#: The 4xx statuses that may pass: 408 (the request was not complete in time) and 429
#: (too many failed authentications from the client's address, docs/protocol.md).
_PASSING_4XX: Final = frozenset({408, 429})


class HandshakeRefused(ConnectError):
    """relayd answered the WebSocket upgrade with an HTTP status instead of ``101``.

    Attributes:
        status: the HTTP status, e.g. 401 (no or a bad token), 403 (origin or
            token refused), 429 (too many failed authentications from this
            address: retryable), 503 (at capacity, or shutting down: retryable).
        body: relayd's reason, the response body as text.
    """

    def __init__(self, url: str, status: int, body: str) -> None:
        # 503 (capacity, shutting down), 408, 429 (an address's failed
        # authentications, whatever token comes next: it passes as relayd's bucket
        # refills) and other 5xx pass; any other 4xx is answered the same way next time.
        retryable = status >= 500 or status in _PASSING_4XX
        super().__init__(
            url, f"{url} refused the handshake: HTTP {status} {body}".rstrip(), retryable=retryable
        )
        self.status = status
        self.body = body


class ConnectTimeout(ConnectError):
    """No connection and welcome within ``connect_timeout`` seconds."""


class TLSError(ConnectError):
    """The TLS handshake failed; ``__cause__`` is the :class:`ssl.SSLError`, or the ``OSError``.

    Retryable only when the connection ended or was reset during the handshake
    (``__cause__`` is an :class:`ssl.SSLEOFError`, or an :class:`ssl.SSLZeroReturnError`
    as Python before 3.11.3 says it, or not an :class:`ssl.SSLError`):
    a server at its handshake limit, or restarting, does that. A certificate that
    did not verify, or a server that does not speak TLS, answers the same next time.
    """

    def __init__(self, url: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(url, message, retryable=retryable)


# -- sending ---------------------------------------------------------------------------


class SendError(ClientError):
    """relayd did not relay a message; the connection stays open.

    Attributes:
        code: the error code relayd sent (an :class:`~relayd.errors.ErrorCode`
            value, or a newer code this client does not know).
        detail: relayd's text for people; do not parse it.
        ref: the ``ref`` relayd echoed (None when it did not read it).
        retry_after: seconds after the refusal until the message's turn, as
            relayd said it (``retry_after_ms``, on :class:`RateLimited` from a
            relayd that sends it); None when it did not say.
    """

    #: The error code this class stands for; None for the base class.
    error_code: ClassVar[ErrorCode | None] = None

    def __init__(
        self,
        code: str,
        detail: str,
        ref: str | int | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail
        self.ref = ref
        self.retry_after = retry_after


class InvalidJSON(SendError):
    """The message was not JSON (only a :class:`msgspec.Raw` body can cause it)."""

    error_code = ErrorCode.INVALID_JSON


class InvalidEnvelope(SendError):
    """JSON but not an envelope, e.g. an empty ``to`` or one over 256 characters."""

    error_code = ErrorCode.INVALID_ENVELOPE


class UnknownRecipient(SendError):
    """No connection holds that id: it never existed or has closed."""

    error_code = ErrorCode.UNKNOWN_RECIPIENT


class RecipientBusy(SendError):
    """The recipient's queue at relayd is full; retry later, with backoff."""

    error_code = ErrorCode.RECIPIENT_BUSY


class RateLimited(SendError):
    """Over the connection's rate limit; keep it up and relayd closes with 1008.

    Wait :attr:`retry_after` seconds (when relayd said), a little more for the
    two clocks, before sending the message again: it is then the message's
    turn, and it is accepted, provided nothing new was sent before the last
    turn relayd gave (a message not sent again keeps its turn). Each of several
    sends refused together is given a turn of its own, so each may wait its own.
    """

    error_code = ErrorCode.RATE_LIMITED


class UnsupportedData(SendError):
    """A binary message; this client sends text only, so relayd never says it to it."""

    error_code = ErrorCode.UNSUPPORTED_DATA


class MessageTooLarge(SendError):
    """Over relayd's ``max_message_bytes``.

    Raised without sending when the message is over the limit relayd
    announced at the handshake (sending it would close the connection with
    1009), and when relayd answers ``message_too_large`` (its limit was lowered
    by a reload while connected).
    """

    error_code = ErrorCode.MESSAGE_TOO_LARGE

    def __init__(
        self,
        code: str,
        detail: str,
        ref: str | int | None = None,
        *,
        sent: bool = True,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, detail, ref, retry_after=retry_after)
        #: False when this client refused it without sending it.
        self.sent = sent


class RecipientUnreachable(SendError):
    """A relayd cluster could not reach the node that may hold the recipient: not delivered.

    Retrying later is safe (docs/protocol.md, "Across nodes").
    """

    error_code = ErrorCode.RECIPIENT_UNREACHABLE


class DeliveryUnconfirmed(SendError):
    """A relayd cluster sent it to the recipient's node, which did not confirm in time.

    It may or may not have been delivered; relayd never sends it twice.
    """

    error_code = ErrorCode.DELIVERY_UNCONFIRMED


_SEND_ERRORS: Final[dict[str, type[SendError]]] = {
    cls.error_code: cls
    for cls in (
        InvalidJSON,
        InvalidEnvelope,
        UnknownRecipient,
        RecipientBusy,
        RateLimited,
        UnsupportedData,
        MessageTooLarge,
        RecipientUnreachable,
        DeliveryUnconfirmed,
    )
    if cls.error_code is not None
}


def send_error(
    code: str, detail: str, ref: str | int | None = None, *, retry_after_ms: object = None
) -> SendError:
    """The exception for an error frame: its own class, else :class:`SendError`.

    Args:
        code: the frame's ``error``.
        detail: its ``detail``.
        ref: its ``ref``.
        retry_after_ms: its ``retry_after_ms`` as it came (JSON text, or a number):
            a finite number is the exception's ``retry_after``, in seconds, none
            below 0; anything else (absent, null, a string, 1e400, from a server
            that is not relayd) none.
    """
    return _SEND_ERRORS.get(code, SendError)(
        code, detail, ref, retry_after=_seconds(retry_after_ms)
    )


def _seconds(milliseconds: object) -> float | None:
    """A wait in milliseconds, as JSON text or a number, in seconds; None if not a finite number."""
    if isinstance(milliseconds, bytes | msgspec.Raw):
        try:
            milliseconds = msgspec.json.decode(milliseconds)
        except (msgspec.DecodeError, RecursionError):  # 1e400 is out of range
            return None
    if not isinstance(milliseconds, int | float) or isinstance(milliseconds, bool):
        return None
    try:
        seconds = float(milliseconds) / 1000
    except OverflowError:  # an integer of hundreds of digits
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


# -- closes ----------------------------------------------------------------------------


class ConnectionClosed(ClientError):
    """The connection ended.

    Raised by :meth:`~relayd.client.Client.send` for a message whose outcome
    relayd had not told (it may or may not have been delivered), and by
    receiving once the messages that arrived before the close are read.

    Attributes:
        code: the close code (1006 when no close frame came).
        reason: the close reason relayd gave, or text saying what happened.
        retryable: whether connecting again can help.
    """

    #: The close code this class stands for; None for the base class.
    close_code: ClassVar[CloseCode | None] = None
    #: Whether reconnecting can help after this close.
    retryable: ClassVar[bool] = False

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class NormalClosure(ConnectionClosed):
    """1000: relayd closed an idle connection (``idle_timeout_s``)."""

    close_code = CloseCode.NORMAL
    retryable = True


class ServerShuttingDown(ConnectionClosed):
    """1001: relayd is shutting down, after flushing what it had for this client."""

    close_code = CloseCode.GOING_AWAY
    retryable = True


class ProtocolViolation(ConnectionClosed):
    """1002: relayd saw a frame that breaks RFC 6455 (a bug in the client stack)."""

    close_code = CloseCode.PROTOCOL_ERROR


class InvalidData(ConnectionClosed):
    """1007: invalid UTF-8 in a text message."""

    close_code = CloseCode.INVALID_DATA


class PolicyViolation(ConnectionClosed):
    """1008: sustained rate-limit abuse, more frames than relayd's pacing allows, or the backend.

    The server API's default code for a disconnect. Not retried: relayd would take a
    new connection, but what caused the close comes with the program (it sends too
    fast), or the backend meant this client to stay away.
    """

    close_code = CloseCode.POLICY


class MessageTooBig(ConnectionClosed):
    """1009: a message over ``max_message_bytes`` (either side's limit)."""

    close_code = CloseCode.TOO_BIG


class InternalError(ConnectionClosed):
    """1011: no pong to relayd's keepalive ping in time, or a bug in relayd."""

    close_code = CloseCode.INTERNAL_ERROR
    retryable = True


class TryAgainLater(ConnectionClosed):
    """1013: relayd dropped a slow consumer, or is overloaded."""

    close_code = CloseCode.TRY_AGAIN_LATER
    retryable = True


class ConnectionLost(ConnectionClosed):
    """1006: the connection ended without a close frame.

    The network dropped, relayd dropped a slow consumer without one, or this
    client's keepalive ping went unanswered.
    """

    close_code = CloseCode.ABNORMAL
    retryable = True


_CLOSES: Final[dict[int, type[ConnectionClosed]]] = {
    cls.close_code: cls
    for cls in (
        NormalClosure,
        ServerShuttingDown,
        ProtocolViolation,
        InvalidData,
        PolicyViolation,
        MessageTooBig,
        InternalError,
        TryAgainLater,
        ConnectionLost,
    )
    if cls.close_code is not None
}


def closed_error(code: int, reason: str = "") -> ConnectionClosed:
    """The exception for a close code: its own class, else :class:`ConnectionClosed`."""
    return _CLOSES.get(code, ConnectionClosed)(code, reason)

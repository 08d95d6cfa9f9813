"""The wire protocol, without I/O: client frames in, values out; values in, frames out.

relayd speaks two dialects on one port, chosen per connection by the
subprotocol the client offers (docs/protocol.md):

* :attr:`Dialect.SEED`, no subprotocol: the bare id as the first frame, the
  message itself (or its JSON encoding) to the recipient; what the seed post's
  browser client expects.
* :attr:`Dialect.V1`, subprotocol ``relayd.v1``: typed JSON envelopes with
  ``welcome``, ``message``, ``ack`` and ``error``.

Both dialects send the same thing from client to server, so decoding is one
function. A relayed ``message`` is decoded once, kept as its raw JSON text
(:class:`msgspec.Raw`), and copied into the recipient's frame as it came: the
body is never parsed into Python objects or encoded again.

Nothing here touches a socket or trio; everything is tested in
``tests/test_protocol.py`` as plain values.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Sequence
from typing import Annotated, Final

import msgspec

from relayd.errors import EnvelopeError, ErrorCode

__all__ = [
    "MAX_ID_CHARS",
    "MAX_REF_CHARS",
    "SERVER_SENDER",
    "TOO_DEEP",
    "V1_SUBPROTOCOL",
    "Ack",
    "Delivery",
    "Dialect",
    "Envelope",
    "Error",
    "SeedError",
    "ServerMessage",
    "Welcome",
    "ack_payload",
    "choose_dialect",
    "decode_envelope",
    "delivery_payload",
    "error_payload",
    "read_ref",
    "syntax_error",
    "welcome_payload",
]

V1_SUBPROTOCOL: Final = "relayd.v1"

#: Longest ``to`` accepted. Server ids are 22 characters; the bound leaves room
#: for authenticated subjects while refusing absurd keys before any lookup.
MAX_ID_CHARS: Final = 256
#: The ``from`` of a message the application's backend published through the server
#: API (docs/api.md): empty, which no id is (``to`` must be 1 to 256 characters), so no
#: client can pass for the backend, and a reply to it is refused as ``invalid_envelope``.
SERVER_SENDER: Final = ""
#: Longest string ``ref``; it is echoed back, so it is bounded like the id.
MAX_REF_CHARS: Final = 256
#: Integer refs stay within what a JavaScript number holds exactly.
_MAX_SAFE_INT: Final = 2**53 - 1

Ref = (
    Annotated[str, msgspec.Meta(max_length=MAX_REF_CHARS)]
    | Annotated[int, msgspec.Meta(ge=-_MAX_SAFE_INT, le=_MAX_SAFE_INT)]
    | None
)


class Dialect(enum.StrEnum):
    """How one connection speaks; fixed at the handshake."""

    SEED = "seed"
    V1 = V1_SUBPROTOCOL


#: :attr:`Dialect.SEED` and :attr:`Dialect.V1` as module globals, for what runs per
#: message or connection: an attribute of an enum class is looked up through
#: ``EnumType.__getattr__``'s slot, several times a global's cost.
_SEED: Final = Dialect.SEED
_V1: Final = Dialect.V1


def choose_dialect(offered: Sequence[str]) -> Dialect:
    """Pick the dialect for the subprotocols a client offered.

    ``relayd.v1`` anywhere in the offer selects it; anything else is the seed
    dialect, which selects no subprotocol. (The handshake policy refuses an
    offer that names subprotocols but not ``relayd.v1``.)
    """
    return _V1 if V1_SUBPROTOCOL in offered else _SEED


class Envelope(msgspec.Struct, frozen=True):
    """A client's request to relay one message.

    Attributes:
        to: the recipient's id.
        message: the message as raw JSON text, exactly as the client sent it.
        ref: the client's correlation value, echoed in the ack or error.
    """

    to: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
    message: msgspec.Raw
    ref: Ref = None


class Welcome(msgspec.Struct, frozen=True, tag="welcome", tag_field="type"):
    """v1: the first message a client receives, with its id."""

    id: str


class Delivery(
    msgspec.Struct, frozen=True, tag="message", tag_field="type", rename={"sender": "from"}
):
    """v1: a message relayed to its recipient; ``from`` on the wire."""

    sender: str
    message: msgspec.Raw


class Ack(msgspec.Struct, frozen=True, tag="ack", tag_field="type"):
    """v1: the message with this ``ref`` is in its recipient's outbox."""

    ref: Ref = None


class Error(msgspec.Struct, frozen=True, tag="error", tag_field="type"):
    """v1: a message not relayed; ``ref`` is always present, null when the client gave none.

    ``retry_after_ms`` is on ``rate_limited`` errors only (absent from the others'
    JSON, not null): how long after the refusal that message's turn comes
    (:meth:`relayd.policy.ratelimit.RateLimiter.retry_after_ms`). A client that
    predates it ignores it, as it ignores any field it does not know.
    """

    error: str
    ref: Ref = None
    detail: str = ""
    # relayd sends a whole number. A client takes any JSON value here, as it came, and
    # acts on a sane number only (relayd.client.errors.send_error): a typed field would
    # turn an error with an odd wait (1e400 is out of a float's range) into no error at
    # all, and leave the send it answers waiting for a reply that came.
    retry_after_ms: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


#: Everything a v1 server sends as a text frame (decode with ``msgspec.json.Decoder``).
ServerMessage = Welcome | Delivery | Ack | Error


class SeedError(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """Seed: a message not relayed; ``ref`` only when the client gave one."""

    error: str
    detail: str
    ref: Ref = None


class _RefOnly(msgspec.Struct):
    """Reads just the ``ref`` of an envelope that failed validation."""

    ref: Ref = None


_envelope_decoder: Final = msgspec.json.Decoder(Envelope)
_ref_decoder: Final = msgspec.json.Decoder(_RefOnly)
_raw_decoder: Final = msgspec.json.Decoder(msgspec.Raw)
#: msgspec's decoder recurses, so JSON nested about a thousand levels deep
#: exhausts Python's recursion limit; that is reported as invalid_json (and by
#: the server API as invalid_request) with this detail.
TOO_DEEP: Final = "JSON is nested too deeply"
_encoder: Final = msgspec.json.Encoder()


def decode_envelope(frame: bytes | str) -> Envelope:
    """Decode one client text message.

    Args:
        frame: the UTF-8 text of a text message (binary ones are refused
            before this).

    Returns:
        The envelope; extra keys are ignored so clients may add their own.

    Raises:
        EnvelopeError: ``invalid_json`` if the frame is not JSON (including
            JSON nested too deeply to read), ``invalid_envelope`` if it is JSON
            but not ``{"to": str, "message": any, "ref"?: str | int}``. Nothing
            else escapes, whatever the input.
    """
    try:
        return _envelope_decoder.decode(frame)
    except msgspec.ValidationError as exc:
        # msgspec validates while it parses, so a type error seen before a
        # syntax error wins; check the syntax alone before blaming the shape.
        try:
            _raw_decoder.decode(frame)
        except msgspec.DecodeError as syntax:
            raise EnvelopeError(ErrorCode.INVALID_JSON, syntax_error(syntax, frame)) from None
        except RecursionError:
            raise EnvelopeError(ErrorCode.INVALID_JSON, TOO_DEEP) from None
        raise EnvelopeError(ErrorCode.INVALID_ENVELOPE, str(exc), read_ref(frame)) from None
    except msgspec.DecodeError as exc:
        raise EnvelopeError(ErrorCode.INVALID_JSON, syntax_error(exc, frame)) from None
    except RecursionError:
        raise EnvelopeError(ErrorCode.INVALID_JSON, TOO_DEEP) from None


#: Half of a UTF-16 surrogate pair: a \uD800-\uDBFF escape not followed by a
#: \uDC00-\uDFFF one, or one of those not preceded by the first kind. It begins with a
#: literal, so that ``re`` skips ahead in C from one "\u" to the next.
_HALF_PAIR: Final = re.compile(
    rb"\\u[dD](?:[89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD])[c-fC-F][0-9a-fA-F]{2})"
)
#: JSON's syntax alone, checked in C without making its values.
_json_syntax: Final = msgspec.json.Decoder(msgspec.Raw)


def syntax_error(error: msgspec.DecodeError, text: bytes | str) -> str:
    r"""What is wrong with JSON ``text`` that msgspec could not decode, for the sender.

    msgspec refuses a string holding half a UTF-16 surrogate pair (``"\ud83d"``,
    which JavaScript's ``JSON.stringify`` writes for a string cut inside an emoji,
    and which UTF-8 cannot spell) with a detail such as "Input data was truncated".
    When halves are the text's only fault (it is JSON once each is mended), the first
    is named instead; otherwise msgspec's detail stands. The cost is two scans and a
    check of the syntax, all in C: about 1 ms for 64 KiB of halves.
    """
    data = text.encode(errors="surrogatepass") if isinstance(text, str) else text
    first = _HALF_PAIR.search(data)
    if first is None:
        return str(error)
    try:
        _json_syntax.decode(_HALF_PAIR.sub(rb"\\ufffd", data))
    except (msgspec.DecodeError, RecursionError):
        return str(error)
    return (
        f"JSON is malformed: {first.group().decode()} is half of a UTF-16 surrogate pair "
        f"(byte {first.start()}); strings must be valid Unicode"
    )


def read_ref(frame: bytes | str) -> str | int | None:
    """The ``ref`` of a client message, if it is JSON with a valid one; else None.

    For replies to messages refused before (or after) they are decoded, so
    that the client can match the error to its request.
    """
    try:
        return _ref_decoder.decode(frame).ref
    except (msgspec.DecodeError, RecursionError):
        return None


def welcome_payload(dialect: Dialect, client_id: str) -> bytes:
    """The first message a client receives: its id."""
    if dialect is _SEED:
        return client_id.encode()
    return _encoder.encode(Welcome(client_id))


_HEAD_MARK: Final = msgspec.Raw(b"0")


@functools.lru_cache(maxsize=4096)
def _v1_head(sender: str) -> bytes:
    # Everything of a v1 Delivery but the message and the closing brace, for
    # one sender: encoded once per sender rather than once per message.
    return _encoder.encode(Delivery(sender, _HEAD_MARK))[: -len(_HEAD_MARK) - 1]


def delivery_payload(dialect: Dialect, sender: str, message: msgspec.Raw) -> bytes:
    """The message a recipient receives for one relayed ``message``.

    Args:
        dialect: the recipient's dialect.
        sender: the sender's id.
        message: the raw JSON text of the sender's ``message``.

    Returns:
        Seed: the message itself if it is a JSON string, else its JSON text.
        V1: ``{"type": "message", "from": sender, "message": <as sent>}``.
    """
    raw = bytes(message)
    if dialect is _SEED:
        if raw[:1] != b'"':
            return raw
        # find(), not `in`: CPython 3.11's bytes `in` first tries its operand as
        # an int, and builds a TypeError to throw away, costlier than the search.
        if raw.find(b"\\") < 0:
            # A JSON string without escapes is its own text between the quotes
            # (the decoder already refused raw control characters in it).
            return raw[1:-1]
        return msgspec.json.decode(raw, type=str).encode()
    return _v1_head(sender) + raw + b"}"


def ack_payload(dialect: Dialect, ref: str | int) -> bytes | None:
    """The sender's receipt for a message handed to the recipient's outbox.

    Returns:
        The v1 ``ack`` message, or None for the seed dialect, which has no acks.
    """
    if dialect is _SEED:
        return None
    return _encoder.encode(Ack(ref))


def error_payload(
    dialect: Dialect,
    code: ErrorCode,
    detail: str,
    ref: str | int | None,
    retry_after_ms: int | None = None,
) -> bytes:
    """The message telling a sender its message was not relayed.

    Seed clients get ``{"error", "detail"}`` (plus ``ref`` if they sent one);
    v1 clients get ``{"type": "error", "error", "ref", "detail"}`` with ``ref``
    always present, null when the client gave none, and ``retry_after_ms`` when
    it is given. The seed dialect never gets it: its frames stay as the seed
    post's relay sent them.

    Raises:
        ValueError: ``retry_after_ms`` given for another code than ``rate_limited``.
    """
    if dialect is Dialect.SEED:
        return _encoder.encode(SeedError(code.value, detail, ref))
    if retry_after_ms is None:
        return _encoder.encode(Error(code.value, ref, detail))
    if code is not ErrorCode.RATE_LIMITED:
        raise ValueError(f"retry_after_ms is for rate_limited only, not {code.value}")
    return _encoder.encode(Error(code.value, ref, detail, msgspec.Raw(b"%d" % retry_after_ms)))

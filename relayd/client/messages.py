"""One connection's frames, without I/O: the envelopes sent, the frames received.

The server's frames are the structs declared once in
:mod:`relayd.wire.dialects` (:class:`~relayd.wire.dialects.Welcome`,
:class:`~relayd.wire.dialects.Delivery`, :class:`~relayd.wire.dialects.Ack`,
:class:`~relayd.wire.dialects.Error`, :class:`~relayd.wire.dialects.SeedError`),
and what the client sends is an :class:`~relayd.wire.dialects.Envelope`; this
module only turns them into what a program uses, a :class:`Message`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import msgspec

from relayd.client.errors import SendError, send_error
from relayd.wire.dialects import (
    SERVER_SENDER,
    Dialect,
    Envelope,
    SeedError,
    ServerMessage,
    Welcome,
)

__all__ = [
    "Message",
    "check_id",
    "decode_v1",
    "encode_body",
    "encode_envelope",
    "seed_message",
    "welcome_id",
]

_encoder: Final = msgspec.json.Encoder()
_v1_decoder: Final[msgspec.json.Decoder[ServerMessage]] = msgspec.json.Decoder(ServerMessage)
_welcome_decoder: Final = msgspec.json.Decoder(Welcome)
_seed_error_decoder: Final = msgspec.json.Decoder(SeedError)
_raw_decoder: Final = msgspec.json.Decoder(msgspec.Raw)
#: float_hook: a number beyond a float's range (``1e999``), which relayd relays as the
#: JSON it is, is infinite, as ``json.loads`` has it; msgspec alone refuses it, and one
#: such message from a peer raised out of a program's receive loop.
_any_decoder: Final = msgspec.json.Decoder(float_hook=float)
_str_decoder: Final = msgspec.json.Decoder(str)


@dataclass(frozen=True, slots=True)
class Message:
    """One message relayed to this client.

    Attributes:
        sender: the sender's id as relayd knows it (never something the sender
            wrote); ``""`` for a message the application's backend published
            through relayd's server API (:attr:`from_server`), which no client
            can answer; None in the seed dialect, which does not say.
        raw: the message as JSON text (UTF-8), exactly as its sender wrote it
            in relayd.v1. The seed dialect delivers a JSON string as its bare
            text, so there ``raw`` is the frame if it is JSON, else the frame
            as a JSON string: a seed client cannot tell ``"42"`` from ``42``.
    """

    sender: str | None
    raw: bytes

    @property
    def from_server(self) -> bool:
        """Whether the application's backend sent this through relayd's server API.

        relayd.v1 says so with the empty sender id ``""``, which no client can hold
        (docs/api.md): there is no one to answer, and a send to ``""`` is refused
        with :class:`~relayd.client.InvalidEnvelope`. Always False in the seed
        dialect, which does not say who sent a message.
        """
        return self.sender == SERVER_SENDER

    @property
    def data(self) -> Any:
        """The message as a Python value (decoded from :attr:`raw` on each access).

        A number beyond a float's range is ``inf`` or ``-inf``, as ``json.loads`` has it.

        Raises:
            ValueError: the message holds an integer of more digits than Python
                converts (``sys.get_int_max_str_digits()``, 4300 by default), as
                ``json.loads`` raises; :attr:`raw` and :attr:`text` still hold it.
        """
        try:
            return _any_decoder.decode(self.raw)
        except msgspec.ValidationError as exc:
            raise ValueError(
                f"the message holds a number Python does not convert ({exc}): read it from raw"
            ) from None

    @property
    def text(self) -> str:
        """A string message's text; any other JSON value as its JSON text."""
        if self.raw[:1] == b'"':
            return _str_decoder.decode(self.raw)
        return self.raw.decode()

    def as_error(self) -> SendError | None:
        """In the seed dialect, the error a relayd error frame stands for; else None.

        The seed dialect sends errors (``{"error": ..., "detail": ...}``) on the
        same channel as messages, so they arrive as messages. A peer can send a
        message of the same shape: only relayd.v1 tells them apart, and there a
        message (one with a ``sender``) is always a peer's, never relayd's error.
        """
        if self.sender is not None:
            return None
        try:
            error = _seed_error_decoder.decode(self.raw)
        except (msgspec.DecodeError, RecursionError):
            return None
        return send_error(error.error, error.detail, error.ref)


def encode_body(message: object) -> bytes:
    """A message as JSON text; a :class:`msgspec.Raw` is sent as the JSON it holds.

    msgspec's encoding: ``bytes`` go as base64 strings, sets as lists, NaN and
    the infinities as ``null``.

    Raises:
        TypeError: ``message`` is not something JSON can hold.
        ValueError: a string in it is not valid Unicode: it holds a lone UTF-16
            surrogate (half of an emoji cut in two, say), which relayd refuses;
            it is nested too deeply to encode; or a :class:`msgspec.Raw` in it
            (the message itself, or a value inside it) does not hold one JSON
            value (pasted into the envelope as it is, it could make another
            envelope: ``"x","to":"someone else"``).
    """
    try:
        body = _encoder.encode(message)
    except UnicodeEncodeError:
        raise ValueError(_NOT_UNICODE.format("the message")) from None
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None
    # The encoder writes a Raw's bytes as they are, wherever it is: the whole body is
    # checked, in C (about 1 ms for a megabyte), so that it is one JSON value.
    _check_json(body)
    if not isinstance(message, _SCALARS):
        # That is not enough for a Raw inside the message: joined with the JSON around
        # it, a Raw of several values (b'1,"admin":true') still makes one, with a key or
        # elements the program never put there. msgspec walks the value again, in C, and
        # hands each Raw it meets to the hook; what it builds is thrown away.
        try:
            msgspec.to_builtins(message, enc_hook=_check_nested)
        except RecursionError:
            raise ValueError(_TOO_DEEP) from None
    return body


def _check_json(raw: bytes | msgspec.Raw) -> None:
    """Refuse ``raw`` unless it is one JSON value (a Raw's bytes, or a whole body)."""
    try:
        _raw_decoder.decode(raw)
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"a msgspec.Raw in the message is not one JSON value: {exc}") from None


def _check_nested(value: object) -> None:
    """``to_builtins``' hook in :func:`encode_body`: only a Raw reaches it there.

    Anything else reaching it was encoded already, so it is let through.
    """
    if isinstance(value, msgspec.Raw):
        _check_json(value)


#: Messages that hold no other value, so no Raw: their whole body was checked.
_SCALARS: Final = (msgspec.Raw, str, int, float, bool, type(None))


_TOO_DEEP: Final = "the message is nested too deeply to encode"


def check_id(client_id: str) -> None:
    """Refuse a recipient id that no frame can carry.

    Raises:
        ValueError: ``client_id`` holds a lone UTF-16 surrogate.
    """
    if isinstance(client_id, str) and not client_id.isascii():  # else relayd says what
        try:
            client_id.encode()
        except UnicodeEncodeError:
            raise ValueError(_NOT_UNICODE.format("the recipient id")) from None


#: Why a string cannot be sent: UTF-8, which WebSocket text frames carry, has no
#: spelling for half a surrogate pair, and JSON's \ud800 escape is refused by relayd.
_NOT_UNICODE: Final = (
    "{} holds a string that is not valid Unicode (a lone UTF-16 surrogate, such as half "
    "of an emoji cut in two)"
)


def encode_envelope(to: str, body: bytes, ref: int | None) -> bytes:
    """The frame that asks relayd to relay ``body`` (JSON text) to ``to``."""
    return _encoder.encode(Envelope(to, msgspec.Raw(body), ref))


def welcome_id(dialect: Dialect, frame: str | bytes) -> str | None:
    """The id in the first frame: a v1 welcome, or a bare string; None if there is none."""
    if isinstance(frame, bytes) or not frame:
        return None
    if dialect is Dialect.SEED:
        return frame
    try:
        return _welcome_decoder.decode(frame).id
    except msgspec.DecodeError:
        return None


def decode_v1(frame: str) -> ServerMessage | None:
    """A relayd.v1 server frame; None for text that is not one (never sent by relayd)."""
    try:
        return _v1_decoder.decode(frame)
    except (msgspec.DecodeError, RecursionError):
        return None


def seed_message(frame: str) -> Message:
    """A seed-dialect frame as a message (see :attr:`Message.raw`)."""
    raw = frame.encode()
    try:
        _raw_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return Message(None, _encoder.encode(frame))
    return Message(None, raw)

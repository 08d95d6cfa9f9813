"""Tests for relayd.wire.dialects: frames in, values out; values in, frames out. No sockets."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relayd.errors import EnvelopeError, ErrorCode
from relayd.wire.dialects import (
    Ack,
    Delivery,
    Dialect,
    Envelope,
    Error,
    SeedError,
    ServerMessage,
    Welcome,
    ack_payload,
    choose_dialect,
    decode_envelope,
    delivery_payload,
    error_payload,
    syntax_error,
    welcome_payload,
)

#: docs/protocol.md, "Connecting": ``to`` is 1 to 256 characters, a string ``ref`` up
#: to 256, an integer ``ref`` within ±(2^53 - 1). Written out, not imported, so
#: that a changed limit in relayd fails these tests.
MAX_ID_CHARS = 256
MAX_REF_CHARS = 256
MAX_SAFE_INT = 2**53 - 1

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]

json_values: st.SearchStrategy[JsonValue] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)
ids = st.text(min_size=1, max_size=MAX_ID_CHARS)
refs = (
    st.none()
    | st.text(max_size=MAX_REF_CHARS)
    | st.integers(min_value=-MAX_SAFE_INT, max_value=MAX_SAFE_INT)
)


def envelope_error(frame: str) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        decode_envelope(frame)
    return info.value


# --- decode_envelope: valid envelopes ---------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        "null",
        "true",
        "false",
        "0",
        "-12",
        "1.50",
        "1E+3",
        "123456789012345678901234567890",
        '""',
        '"  two  spaces  "',
        r'"caf\u00e9 \"quoted\" \n"',
        '"café"',
        "[]",
        "[ 1 ,\n\t2 , [ ] ]",
        "{}",
        '{ "b" : 1 ,  "a" : { "c" : [ null ] } }',
    ],
)
def test_message_is_kept_byte_for_byte(message: str) -> None:
    envelope = decode_envelope(f'{{"to": "bob", "message": {message}}}')
    assert (envelope.to, envelope.ref) == ("bob", None)
    assert bytes(envelope.message) == message.encode()


@pytest.mark.parametrize(
    ("ref_json", "ref"),
    [
        ('"r-1"', "r-1"),
        ('""', ""),
        ("0", 0),
        ("42", 42),
        (str(-MAX_SAFE_INT), -MAX_SAFE_INT),
        (str(MAX_SAFE_INT), MAX_SAFE_INT),
        (json.dumps("x" * MAX_REF_CHARS), "x" * MAX_REF_CHARS),
        ("null", None),
    ],
)
def test_ref(ref_json: str, ref: str | int | None) -> None:
    envelope = decode_envelope(f'{{"to": "bob", "message": 1, "ref": {ref_json}}}')
    assert envelope.ref == ref
    assert type(envelope.ref) is type(ref)


def test_ref_absent_is_none() -> None:
    assert decode_envelope('{"to": "bob", "message": 1}').ref is None


def test_extra_keys_are_ignored() -> None:
    envelope = decode_envelope(
        '{"type": "x", "to": "bob", "mine": {"deep": [1]}, "message": [2], "ref": 3}'
    )
    assert (envelope.to, bytes(envelope.message), envelope.ref) == ("bob", b"[2]", 3)


def test_longest_id_is_accepted() -> None:
    assert decode_envelope(json.dumps({"to": "i" * MAX_ID_CHARS, "message": 1})).to == (
        "i" * MAX_ID_CHARS
    )


# --- decode_envelope: errors -------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param("", id="empty"),
        pytest.param("hello", id="not-json"),
        pytest.param("{to: 'bob'}", id="js-not-json"),
        pytest.param('{"to": "bob", "message": 1', id="truncated"),
        pytest.param('{"to": "bob", "message": ', id="truncated-before-message"),
        pytest.param('{"to": "bob", "message": [1,]}', id="trailing-comma"),
        pytest.param('{"to": "bob", "message": 1} x', id="trailing-garbage"),
        pytest.param('{"to": "bob", "message": "\\ud800"}', id="lone-surrogate-escape"),
        pytest.param('{"to": 5, "message": 1', id="truncated-after-bad-to"),
        pytest.param("[" * 100_000, id="100000-open-brackets"),
        pytest.param('{"to": "bob", "message": ' + "[" * 100_000, id="deep-truncated-message"),
        pytest.param(
            '{"to": "bob", "message": ' + "[" * 100_000 + "]" * 100_000 + "}",
            id="deep-message",
        ),
    ],
)
def test_invalid_json(frame: str) -> None:
    error = envelope_error(frame)
    assert error.code is ErrorCode.INVALID_JSON
    assert error.ref is None
    assert error.detail


@pytest.mark.parametrize(
    ("frame", "escape", "at"),
    [
        # What JSON.stringify writes for a string cut inside an emoji: msgspec said
        # "Input data was truncated" (found by a tester with Chromium).
        ('{"to": "bob", "message": "cut \\ud83d"}', "\\ud83d", 30),
        ('{"to": "bob", "message": "x", "ref": "\\udc00"}', "\\udc00", 38),
        ('{"to": "\\uD800", "message": 1}', "\\uD800", 8),
        ('{"to": "bob", "message": "\\ude00\\ud83d"}', "\\ude00", 26),  # the wrong order
        # Every half is mended to see whether the rest is JSON; the first is named.
        ('{"to": "bob", "message": ["\\ud800\\ud800", "ok", "\\udfff"]}', "\\ud800", 27),
    ],
)
def test_half_a_surrogate_pair_is_named_as_such(frame: str, escape: str, at: int) -> None:
    error = envelope_error(frame)
    assert error.code is ErrorCode.INVALID_JSON
    assert error.detail == (
        f"JSON is malformed: {escape} is half of a UTF-16 surrogate pair (byte {at}); "
        "strings must be valid Unicode"
    )


@pytest.mark.parametrize(
    "frame",
    [
        # A backslash escaped itself, then "ud800": no escape at all (a reviewer's).
        '{"to": "bob", "message": "C:\\\\ud800 path"',
        '{"to": "bob", "message": ["ok\\\\udc00",]}',
        # Half a pair, and another fault: msgspec's detail stands.
        '{"to": "bob", "message": ["\\ud800",]}',
    ],
)
def test_only_a_text_whose_one_fault_is_half_a_pair_is_named_so(frame: str) -> None:
    error = envelope_error(frame)
    assert error.code is ErrorCode.INVALID_JSON
    with pytest.raises(msgspec.DecodeError) as msgspec_says:
        msgspec.json.decode(frame)
    assert error.detail == str(msgspec_says.value)


def test_the_detail_of_text_as_bytes_or_holding_lone_surrogates_itself() -> None:
    # The server API's body comes as bytes; a str may hold a lone surrogate itself
    # (not its escape), which UTF-8 cannot spell: neither may raise instead.
    frame = '{"to": "bob", "message": "cut \\ud83d"}'
    truncated = msgspec.DecodeError("Input data was truncated")  # what msgspec says then
    detail = syntax_error(truncated, frame.encode())
    assert detail.startswith("JSON is malformed: \\ud83d is half of a UTF-16 surrogate pair")
    text = '{"to": "bob", "message": "\ud800" '
    assert syntax_error(truncated, text) == "Input data was truncated"


def test_a_whole_surrogate_pair_is_an_emoji() -> None:
    envelope = decode_envelope('{"to": "bob", "message": "\\ud83d\\ude00"}')
    assert msgspec.json.decode(bytes(envelope.message)) == "\U0001f600"


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param("[]", id="array"),
        pytest.param('"bob"', id="string"),
        pytest.param("null", id="null"),
        pytest.param("42", id="number"),
        pytest.param('{"message": 1}', id="missing-to"),
        pytest.param('{"to": "", "message": 1}', id="empty-to"),
        pytest.param('{"to": null, "message": 1}', id="null-to"),
        pytest.param('{"to": 7, "message": 1}', id="int-to"),
        pytest.param('{"to": ["bob"], "message": 1}', id="list-to"),
        pytest.param(json.dumps({"to": "i" * (MAX_ID_CHARS + 1), "message": 1}), id="long-to"),
        pytest.param(json.dumps({"to": "i" * 10_000, "message": 1}), id="10000-char-to"),
        pytest.param('{"to": "bob"}', id="missing-message"),
        pytest.param('{"to": "bob", "message": 1, "ref": true}', id="bool-ref"),
        pytest.param('{"to": "bob", "message": 1, "ref": 1.5}', id="float-ref"),
        pytest.param('{"to": "bob", "message": 1, "ref": 1.0}', id="integral-float-ref"),
        pytest.param('{"to": "bob", "message": 1, "ref": [1]}', id="list-ref"),
        pytest.param('{"to": "bob", "message": 1, "ref": {}}', id="object-ref"),
        pytest.param(
            json.dumps({"to": "bob", "message": 1, "ref": "r" * (MAX_REF_CHARS + 1)}),
            id="long-ref",
        ),
        pytest.param(
            json.dumps({"to": "bob", "message": 1, "ref": MAX_SAFE_INT + 1}), id="big-ref"
        ),
        pytest.param(
            json.dumps({"to": "bob", "message": 1, "ref": -MAX_SAFE_INT - 1}), id="small-ref"
        ),
    ],
)
def test_invalid_envelope(frame: str) -> None:
    error = envelope_error(frame)
    assert error.code is ErrorCode.INVALID_ENVELOPE
    assert error.ref is None
    assert error.detail


@pytest.mark.parametrize("ref", ["r-9", 9, 0, ""])
@pytest.mark.parametrize(
    "rest",
    [
        pytest.param({"to": "", "message": 1}, id="empty-to"),
        pytest.param({"to": 3, "message": 1}, id="int-to"),
        pytest.param({"to": "bob"}, id="missing-message"),
        pytest.param({"message": 1}, id="missing-to"),
    ],
)
def test_valid_ref_is_salvaged_from_invalid_envelope(
    ref: str | int, rest: dict[str, object]
) -> None:
    error = envelope_error(json.dumps({**rest, "ref": ref}))
    assert error.code is ErrorCode.INVALID_ENVELOPE
    assert error.ref == ref


def test_invalid_ref_is_not_salvaged() -> None:
    error = envelope_error('{"to": "", "message": 1, "ref": true}')
    assert (error.code, error.ref) == (ErrorCode.INVALID_ENVELOPE, None)


# --- decode_envelope: properties ---------------------------------------------


def decodes_or_refuses(frame: str) -> bool:
    """True if decoding gives an Envelope or raises EnvelopeError; anything else escapes."""
    try:
        return isinstance(decode_envelope(frame), Envelope)
    except EnvelopeError as error:
        return error.code in {ErrorCode.INVALID_JSON, ErrorCode.INVALID_ENVELOPE}


JSONISH = '{}[]":,. -0123456789tonmesagrfulTFE\\'


@given(st.text() | st.text(alphabet=JSONISH))
@example('{"to":"a","message":1,"ref":true}')
def test_any_text_decodes_or_raises_envelope_error(frame: str) -> None:
    assert decodes_or_refuses(frame)


@given(
    message=json_values,
    to=ids,
    ref=refs,
    sender=ids,
    ensure_ascii=st.booleans(),
)
def test_message_round_trips_through_both_dialects(
    message: JsonValue, to: str, ref: str | int | None, sender: str, ensure_ascii: bool
) -> None:
    frame = json.dumps({"to": to, "message": message, "ref": ref}, ensure_ascii=ensure_ascii)
    envelope = decode_envelope(frame)
    assert (envelope.to, envelope.ref) == (to, ref)

    v1 = json.loads(delivery_payload(Dialect.V1, sender, envelope.message))
    assert v1 == {"type": "message", "from": sender, "message": message}

    seed = delivery_payload(Dialect.SEED, sender, envelope.message)
    if isinstance(message, str):
        assert seed.decode() == message
    else:
        assert json.loads(seed) == message


# --- delivery frames -----------------------------------------------------------


def test_v1_delivery_copies_message_text_as_sent() -> None:
    envelope = decode_envelope('{"to": "bob", "message": { "n" : 1.50 }}')
    frame = delivery_payload(Dialect.V1, "alice", envelope.message)
    assert frame.endswith(b'"message":{ "n" : 1.50 }}')
    assert json.loads(frame) == {"type": "message", "from": "alice", "message": {"n": 1.5}}


@pytest.mark.parametrize(
    ("message", "seed_frame"),
    [
        ('"hi"', "hi"),
        ('"café ☃"', "café ☃"),
        ('""', ""),
        (r'"a\"b\\c\u00e9\n"', 'a"b\\cé\n'),
        ("[1, 2]", "[1, 2]"),
        ('{"k": "v"}', '{"k": "v"}'),
        ("3", "3"),
        ("null", "null"),
    ],
)
def test_seed_delivery(message: str, seed_frame: str) -> None:
    envelope = decode_envelope(f'{{"to": "bob", "message": {message}}}')
    assert delivery_payload(Dialect.SEED, "alice", envelope.message).decode() == seed_frame


# --- welcome, ack, error frames --------------------------------------------------


def test_seed_welcome_is_the_bare_id() -> None:
    assert welcome_payload(Dialect.SEED, "Zm9vYmFyYmF6cXV4cXV1eA") == b"Zm9vYmFyYmF6cXV4cXV1eA"


def test_v1_welcome() -> None:
    frame = welcome_payload(Dialect.V1, 'id "quoted"')
    assert json.loads(frame) == {"type": "welcome", "id": 'id "quoted"'}


@pytest.mark.parametrize("ref", ["r1", "", 0, 17, -MAX_SAFE_INT])
def test_v1_ack(ref: str | int) -> None:
    frame = ack_payload(Dialect.V1, ref)
    assert frame is not None
    assert json.loads(frame) == {"type": "ack", "ref": ref}


@pytest.mark.parametrize("ref", ["r1", 0])
def test_seed_has_no_ack(ref: str | int) -> None:
    assert ack_payload(Dialect.SEED, ref) is None


@pytest.mark.parametrize("code", list(ErrorCode))
@pytest.mark.parametrize(
    ("dialect", "ref", "expected"),
    [
        (Dialect.SEED, None, {}),
        (Dialect.SEED, "r1", {"ref": "r1"}),
        (Dialect.SEED, 0, {"ref": 0}),
        (Dialect.SEED, "", {"ref": ""}),
        (Dialect.V1, None, {"type": "error", "ref": None}),
        (Dialect.V1, "r1", {"type": "error", "ref": "r1"}),
        (Dialect.V1, 0, {"type": "error", "ref": 0}),
    ],
)
def test_error_payload(
    code: ErrorCode, dialect: Dialect, ref: str | int | None, expected: dict[str, object]
) -> None:
    frame = error_payload(dialect, code, "what went wrong", ref)
    assert json.loads(frame) == {"error": code.value, "detail": "what went wrong", **expected}


# --- dialect choice -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "dialect"),
    [
        ([], Dialect.SEED),
        (["chat"], Dialect.SEED),
        (["relayd.v2"], Dialect.SEED),
        (["relayd.v1"], Dialect.V1),
        (["chat", "relayd.v1"], Dialect.V1),
        (("relayd.v1", "chat"), Dialect.V1),
    ],
)
def test_choose_dialect(offered: list[str], dialect: Dialect) -> None:
    assert choose_dialect(offered) is dialect


def test_dialect_values_are_the_subprotocol_names() -> None:
    assert (Dialect.SEED.value, Dialect.V1.value) == ("seed", "relayd.v1")


# --- what the sender is told ------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code", "detail"),
    [
        # The captured examples of docs/protocol.md, "Connecting".
        pytest.param(
            "hello from client",
            ErrorCode.INVALID_JSON,
            "JSON is malformed: invalid character (byte 0)",
            id="not-json",
        ),
        pytest.param(
            "{bad",
            ErrorCode.INVALID_JSON,
            "JSON is malformed: object keys must be strings (byte 1)",
            id="bad-key",
        ),
        pytest.param(
            '{"to": "laTLJKA4qbtfI9B5gOVycA", "ref": "c-3"}',
            ErrorCode.INVALID_ENVELOPE,
            "Object missing required field `message`",
            id="missing-message",
        ),
        pytest.param(
            "[" * 100_000, ErrorCode.INVALID_JSON, "JSON is nested too deeply", id="too-deep"
        ),
        # Wrong in shape and then cut short: the syntax error is the one reported.
        pytest.param(
            '{"to": 5, "message": 1', ErrorCode.INVALID_JSON, "Input data was truncated", id="cut"
        ),
    ],
)
def test_the_sender_is_told_what_is_wrong_with_its_frame(
    frame: str, code: ErrorCode, detail: str
) -> None:
    error = envelope_error(frame)
    assert (error.code, error.detail) == (code, detail)


# --- the values themselves --------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        decode_envelope('{"to": "bob", "message": 1}'),
        Welcome("id-1"),
        Delivery("id-1", msgspec.Raw(b"1")),
        Ack("r"),
        Error("unknown_recipient", "r", "no client with that id is connected"),
        SeedError("unknown_recipient", "no client with that id is connected"),
    ],
    ids=lambda value: type(value).__name__,
)
def test_messages_are_immutable_values(value: object) -> None:
    # Decoded once and shared (a delivery goes to every connection of an id).
    field = next(iter(type(value).__struct_fields__))  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        setattr(value, field, "changed")


def test_a_v1_error_without_detail_reads_as_an_empty_detail() -> None:
    decoder = msgspec.json.Decoder(ServerMessage)
    error = decoder.decode(b'{"type": "error", "error": "rate_limited", "ref": null}')
    assert error == Error("rate_limited", None, "")


def test_a_seed_message_that_only_looks_like_an_error_is_not_one() -> None:
    # Seed messages are any JSON a client sent; one with keys beyond an error's
    # is a message, and `relayd chat` must show it as one.
    decoder = msgspec.json.Decoder(SeedError)
    assert decoder.decode(b'{"error": "e", "detail": "d"}') == SeedError("e", "d")
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(b'{"error": "e", "detail": "d", "from": "mallory"}')

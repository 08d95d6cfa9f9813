"""Tests for relayd.wire.frames: client bytes in, messages out; server frames out. No sockets.

Client frames are built with :func:`tests.wire.frame` (masked, with a random
key) or, where the key matters, with :func:`keyed` (a key the test chooses).
Server frames are read back with :func:`tests.wire.server_frames`. Property
tests check what the examples cannot: that any split of a valid byte stream
parses to the same messages, and that no input makes :meth:`FrameParser.feed`
do anything but return messages or raise :class:`ProtocolError`.
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import re
import sys
import tracemalloc
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relayd.errors import ProtocolError
from relayd.wire import masking
from relayd.wire.frames import (
    MAX_HELD_RAW_BYTES,
    NO_STATUS,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    VALID_CLOSE_CODES,
    FrameParser,
    parse_close,
)
from relayd.wire.masking import unmask, unmask_in_python
from relayd.wire.server_frames import close_frame, encode_frame, text_frame
from tests.wire import frame, server_frames

MAX = 1 << 20
#: Close codes RFC 6455 §7.4 and the IANA registry let a client send, written
#: out independently of relayd's own table.
CLIENT_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1014), *range(3000, 5000)})
#: The largest frame header: 2 bytes, an 8-byte length, a 4-byte mask key.
MAX_HEADER_BYTES = 14

Message = tuple[int, bytes]


def keyed(opcode: int, payload: bytes, key: bytes, *, fin: bool = True) -> bytes:
    """A client frame masked with ``key`` (``tests.wire.frame`` picks a random one)."""
    plain = frame(opcode, payload, fin=fin, mask=False)
    head = plain[: len(plain) - len(payload)]
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head[:1] + bytes([head[1] | 0x80]) + head[2:] + key + masked


def parse(data: bytes, max_message_bytes: int = MAX) -> list[Message]:
    return FrameParser(max_message_bytes).feed(data)


def parse_chunks(chunks: Iterable[bytes], max_message_bytes: int = MAX) -> list[Message]:
    parser = FrameParser(max_message_bytes)
    out: list[Message] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def violation(data: bytes, max_message_bytes: int = MAX) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(data, max_message_bytes)
    return info.value


def fragments(opcode: int, pieces: Sequence[bytes]) -> bytes:
    """A message sent as ``pieces``: ``opcode`` first, continuations after, FIN on the last."""
    last = len(pieces) - 1
    return b"".join(
        frame(opcode if i == 0 else OP_CONTINUATION, piece, fin=i == last)
        for i, piece in enumerate(pieces)
    )


# --- valid frames -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "length_byte"),
    [
        pytest.param(0, 0, id="0-bytes"),
        pytest.param(1, 1, id="1-byte"),
        pytest.param(125, 125, id="125-bytes-7-bit"),
        pytest.param(126, 126, id="126-bytes-16-bit"),
        pytest.param(65535, 126, id="65535-bytes-16-bit"),
        pytest.param(65536, 127, id="65536-bytes-64-bit"),
    ],
)
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_every_length_encoding_is_parsed(opcode: int, size: int, length_byte: int) -> None:
    payload = bytes(i % 26 + 97 for i in range(size))
    data = frame(opcode, payload)
    assert data[1] & 0x7F == length_byte  # the case exercises the encoding it names
    assert parse(data) == [(opcode, payload)]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_every_length_encoding_parses_when_split_inside_its_header(size: int) -> None:
    payload = b"x" * size
    data = frame(OP_BINARY, payload)
    for cut in range(1, MAX_HEADER_BYTES + 1):
        assert parse_chunks([data[:cut], data[cut:]]) == [(OP_BINARY, payload)], cut


@pytest.mark.parametrize(
    "key",
    [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x02\x03\x04", b"\x80\x00\x00\x01"],
)
@pytest.mark.parametrize("size", range(10))
def test_payload_is_unmasked_with_its_key(key: bytes, size: int) -> None:
    payload = bytes(range(0xF0, 0xF0 + size))
    assert parse(keyed(OP_BINARY, payload, key)) == [(OP_BINARY, payload)]


@given(payload=st.binary(max_size=300), key=st.binary(min_size=4, max_size=4))
def test_masking_round_trips_for_any_key_and_payload(payload: bytes, key: bytes) -> None:
    assert parse(keyed(OP_BINARY, payload, key)) == [(OP_BINARY, payload)]


def test_without_websockets_c_extension_frames_are_unmasked_in_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # websockets built without its C extension: masking.py loaded afresh, apart
    # from the module relayd uses, with the extension's import failing.
    monkeypatch.setitem(sys.modules, "websockets.speedups", None)
    spec = importlib.util.spec_from_file_location("masking_without_c", masking.__file__)
    assert spec is not None
    assert spec.loader is not None
    fallback = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fallback)
    assert fallback.unmask is fallback.unmask_in_python
    assert fallback.unmask(b"\x01\x02\x03\x04\x05", b"\xff\x00\xff\x00") == b"\xfe\x02\xfc\x04\xfa"


@given(payload=st.binary(max_size=300), key=st.binary(min_size=4, max_size=4))
def test_both_unmasks_xor_each_byte_with_its_byte_of_the_key(payload: bytes, key: bytes) -> None:
    # The parser uses websockets' C unmask, or the Python one where that is missing.
    expected = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
    assert unmask(payload, key) == expected
    assert unmask_in_python(payload, key) == expected
    assert unmask_in_python(bytearray(payload), bytearray(key)) == expected


def test_many_frames_in_one_feed_come_out_in_order() -> None:
    data = b"".join(
        [
            frame(OP_TEXT, b"one"),
            frame(OP_BINARY, b"\x00\x01"),
            frame(OP_PING, b"p"),
            frame(OP_TEXT, "två".encode()),
            frame(OP_PONG, b""),
            frame(OP_BINARY, b"b" * 300),
            frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye"),
        ]
    )
    assert parse(data) == [
        (OP_TEXT, b"one"),
        (OP_BINARY, b"\x00\x01"),
        (OP_PING, b"p"),
        (OP_TEXT, "två".encode()),
        (OP_PONG, b""),
        (OP_BINARY, b"b" * 300),
        (OP_CLOSE, b"\x03\xe8bye"),
    ]


def test_close_frame_payload_is_passed_on_whole() -> None:
    payload = (1001).to_bytes(2, "big") + "au revoir ✓".encode()
    assert parse(frame(OP_CLOSE, payload)) == [(OP_CLOSE, payload)]


def test_empty_feed_returns_nothing() -> None:
    parser = FrameParser(MAX)
    assert parser.feed(b"") == []
    assert parser.buffered == 0


def test_feed_accepts_a_bytearray() -> None:
    assert FrameParser(MAX).feed(bytearray(frame(OP_TEXT, b"hi"))) == [(OP_TEXT, b"hi")]


@pytest.mark.parametrize("cut", [1, 3, 5])  # inside the next frame's 6-byte header
def test_a_bytearray_fed_with_a_frame_cut_short_is_kept_as_it_was_given(cut: int) -> None:
    # The tail is copied for the next feed, never taken out of the caller's buffer.
    parser = FrameParser(MAX)
    whole = frame(OP_TEXT, b"one") + frame(OP_TEXT, b"two")
    given = bytearray(whole[: len(whole) - len(frame(OP_TEXT, b"two")) + cut])
    copy = bytes(given)
    assert parser.feed(given) == [(OP_TEXT, b"one")]
    assert given == copy
    assert parser.buffered == cut
    assert parser.feed(whole[len(copy) :]) == [(OP_TEXT, b"two")]
    assert parser.buffered == 0


def _bytearrays_held(parser: FrameParser) -> list[object]:
    return [o for o in gc.get_referents(parser) if isinstance(o, bytearray)]


def test_a_parser_with_nothing_held_holds_no_bytearray() -> None:
    # An idle connection's parser: its memory is part of every idle connection's.
    parser = FrameParser(MAX)
    assert _bytearrays_held(parser) == []
    assert parser.feed(frame(OP_TEXT, b"whole")) == [(OP_TEXT, b"whole")]
    assert _bytearrays_held(parser) == []
    data = frame(OP_TEXT, b"one") + frame(OP_TEXT, b"two", fin=False)
    data += frame(OP_CONTINUATION, b"!")
    for cut in (len(data) - 2, len(data) - 9):  # in a header; in a fragmented message
        assert parser.feed(data[:cut])
        assert _bytearrays_held(parser)
        assert parser.feed(data[cut:])
        assert _bytearrays_held(parser) == []


def test_incomplete_frame_is_buffered_then_completed() -> None:
    parser = FrameParser(MAX)
    data = frame(OP_BINARY, b"z" * 1000)
    assert parser.feed(data[:600]) == []
    assert parser.buffered == 600 - 8  # the payload so far, unmasked; not its 8-byte header
    assert parser.feed(data[600:]) == [(OP_BINARY, b"z" * 1000)]
    assert parser.buffered == 0


# A stream with every kind of frame, each length class below 65536, and a
# fragmented text message with control frames inside and a character split
# across its fragments.
MIXED_STREAM = b"".join(
    [
        frame(OP_TEXT, b"hello"),
        frame(OP_BINARY, b""),
        frame(OP_PING, b"ping!"),
        frame(OP_TEXT, b"caf\xc3", fin=False),
        frame(OP_PONG, b"pong"),
        frame(OP_CONTINUATION, b"\xa9 au lait", fin=False),
        frame(OP_PING, b""),
        frame(OP_CONTINUATION, b"!"),
        frame(OP_BINARY, bytes(range(256)) * 2),
        frame(OP_CLOSE, (1000).to_bytes(2, "big")),
    ]
)
MIXED_MESSAGES = [
    (OP_TEXT, b"hello"),
    (OP_BINARY, b""),
    (OP_PING, b"ping!"),
    (OP_PONG, b"pong"),
    (OP_PING, b""),
    (OP_TEXT, "café au lait!".encode()),
    (OP_BINARY, bytes(range(256)) * 2),
    (OP_CLOSE, b"\x03\xe8"),
]


def test_mixed_stream_parses_whole() -> None:
    assert parse(MIXED_STREAM) == MIXED_MESSAGES


def test_mixed_stream_split_at_every_byte_boundary_parses_the_same() -> None:
    for cut in range(len(MIXED_STREAM) + 1):
        chunks = [MIXED_STREAM[:cut], MIXED_STREAM[cut:]]
        assert parse_chunks(chunks) == MIXED_MESSAGES, cut


def test_mixed_stream_fed_byte_by_byte_parses_the_same() -> None:
    parser = FrameParser(MAX)
    out: list[Message] = []
    for i in range(len(MIXED_STREAM)):
        out += parser.feed(MIXED_STREAM[i : i + 1])
        assert parser.buffered <= i + 1
    assert out == MIXED_MESSAGES
    assert parser.buffered == 0


@st.composite
def valid_streams(draw: st.DrawFn) -> tuple[bytes, list[Message]]:
    """Bytes of valid client frames, and the messages they carry."""
    data: list[bytes] = []
    messages: list[Message] = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from([OP_TEXT, OP_BINARY, OP_PING, OP_PONG, OP_CLOSE]))
        key = draw(st.binary(min_size=4, max_size=4))
        if kind in (OP_PING, OP_PONG):
            payload = draw(st.binary(max_size=125))
        elif kind == OP_CLOSE:
            code = draw(st.sampled_from(sorted(CLIENT_CLOSE_CODES)))
            payload = code.to_bytes(2, "big") + draw(st.text(max_size=20)).encode()
        else:
            if kind == OP_TEXT:
                payload = draw(st.text(max_size=80)).encode()
            else:
                payload = draw(st.binary(max_size=400))
            # Fragment at any byte, even inside a UTF-8 character; a ping may
            # come between any two fragments.
            cuts = draw(st.lists(st.integers(0, len(payload)), max_size=4))
            pieces = split_at(payload, cuts)
            for i, piece in enumerate(pieces):
                opcode = kind if i == 0 else OP_CONTINUATION
                data.append(keyed(opcode, piece, key, fin=i == len(pieces) - 1))
                if i < len(pieces) - 1 and draw(st.booleans()):
                    ping = draw(st.binary(max_size=10))
                    data.append(keyed(OP_PING, ping, key))
                    messages.append((OP_PING, ping))
            messages.append((kind, payload))
            continue
        data.append(keyed(kind, payload, key))
        messages.append((kind, payload))
    return b"".join(data), messages


@settings(max_examples=200)
@given(stream=valid_streams(), data=st.data())
def test_any_split_of_a_valid_stream_yields_the_same_messages(
    stream: tuple[bytes, list[Message]], data: st.DataObject
) -> None:
    raw, messages = stream
    assert parse(raw) == messages
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12), label="cuts")
    assert parse_chunks(split_at(raw, cuts)) == messages


# --- fragmentation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opcode", "pieces"),
    [
        pytest.param(OP_TEXT, [b"hel", b"lo ", b"world"], id="text-3"),
        pytest.param(OP_TEXT, [b"", b"x", b""], id="text-empty-fragments"),
        pytest.param(OP_BINARY, [b"\x00\xff", b"\x10" * 200, b"\x01"], id="binary-3"),
        pytest.param(OP_BINARY, [b"a" * 70000, b"b" * 126], id="binary-64-bit-fragment"),
        pytest.param(OP_TEXT, [b"only"], id="text-1-final"),
    ],
)
def test_fragments_are_joined_into_one_message(opcode: int, pieces: list[bytes]) -> None:
    assert parse(fragments(opcode, pieces)) == [(opcode, b"".join(pieces))]


def test_control_frames_inside_a_fragmented_message_come_out_before_it() -> None:
    data = b"".join(
        [
            frame(OP_BINARY, b"part1-", fin=False),
            frame(OP_PING, b"are you there"),
            frame(OP_CONTINUATION, b"part2-", fin=False),
            frame(OP_PONG, b"yes"),
            frame(OP_CONTINUATION, b"part3"),
            frame(OP_TEXT, b"next"),
        ]
    )
    assert parse(data) == [
        (OP_PING, b"are you there"),
        (OP_PONG, b"yes"),
        (OP_BINARY, b"part1-part2-part3"),
        (OP_TEXT, b"next"),
    ]


def test_fragmented_message_is_held_until_its_last_fragment() -> None:
    parser = FrameParser(MAX)
    assert parser.feed(frame(OP_TEXT, b"abc", fin=False)) == []
    assert parser.buffered == 3
    assert parser.feed(frame(OP_CONTINUATION, b"def", fin=False)) == []
    assert parser.buffered == 6
    assert parser.feed(frame(OP_CONTINUATION, b"g")) == [(OP_TEXT, b"abcdefg")]
    assert parser.buffered == 0


def test_a_new_message_may_start_after_a_fragmented_one_ends() -> None:
    data = fragments(OP_TEXT, [b"a", b"b"]) + fragments(OP_BINARY, [b"c", b"d"])
    assert parse(data) == [(OP_TEXT, b"ab"), (OP_BINARY, b"cd")]


@pytest.mark.parametrize(
    ("text", "cuts"),
    [
        pytest.param("café", [4], id="2-byte-char-across-2"),
        pytest.param("€uro", [1, 2], id="3-byte-char-across-3"),
        pytest.param("a😀b", [2, 3, 4], id="4-byte-char-across-4"),
        pytest.param("日本語", [1, 4, 8], id="several-chars-split"),
    ],
)
def test_utf8_character_split_across_fragments_is_valid(text: str, cuts: list[int]) -> None:
    payload = text.encode()
    assert parse(fragments(OP_TEXT, split_at(payload, cuts))) == [(OP_TEXT, payload)]


# --- violations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(frame(OP_TEXT, b"hi", mask=False), id="unmasked-text"),
        pytest.param(frame(OP_PING, b"", mask=False), id="unmasked-ping"),
        pytest.param(frame(OP_TEXT, b"hi", rsv=0b100), id="rsv1"),
        pytest.param(frame(OP_TEXT, b"hi", rsv=0b010), id="rsv2"),
        pytest.param(frame(OP_TEXT, b"hi", rsv=0b001), id="rsv3"),
        pytest.param(frame(OP_PING, b"", rsv=0b111), id="all-rsv-on-control"),
        *(pytest.param(frame(op, b"x"), id=f"reserved-opcode-{op}") for op in range(3, 8)),
        *(pytest.param(frame(op, b""), id=f"reserved-opcode-{op}") for op in range(11, 16)),
        pytest.param(frame(OP_CONTINUATION, b"x"), id="continuation-with-no-message"),
        pytest.param(
            fragments(OP_TEXT, [b"a", b"b"]) + frame(OP_CONTINUATION, b"c"),
            id="continuation-after-message-ended",
        ),
        pytest.param(
            frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"),
            id="text-while-fragmented-text-open",
        ),
        pytest.param(
            frame(OP_BINARY, b"a", fin=False) + frame(OP_TEXT, b"b", fin=False),
            id="text-while-fragmented-binary-open",
        ),
        pytest.param(
            frame(OP_TEXT, b"a", fin=False) + frame(OP_BINARY, b"b"),
            id="binary-while-fragmented-text-open",
        ),
        pytest.param(frame(OP_PING, b"x", fin=False), id="fragmented-ping"),
        pytest.param(frame(OP_PONG, b"x", fin=False), id="fragmented-pong"),
        pytest.param(frame(OP_CLOSE, b"\x03\xe8", fin=False), id="fragmented-close"),
        pytest.param(frame(OP_PING, b"x" * 126), id="ping-126-bytes"),
        pytest.param(frame(OP_PONG, b"x" * 126), id="pong-126-bytes"),
        pytest.param(frame(OP_CLOSE, b"\x03\xe8" + b"x" * 124), id="close-126-bytes"),
        pytest.param(frame(OP_PING, b"", length=1 << 16), id="ping-64-bit-length"),
        pytest.param(frame(OP_BINARY, b"", length=1 << 63), id="64-bit-length-top-bit"),
        pytest.param(frame(OP_BINARY, b"", length=(1 << 64) - 1), id="64-bit-length-all-ones"),
        pytest.param(frame(OP_CLOSE, b"\x03"), id="close-1-byte"),
        pytest.param(frame(OP_CLOSE, b"\x03\xedbad code"), id="close-code-1005"),
    ],
)
def test_protocol_violation_closes_with_1002(data: bytes) -> None:
    error = violation(data)
    assert error.code == 1002
    assert 0 < len(error.reason.encode()) <= 123


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(frame(OP_TEXT, b"\xff"), id="0xff"),
        pytest.param(frame(OP_TEXT, b"abc\xc3"), id="truncated-2-byte-char"),
        pytest.param(frame(OP_TEXT, b"\xc0\xaf"), id="overlong-slash"),
        pytest.param(frame(OP_TEXT, b"\xed\xa0\x80"), id="utf16-surrogate"),
        pytest.param(frame(OP_TEXT, b"\xf4\x90\x80\x80"), id="above-u10ffff"),
        pytest.param(frame(OP_TEXT, b"a\x80b"), id="lone-continuation-byte"),
        pytest.param(fragments(OP_TEXT, [b"ok", b"\xff", b"ok"]), id="fragment-0xff"),
        pytest.param(fragments(OP_TEXT, [b"caf\xc3", b""]), id="char-cut-by-final-fragment"),
        pytest.param(fragments(OP_TEXT, [b"\xed", b"\xa0\x80"]), id="surrogate-across-fragments"),
        pytest.param(frame(OP_CLOSE, b"\x03\xe8\xff"), id="close-reason"),
        pytest.param(frame(OP_CLOSE, b"\x03\xe8caf\xc3"), id="close-reason-truncated-char"),
    ],
)
def test_invalid_utf8_closes_with_1007(data: bytes) -> None:
    error = violation(data)
    assert error.code == 1007
    assert error.parsed == []


def test_invalid_utf8_in_a_first_fragment_fails_before_the_message_ends() -> None:
    parser = FrameParser(MAX)
    with pytest.raises(ProtocolError) as info:
        parser.feed(frame(OP_TEXT, b"ok\xffok", fin=False))
    assert info.value.code == 1007


def test_invalid_utf8_in_a_binary_message_is_fine() -> None:
    assert parse(fragments(OP_BINARY, [b"\xff", b"\xc3"])) == [(OP_BINARY, b"\xff\xc3")]


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_message_of_exactly_max_message_bytes_is_accepted(opcode: int) -> None:
    assert parse(frame(opcode, b"m" * 1000), 1000) == [(opcode, b"m" * 1000)]
    assert parse(fragments(opcode, [b"m" * 400, b"m" * 600]), 1000) == [(opcode, b"m" * 1000)]


@pytest.mark.parametrize(("size", "length_byte"), [(101, 101), (1001, 126), (70000, 127)], ids=str)
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_single_frame_over_max_message_bytes_closes_with_1009_from_its_header(
    opcode: int, size: int, length_byte: int
) -> None:
    limit = size - 1
    data = frame(opcode, b"", length=size)
    assert data[1] & 0x7F == length_byte
    parser = FrameParser(limit)
    # The header alone: no mask key, no payload.
    with pytest.raises(ProtocolError) as info:
        parser.feed(data[: len(data) - 4])
    assert info.value.code == 1009
    assert parser.buffered <= MAX_HEADER_BYTES


def test_huge_declared_length_closes_with_1009_without_buffering_a_payload() -> None:
    parser = FrameParser(MAX)
    header = frame(OP_BINARY, b"", length=(1 << 63) - 1)[:10]  # up to the length, no key
    with pytest.raises(ProtocolError) as info:
        parser.feed(header)
    assert info.value.code == 1009
    assert parser.buffered <= MAX_HEADER_BYTES


def test_huge_declared_length_split_across_feeds_closes_with_1009_when_the_length_arrives() -> None:
    parser = FrameParser(MAX)
    header = frame(OP_BINARY, b"", length=(1 << 63) - 1)
    for i in range(9):
        assert parser.feed(header[i : i + 1]) == []
    with pytest.raises(ProtocolError) as info:
        parser.feed(header[9:10])
    assert info.value.code == 1009
    assert parser.buffered <= MAX_HEADER_BYTES


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_fragments_adding_up_past_max_message_bytes_close_with_1009_from_the_header(
    opcode: int,
) -> None:
    parser = FrameParser(1000)
    assert parser.feed(frame(opcode, b"a" * 600, fin=False)) == []
    assert parser.feed(frame(OP_CONTINUATION, b"b" * 300, fin=False)) == []
    too_many = frame(OP_CONTINUATION, b"", length=101)
    with pytest.raises(ProtocolError) as info:
        parser.feed(too_many[:2])
    assert info.value.code == 1009
    assert parser.buffered <= 900 + MAX_HEADER_BYTES


def test_control_frame_inside_a_message_at_its_limit_is_not_counted() -> None:
    data = b"".join(
        [
            frame(OP_BINARY, b"a" * 10, fin=False),
            frame(OP_PING, b"p" * 125),
            frame(OP_CONTINUATION, b"b" * 10),
        ]
    )
    assert parse(data, 20) == [(OP_PING, b"p" * 125), (OP_BINARY, b"a" * 10 + b"b" * 10)]


def test_control_frame_over_125_bytes_is_refused_from_its_header() -> None:
    parser = FrameParser(MAX)
    with pytest.raises(ProtocolError) as info:
        parser.feed(frame(OP_PING, b"", length=126)[:4])
    assert info.value.code == 1002
    assert parser.buffered <= MAX_HEADER_BYTES


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        pytest.param(frame(OP_TEXT, b"hi", mask=False), 1002, id="1002"),
        pytest.param(frame(OP_TEXT, b"\xff"), 1007, id="1007"),
        pytest.param(frame(OP_BINARY, b"", length=MAX + 1)[:10], 1009, id="1009"),
    ],
)
def test_parsed_holds_the_messages_before_the_violation_in_the_same_feed(
    bad: bytes, code: int
) -> None:
    before = fragments(OP_TEXT, [b"a", b"b"]) + frame(OP_PING, b"p") + frame(OP_BINARY, b"c")
    error = violation(before + bad + frame(OP_TEXT, b"after"))
    assert error.code == code
    assert error.parsed == [(OP_TEXT, b"ab"), (OP_PING, b"p"), (OP_BINARY, b"c")]


def test_parsed_holds_only_what_the_failing_feed_completed() -> None:
    parser = FrameParser(MAX)
    second = frame(OP_TEXT, b"sec")
    assert parser.feed(frame(OP_TEXT, b"first") + second[:3]) == [(OP_TEXT, b"first")]
    with pytest.raises(ProtocolError) as info:
        parser.feed(second[3:] + frame(OP_CONTINUATION, b"x"))
    assert info.value.code == 1002
    assert info.value.parsed == [(OP_TEXT, b"sec")]


# --- close payloads -----------------------------------------------------------------------------


def test_empty_close_payload_reads_as_no_status() -> None:
    assert parse_close(b"") == (NO_STATUS, "")
    assert NO_STATUS == 1005
    assert parse(frame(OP_CLOSE, b"")) == [(OP_CLOSE, b"")]


def test_close_payload_of_one_byte_is_refused_with_1002() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_close(b"\x03")
    assert info.value.code == 1002


@pytest.mark.parametrize(
    "code", [0, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2000, 2999, 5000, 65535]
)
def test_close_code_a_client_may_not_send_is_refused_with_1002(code: int) -> None:
    payload = code.to_bytes(2, "big") + b"reason"
    with pytest.raises(ProtocolError) as info:
        parse_close(payload)
    assert info.value.code == 1002
    assert violation(frame(OP_CLOSE, payload)).code == 1002


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 3000, 4000, 4999]
)
def test_close_code_a_client_may_send_is_accepted(code: int) -> None:
    payload = code.to_bytes(2, "big") + "ciao ✓".encode()
    assert parse_close(payload) == (code, "ciao ✓")
    assert parse(frame(OP_CLOSE, payload)) == [(OP_CLOSE, payload)]


def close_refusal(payload: bytes) -> int | None:
    """The close code :func:`parse_close` refuses ``payload`` with, or None if it accepts it."""
    try:
        parse_close(payload)
    except ProtocolError as exc:
        return exc.code
    return None


def test_close_codes_accepted_are_exactly_those_a_client_may_send() -> None:
    refusals = {code: close_refusal(code.to_bytes(2, "big")) for code in range(1 << 16)}
    assert {code for code, refusal in refusals.items() if refusal is None} == CLIENT_CLOSE_CODES
    assert set(refusals.values()) == {None, 1002}
    assert VALID_CLOSE_CODES == CLIENT_CLOSE_CODES


def test_close_reason_that_is_not_utf8_is_refused_with_1007() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_close(b"\x03\xe8\xc3\x28")
    assert info.value.code == 1007


def test_close_code_without_reason_has_empty_reason() -> None:
    assert parse_close(b"\x0f\xa0") == (4000, "")


# --- any input ----------------------------------------------------------------------------------


@st.composite
def frame_like_bytes(draw: st.DrawFn) -> bytes:
    """Bytes that look like frames often enough to get past the first checks."""
    parts: list[bytes] = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            parts.append(draw(st.binary(max_size=20)))
            continue
        b0 = draw(st.sampled_from([0x00, 0x01, 0x02, 0x80, 0x81, 0x82, 0x88, 0x89, 0x8A]))
        b0 |= draw(st.sampled_from([0, 0, 0, 0, 0x10, 0x03]))
        length = draw(st.sampled_from([0, 1, 2, 5, 125, 126, 127]))
        mask_bit = draw(st.sampled_from([0x80, 0x80, 0x80, 0]))
        extended = b""
        if length == 126:
            extended = draw(st.integers(0, 300)).to_bytes(2, "big")
        elif length == 127:
            extended = draw(st.integers(0, (1 << 64) - 1)).to_bytes(8, "big")
        body = draw(st.binary(max_size=40))
        parts.append(bytes([b0, mask_bit | length]) + extended + body)
    return b"".join(parts)


@settings(max_examples=300)
@given(
    raw=st.binary(max_size=200) | frame_like_bytes(),
    cuts=st.lists(st.integers(0, 400), max_size=8),
    max_message_bytes=st.integers(0, 300),
)
@example(raw=b"\x82\xff" + b"\x7f" + b"\xff" * 7, cuts=[], max_message_bytes=100)
@example(raw=b"\x01\x80\x00\x00\x00\x00\x80\x80", cuts=[1], max_message_bytes=0)
def test_any_bytes_give_messages_or_a_protocol_error(
    raw: bytes, cuts: list[int], max_message_bytes: int
) -> None:
    parser = FrameParser(max_message_bytes)
    out: list[Message] = []
    error: ProtocolError | None = None
    for chunk in split_at(raw, [c for c in cuts if c <= len(raw)]):
        try:
            got = parser.feed(chunk)
        except ProtocolError as exc:
            error = exc
            break
        assert isinstance(got, list)
        out += got
        assert parser.buffered <= len(raw)
    if error is not None:
        assert error.code in (1002, 1007, 1009)
        assert isinstance(error.parsed, list)
        out += error.parsed
    for opcode, payload in out:
        assert opcode in (OP_TEXT, OP_BINARY, OP_PING, OP_PONG, OP_CLOSE)
        assert isinstance(payload, bytes)
        if opcode == OP_TEXT:
            payload.decode()
        elif opcode == OP_CLOSE:
            parse_close(payload)
        if opcode in (OP_TEXT, OP_BINARY):
            assert len(payload) <= max_message_bytes
        else:
            assert len(payload) <= 125


def outcome(chunks: Iterable[bytes], max_message_bytes: int) -> tuple[list[Message], int | None]:
    """Every message parsed from ``chunks``, and the close code if the parser refused them."""
    parser = FrameParser(max_message_bytes)
    out: list[Message] = []
    for chunk in chunks:
        try:
            out += parser.feed(chunk)
        except ProtocolError as exc:
            return out + exc.parsed, exc.code
    return out, None


@settings(max_examples=300)
@given(
    raw=st.binary(max_size=200) | frame_like_bytes(),
    cuts=st.lists(st.integers(0, 400), max_size=8),
    max_message_bytes=st.integers(0, 300),
)
def test_any_bytes_give_the_same_messages_and_error_however_they_are_split(
    raw: bytes, cuts: list[int], max_message_bytes: int
) -> None:
    chunks = split_at(raw, [c for c in cuts if c <= len(raw)])
    assert outcome(chunks, max_message_bytes) == outcome([raw], max_message_bytes)


def test_the_short_path_keeps_to_the_frame_budget_and_counts_every_frame() -> None:
    parser = FrameParser(MAX)
    with pytest.raises(ProtocolError) as info:
        parser.feed(frame(OP_TEXT, b"x"), max_frames=0)
    assert (info.value.code, info.value.parsed) == (1008, [])
    parser = FrameParser(MAX)
    assert parser.feed(frame(OP_TEXT, b"a") + frame(OP_TEXT, b"b"), max_frames=2) == [
        (OP_TEXT, b"a"),
        (OP_TEXT, b"b"),
    ]
    assert parser.feed(frame(OP_TEXT, b"c"), max_frames=1) == [(OP_TEXT, b"c")]
    assert parser.frames == 3


def test_a_header_held_from_the_last_read_is_finished_first() -> None:
    """Even when the next read begins with bytes that look like a short text frame."""
    # 81 81 | 80 00 00 00 | payload: past its first byte, a whole empty text frame
    data = keyed(OP_TEXT, b"a", b"\x80\x00\x00\x00")
    parser = FrameParser(MAX)
    assert parser.feed(data[:1]) == []  # 0x81 held
    assert parser.feed(data[1:]) == [(OP_TEXT, b"a")]


def test_frames_that_finish_a_held_header_count_against_the_budget() -> None:
    data = frame(OP_TEXT, b"a")
    parser = FrameParser(MAX)
    assert parser.feed(data[:1], max_frames=1) == []
    with pytest.raises(ProtocolError) as info:
        parser.feed(data[1:], max_frames=0)
    assert info.value.code == 1008


def feeds(
    parser: FrameParser, chunks: Iterable[bytes], budgets: Sequence[int]
) -> tuple[list[Message], tuple[int, str] | None, int, int]:
    """Everything ``parser`` says about ``chunks`` fed one by one, each within its frame budget."""
    out: list[Message] = []
    for chunk, budget in zip(chunks, itertools.cycle(budgets), strict=False):
        try:
            out += parser.feed(chunk, budget)
        except ProtocolError as exc:
            return out + exc.parsed, (exc.code, exc.reason), parser.frames, parser.buffered
    return out, None, parser.frames, parser.buffered


@settings(max_examples=300)
@given(
    raw=frame_like_bytes() | st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 400), max_size=8),
    budgets=st.lists(st.integers(0, 8), min_size=1, max_size=4),
    max_message_bytes=st.integers(0, 300),
)
@example(raw=frame(OP_TEXT, b"ab") * 3, cuts=[], budgets=[2], max_message_bytes=300)
@example(
    raw=frame(OP_TEXT, b"abc") + frame(OP_TEXT, b"\xff"), cuts=[], budgets=[8], max_message_bytes=9
)
def test_the_short_path_parses_as_the_general_loop_does(
    raw: bytes, cuts: list[int], budgets: list[int], max_message_bytes: int
) -> None:
    """Whole short text frames take feed's short path: the same messages, errors and counts."""
    chunks = split_at(raw, [c for c in cuts if c <= len(raw)])
    general = FrameParser(max_message_bytes)
    general._short_top = 0  # no second header byte is this low: never the short path
    assert feeds(FrameParser(max_message_bytes), chunks, budgets) == feeds(general, chunks, budgets)


# --- encoders -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "header"),
    [
        pytest.param(0, b"\x81\x00", id="0"),
        pytest.param(125, b"\x81\x7d", id="125"),
        pytest.param(126, b"\x81\x7e\x00\x7e", id="126"),
        pytest.param(65535, b"\x81\x7e\xff\xff", id="65535"),
        pytest.param(65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00", id="65536"),
    ],
)
def test_text_frame_header_for_each_length_class(size: int, header: bytes) -> None:
    payload = b"t" * size
    assert text_frame(payload) == header + payload
    assert encode_frame(OP_TEXT, payload) == header + payload
    assert server_frames(text_frame(payload), after_head=False) == [(OP_TEXT, payload)]


@pytest.mark.parametrize(
    ("size", "header"),
    [
        pytest.param(0, b"\x82\x00", id="0"),
        pytest.param(125, b"\x82\x7d", id="125"),
        pytest.param(126, b"\x82\x7e\x00\x7e", id="126"),
        pytest.param(65535, b"\x82\x7e\xff\xff", id="65535"),
        pytest.param(65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00", id="65536"),
    ],
)
def test_encode_frame_header_for_each_length_class(size: int, header: bytes) -> None:
    payload = bytes(size)
    assert encode_frame(OP_BINARY, payload) == header + payload


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_encode_frame_control_frames_are_final_and_unmasked(opcode: int) -> None:
    assert encode_frame(opcode, b"abc") == bytes([0x80 | opcode, 3]) + b"abc"


def test_close_frame_carries_code_and_reason() -> None:
    assert close_frame(1000, "bye") == b"\x88\x05\x03\xe8bye"
    assert close_frame(1013) == b"\x88\x02\x03\xf5"


def test_close_frame_without_a_code_has_an_empty_payload() -> None:
    assert close_frame(None) == b"\x88\x00"
    assert close_frame(None, "ignored") == b"\x88\x00"


def test_close_frame_cuts_a_long_ascii_reason_to_fit_125_bytes() -> None:
    ((opcode, payload),) = server_frames(close_frame(1001, "r" * 500), after_head=False)
    assert opcode == OP_CLOSE
    assert payload == b"\x03\xe9" + b"r" * 123


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_close_frame_cuts_a_long_reason_on_a_character_boundary(char: str) -> None:
    ((_, payload),) = server_frames(close_frame(1011, char * 100), after_head=False)
    width = len(char.encode())
    assert payload == b"\x03\xf3" + (char * (123 // width)).encode()


@given(code=st.sampled_from(sorted(CLIENT_CLOSE_CODES)), reason=st.text(max_size=200))
def test_close_frame_reason_is_the_longest_prefix_that_fits(code: int, reason: str) -> None:
    data = close_frame(code, reason)
    ((opcode, payload),) = server_frames(data, after_head=False)
    assert opcode == OP_CLOSE
    assert len(payload) <= 125
    assert data[:2] == bytes([0x88, len(payload)])
    got_code, got_reason = parse_close(payload)
    assert got_code == code
    assert reason.startswith(got_reason)
    if got_reason != reason:  # cut: the next character would not have fit
        assert len((got_reason + reason[len(got_reason)]).encode()) > 123


@given(
    opcode=st.sampled_from([OP_TEXT, OP_BINARY, OP_PING, OP_PONG, OP_CLOSE]),
    payload=st.binary(max_size=300)
    | st.sampled_from([125, 126, 65535, 65536]).map(lambda n: b"\xab" * n),
)
def test_encoded_frames_read_back_as_sent(opcode: int, payload: bytes) -> None:
    assert server_frames(encode_frame(opcode, payload), after_head=False) == [(opcode, payload)]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_server_frames_are_unmasked_so_a_frame_parser_refuses_them(size: int) -> None:
    data = text_frame(b"s" * size)
    assert not data[1] & 0x80
    assert violation(data).code == 1002


# --- memory and pacing --------------------------------------------------------------------------

#: What a parser may hold beyond its buffers, measured by tracemalloc: its incremental
#: UTF-8 decoder, the masking key it keeps, a small object or two.
OBJECT_SLACK_BYTES = 2048


def held_while_feeding(parser: FrameParser, chunks: Sequence[bytes], limit: int) -> int:
    """Feed all but the last chunk; the most memory allocated meanwhile and still held.

    ``tracemalloc`` counts real allocations; the chunks are built before it
    starts, so what it sees is the parser's (and the short-lived lists it
    returns). The parser's own count, :attr:`FrameParser.buffered`, must stay
    within the promise after every feed.
    """
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        most = 0
        for chunk in chunks[:-1]:
            assert parser.feed(chunk) == []
            most = max(most, tracemalloc.get_traced_memory()[0] - baseline)
            assert parser.buffered <= limit + MAX_HELD_RAW_BYTES
    finally:
        tracemalloc.stop()
    return most


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_a_message_in_65535_one_byte_fragments_holds_no_more_than_the_message() -> None:
    # Kept as a list of 65,535 bytes objects, this held 3.9 MiB (issue 8).
    limit, opcode = 65536, OP_TEXT
    data = fragments(opcode, [b"a"] * (limit - 1))
    parser = FrameParser(limit)
    chunks = split_every(data, 65536)
    held = held_while_feeding(parser, chunks, limit)
    assert held <= limit + OBJECT_SLACK_BYTES, held
    assert parser.feed(chunks[-1]) == [(opcode, b"a" * (limit - 1))]
    assert parser.buffered == 0


def test_50000_empty_continuation_frames_hold_nothing() -> None:
    # 10 million of them grew relayd by 77 MiB (issue 8): each was kept.
    count = 50_000
    data = frame(OP_TEXT, b"", fin=False) + frame(OP_CONTINUATION, b"", fin=False) * count
    parser = FrameParser(65536)
    chunks = split_every(data, 65536)
    assert held_while_feeding(parser, chunks, 65536) <= OBJECT_SLACK_BYTES
    assert parser.buffered <= MAX_HELD_RAW_BYTES
    assert parser.frames > count - 65536 // 6


@settings(max_examples=40, deadline=None)
@given(
    limit=st.integers(1, 200_000),
    share=st.floats(0.5, 1.0),
    pieces=st.integers(1, 300),
    reads=st.integers(1, 100),
    opcode=st.sampled_from([OP_TEXT, OP_BINARY]),
)
def test_a_parser_holds_at_most_max_message_bytes_however_a_message_is_cut(
    limit: int, share: float, pieces: int, reads: int, opcode: int
) -> None:
    """Any fragments, any reads: the parser's own count and real memory both stay bound."""
    size = max(1, int(limit * share))
    body = "é".encode() * (size // 2) + b"z" * (size % 2)
    data = fragments(opcode, split_every(body, -(-size // pieces)))
    parser = FrameParser(limit)
    chunks = split_every(data, -(-len(data) // reads))
    held = held_while_feeding(parser, chunks, limit)
    assert held <= limit + MAX_HELD_RAW_BYTES + OBJECT_SLACK_BYTES, (held, limit)
    assert parser.feed(chunks[-1]) == [(opcode, body)]


def test_frames_past_the_budget_close_with_1008_before_they_are_parsed() -> None:
    data = frame(OP_TEXT, b"one") + frame(OP_PING, b"") + frame(OP_TEXT, b"three")
    parser = FrameParser(MAX)
    with pytest.raises(ProtocolError) as info:
        parser.feed(data, max_frames=2)
    assert (info.value.code, info.value.reason) == (1008, "too many frames")
    assert info.value.parsed == [(OP_TEXT, b"one"), (OP_PING, b"")]
    assert parser.frames == 2


def test_the_frame_budget_counts_frames_not_messages_or_reads() -> None:
    parser = FrameParser(MAX)
    message = fragments(OP_TEXT, [b"a", b"b", b"c"])  # three frames of 7 bytes
    assert parser.feed(message[:6], max_frames=1) == []  # a header and key: the frame counts
    assert parser.frames == 1
    assert parser.feed(message[6:9], max_frames=0) == []  # its payload, half a header
    assert parser.feed(message[9:], max_frames=2) == [(OP_TEXT, b"abc")]
    assert parser.frames == 3
    with pytest.raises(ProtocolError) as info:
        parser.feed(frame(OP_PONG, b""), max_frames=0)
    assert info.value.code == 1008


# --- what the client is told --------------------------------------------------------------------

#: Every violation and the close code and reason relayd sends for it, as
#: docs/security.md ("Protocol violations") documents them.
DOCUMENTED_VIOLATIONS = [
    pytest.param(
        frame(OP_TEXT, b"x", mask=False), 1002, "client frames must be masked", id="unmasked"
    ),
    pytest.param(
        frame(OP_TEXT, b"x", rsv=4), 1002, "reserved bits set (no extension agreed)", id="rsv1"
    ),
    pytest.param(frame(0x3, b""), 1002, "unknown opcode 3", id="opcode-3"),
    pytest.param(frame(0xB, b""), 1002, "unknown opcode 11", id="opcode-11"),
    pytest.param(frame(OP_PING, b"", fin=False), 1002, "fragmented control frame", id="frag-ping"),
    pytest.param(
        frame(OP_PING, b"x" * 126), 1002, "control frame over 125 bytes", id="ping-126-bytes"
    ),
    pytest.param(
        frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"),
        1002,
        "new message before the last one ended",
        id="new-message-inside-one",
    ),
    pytest.param(
        frame(OP_CONTINUATION, b"a"), 1002, "continuation frame with no message", id="lone-cont"
    ),
    pytest.param(
        frame(OP_BINARY, b"", length=1 << 63),
        1002,
        "frame length has its top bit set",
        id="64-bit-top-bit",
    ),
    pytest.param(
        frame(OP_CLOSE, b"\x03"), 1002, "close frame with a 1-byte payload", id="close-1-byte"
    ),
    pytest.param(
        frame(OP_CLOSE, b"\x03\xed"), 1002, "close frame with invalid code 1005", id="close-1005"
    ),
    pytest.param(
        frame(OP_TEXT, b"\xff"),
        1007,
        "invalid UTF-8 in a text message: invalid start byte",
        id="utf8-frame",
    ),
    pytest.param(
        fragments(OP_TEXT, [b"ok", b"\xff"]),
        1007,
        "invalid UTF-8 in a text message: invalid start byte",
        id="utf8-fragment",
    ),
    pytest.param(
        frame(OP_CLOSE, b"\x03\xe8\xff"),
        1007,
        "invalid UTF-8 in a close reason: invalid start byte",
        id="utf8-close-reason",
    ),
    pytest.param(frame(OP_TEXT, b"m" * 1001), 1009, "message over 1000 bytes", id="1009-frame"),
    pytest.param(
        fragments(OP_BINARY, [b"m" * 600, b"m" * 401]),
        1009,
        "message over 1000 bytes",
        id="1009-fragments",
    ),
]


@pytest.mark.parametrize(("data", "code", "reason"), DOCUMENTED_VIOLATIONS)
def test_each_violation_closes_with_its_documented_code_and_reason(
    data: bytes, code: int, reason: str
) -> None:
    error = violation(data, 1000)
    assert (error.code, error.reason) == (code, reason)


def test_security_md_lists_exactly_the_violations_tested_here() -> None:
    # Its "Protocol violations" table: one row per kind, numbers as captured (an opcode,
    # a close code, the limit); "too many frames" is the pacing's, tested above.
    text = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
    section = text.partition("\n## Protocol violations\n")[2].partition("\n## ")[0]
    rows = re.findall(r"^\| [^|]+ \| (\d{4}) \| `([^`]+)`", section, re.MULTILINE)

    def kind(code: object, reason: object) -> tuple[int, str]:
        return int(str(code)), re.sub(r"\d+", "N", str(reason))

    tested = {kind(*param.values[1:]) for param in DOCUMENTED_VIOLATIONS}
    assert {kind(*row) for row in rows} == tested | {(1008, "too many frames")}


def test_a_64_bit_length_split_after_another_frame_waits_for_its_last_byte() -> None:
    # Nine of the ten header bytes hold a length whose top bit is set: the
    # parser must wait for the tenth, not judge the length from the first seven.
    parser = FrameParser(MAX)
    header = frame(OP_BINARY, b"", length=1 << 63)[:10]
    assert parser.feed(frame(OP_TEXT, b"hi") + header[:9]) == [(OP_TEXT, b"hi")]
    with pytest.raises(ProtocolError) as info:
        parser.feed(header[9:])
    assert (info.value.code, info.value.reason) == (1002, "frame length has its top bit set")


@pytest.mark.parametrize(
    ("number", "payload", "opcode"),
    [
        (0x1, b"t", OP_TEXT),
        (0x2, b"b", OP_BINARY),
        (0x8, b"\x03\xe8", OP_CLOSE),
        (0x9, b"p", OP_PING),
        (0xA, b"p", OP_PONG),
    ],
)
def test_frames_come_out_under_the_opcode_names_of_rfc_6455(
    number: int, payload: bytes, opcode: int
) -> None:
    # RFC 6455 §5.2 numbers, written out: the connection tells a ping from a pong
    # by these names, so each must be the number on the wire.
    assert parse(frame(number, payload)) == [(opcode, payload)]
    assert opcode == number


def test_a_continuation_is_opcode_0() -> None:
    assert OP_CONTINUATION == 0x0
    assert parse(frame(OP_TEXT, b"a", fin=False) + frame(0x0, b"b")) == [(OP_TEXT, b"ab")]


@pytest.mark.parametrize("cut", [7, 8, 12])
def test_a_close_frame_split_inside_its_payload_is_checked_whole(cut: int) -> None:
    data = frame(OP_CLOSE, b"\x03\xe8" + b"bye now")
    parser = FrameParser(MAX)
    assert parser.feed(data[:cut]) == []
    assert parser.feed(data[cut:]) == [(OP_CLOSE, b"\x03\xe8bye now")]
    bad = frame(OP_CLOSE, b"\x03\xed" + b"bye now")  # 1005 may not be sent
    parser = FrameParser(MAX)
    assert parser.feed(bad[:cut]) == []
    with pytest.raises(ProtocolError) as info:
        parser.feed(bad[cut:])
    assert (info.value.code, info.value.reason) == (1002, "close frame with invalid code 1005")


def test_a_message_whose_last_fragment_fits_the_room_already_made_is_exact() -> None:
    # The second fragment grows the buffer by an eighth; the third fits in it.
    data = fragments(OP_BINARY, [b"a" * 100, b"b" * 5, b"c"])
    assert parse(data) == [(OP_BINARY, b"a" * 100 + b"b" * 5 + b"c")]


def test_the_documented_bound_beyond_the_message_is_139_bytes() -> None:
    # docs/security.md: a parser holds at most M + 139 bytes (the largest
    # header, 14 bytes, or a control frame, 125 bytes of payload).
    assert MAX_HELD_RAW_BYTES == 139
    parser = FrameParser(MAX)
    ping = frame(OP_PING, b"p" * 125)
    assert parser.feed(ping[:-1]) == []
    assert parser.buffered <= 139

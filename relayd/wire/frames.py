"""RFC 6455 framing for the server side, without I/O: client bytes in, messages out.

relayd's hot path reads many small frames per ``receive_some`` and writes many
per ``send_all``, so framing is done here, in one tight loop per read, rather
than one event object per frame (what a general-purpose library does). A run
of whole text frames of at most 125 bytes, what chat clients send, takes a
short path with the fewest checks, and the general loop takes over at the
first frame that is anything else. Nothing
here touches a socket or trio; ``tests/test_frames.py`` checks it byte by byte
and with hypothesis, and the Autobahn|Testsuite run (``tests/conformance``)
checks it against the RFC.

:class:`FrameParser` takes what a client sends after the handshake and returns
complete messages and control frames as ``(opcode, payload)`` pairs:

* ``(OP_TEXT, payload)``: a whole text message (fragments joined); ``payload``
  is its bytes, already checked to be valid UTF-8;
* ``(OP_BINARY, payload)``: a whole binary message;
* ``(OP_PING, payload)`` and ``(OP_PONG, payload)``;
* ``(OP_CLOSE, payload)``: the close frame's payload, already checked;
  :func:`parse_close` reads its code and reason.

Anything that breaks the protocol raises :class:`ProtocolError`, which carries
the close code to answer with: 1002 (an unmasked frame, reserved bits, an
unknown opcode, a bad fragment sequence or control frame, a bad close payload),
1007 (invalid UTF-8 in a text message or close reason, found as it arrives),
1008 (more frames than the budget the caller gave), 1009 (a message over
``max_message_bytes``, refused from its header alone, before its payload is
read or buffered). The error carries the messages completed before the
violation in the same read (:attr:`ProtocolError.parsed`), so they are served
before the close. After an error the parser must not be fed again.

Memory: what a parser holds between feeds is at most ``max_message_bytes``
plus :data:`MAX_HELD_RAW_BYTES` (139), however a message is fragmented or its
frames are split across reads: the message being collected lives in one
buffer that the parser allocates itself (a payload is unmasked into it as it
arrives; fragments are never kept as a list of objects), and only a header or
a control frame waits in raw form. It never buffers a frame it is going to
refuse.

Pacing: :meth:`FrameParser.feed` takes the number of frames the connection
may still send (its frame budget, :class:`relayd.policy.ratelimit.FramePacer`);
the frame past it is refused with 1008 ``too many frames`` before it is
parsed, so a flood of empty frames or tiny fragments costs a bounded amount of
work per read and is closed.

The frames a server writes are built in :mod:`relayd.wire.server_frames`; a
payload is unmasked by :mod:`relayd.wire.masking`.
"""

from __future__ import annotations

import codecs
from typing import Final

from relayd.errors import CloseCode, ProtocolError
from relayd.wire.masking import unmask

__all__ = [
    "MAX_HELD_RAW_BYTES",
    "NO_STATUS",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "UNLIMITED",
    "VALID_CLOSE_CODES",
    "FrameParser",
    "parse_close",
]

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

_FIN: Final = 0x80
_RSV: Final = 0x70
_MASKED: Final = 0x80
#: The first byte of a whole (unfragmented) text frame, without extensions.
_FIN_TEXT: Final = _FIN | OP_TEXT
#: The largest payload length that fits the 7-bit length field.
_MAX_SHORT_LENGTH: Final = 125
#: A control frame's payload is at most 125 bytes (RFC 6455 §5.5).
_MAX_CONTROL_PAYLOAD: Final = 125

#: Close codes a client may send (RFC 6455 §7.4, and the IANA registry up to
#: 1013); 1004-1006 and 1015 are reserved or never sent on the wire.
VALID_CLOSE_CODES: Final = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, *range(3000, 5000)}
)
#: RFC 6455 §7.1.5: a close frame without a code is reported as 1005.
NO_STATUS: Final[int] = CloseCode.NO_STATUS

_PROTOCOL_ERROR: Final = CloseCode.PROTOCOL_ERROR
_POLICY: Final = CloseCode.POLICY
_INVALID_DATA: Final = CloseCode.INVALID_DATA
_TOO_BIG: Final = CloseCode.TOO_BIG

_new_utf8_decoder: Final = codecs.getincrementaldecoder("utf-8")

#: ``max_frames`` for a parser that is not paced.
UNLIMITED: Final = 1 << 62
#: The most raw bytes a parser keeps between feeds: an incomplete header
#: (up to 14 bytes) or an incomplete control frame (14 + 125).
MAX_HELD_RAW_BYTES: Final = 14 + _MAX_CONTROL_PAYLOAD
#: The close reason when a connection sends frames faster than it may.
_TOO_MANY_FRAMES: Final = "too many frames"


def _check_utf8(payload: bytes) -> None:
    # isascii() is one C pass with no allocation; most JSON is ASCII.
    if not payload.isascii():
        try:
            payload.decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError(
                _INVALID_DATA, f"invalid UTF-8 in a text message: {exc.reason}"
            ) from None


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame's payload.

    Returns:
        ``(1005, "")`` for an empty payload (RFC 6455 §7.1.5), else the code
        and the reason text.

    Raises:
        ProtocolError: 1002 for a 1-byte payload or a code a client may not
            send, 1007 for a reason that is not UTF-8.
    """
    if not payload:
        return NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError(_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code not in VALID_CLOSE_CODES:
        raise ProtocolError(_PROTOCOL_ERROR, f"close frame with invalid code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            _INVALID_DATA, f"invalid UTF-8 in a close reason: {exc.reason}"
        ) from None
    return code, reason


class FrameParser:
    """Turns a client's byte stream into messages and control frames.

    Args:
        max_message_bytes: the largest message accepted, in bytes, whole
            (all fragments together); a larger one raises 1009.

    Attributes:
        frames: how many frames it has parsed so far (a frame counts once
            its header is read and its payload begins), for pacing.
    """

    __slots__ = (
        "_buffer",
        "_final",
        "_mask",
        "_max",
        "_message",
        "_message_op",
        "_remaining",
        "_short_top",
        "_size",
        "_utf8",
        "frames",
    )

    def __init__(self, max_message_bytes: int) -> None:
        self._max = max_message_bytes
        # The highest second header byte of a masked frame with a 7-bit length
        # that is within the limit: such frames take feed's short path.
        self._short_top = _MASKED + min(max_message_bytes, _MAX_SHORT_LENGTH)
        # An incomplete header, or an incomplete control frame: at most
        # MAX_HELD_RAW_BYTES. A data frame's payload never waits here. While
        # nothing is held, both buffers are the empty bytes: an idle
        # connection's parser holds no bytearray (56 bytes each).
        self._buffer: bytes | bytearray = b""
        self._message_op = 0  # OP_TEXT/OP_BINARY while a message is being collected
        # The message being collected (fragments, or a frame still arriving),
        # unmasked, in its first _size bytes; allocated by this parser, never
        # past max_message_bytes (see _collect).
        self._message: bytes | bytearray = b""
        self._size = 0
        self._utf8: codecs.IncrementalDecoder | None = None  # for a text message
        # A data frame whose payload is still arriving:
        self._remaining = 0  # its payload bytes still to come
        self._mask = b""  # its masking key, turned to where the next byte falls
        self._final = False  # its FIN bit
        self.frames = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame or message, as allocated.

        At most ``max_message_bytes`` plus :data:`MAX_HELD_RAW_BYTES`,
        however the message is fragmented or its frames are split.
        """
        return len(self._buffer) + len(self._message)

    def feed(self, data: bytes | bytearray, max_frames: int = UNLIMITED) -> list[tuple[int, bytes]]:
        """Parse ``data``, the next bytes from the client.

        Args:
            data: the bytes.
            max_frames: how many frames ``data`` may begin; one more raises
                1008 before it is parsed (the connection's frame pacing).

        Returns:
            The messages and control frames completed by ``data``, in order.

        Raises:
            ProtocolError: the client broke the protocol or sent frames too
                fast; the connection must be closed. Its ``parsed`` holds what
                came before the violation.
        """
        out: list[tuple[int, bytes]] = []
        try:
            if self._remaining or self._buffer or self._message_op:
                self._parse(data, out, max_frames, 0)
                return out
            # The common case, a run of whole, short, unfragmented text frames
            # with nothing held from the last read, is taken here with the
            # fewest checks; the general loop takes over at the first frame
            # that is anything else (and raises, or keeps, exactly as if it had
            # parsed everything).
            n = len(data)
            last = n - 6  # where the last short frame's header (with its mask) may start
            i = counted = 0
            top = self._short_top
            try:
                while i <= last and counted != max_frames:
                    b1 = data[i + 1]
                    if data[i] != _FIN_TEXT or b1 < _MASKED or b1 > top:
                        break
                    start = i + 6
                    end = start + b1 - _MASKED
                    if end > n:
                        break
                    counted += 1
                    payload = unmask(data[start:end], data[i + 2 : start])
                    if not payload.isascii():
                        _check_utf8(payload)
                    out.append((OP_TEXT, payload))
                    i = end
            finally:
                self.frames += counted
            if i < n:
                self._parse(data, out, max_frames - counted, i)
        except ProtocolError as exc:
            exc.parsed = out
            raise
        return out

    def _parse(
        self, data: bytes | bytearray, out: list[tuple[int, bytes]], allowed: int, i: int
    ) -> None:
        """Parse ``data`` from its byte ``i``, within ``allowed`` more frames; any case."""
        if self._remaining:  # the rest of a data frame comes first
            i = self._rest_of_frame(data, out)
            if self._remaining:
                return
        if self._buffer:
            self._buffer += memoryview(data)[i:]
            buf: bytes | bytearray = self._buffer
            i = 0
        else:
            buf = data
        n = len(buf)
        counted = 0
        try:
            while n - i >= 2:
                b0, b1 = buf[i], buf[i + 1]
                if b0 & _RSV:
                    raise ProtocolError(_PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
                if not b1 & _MASKED:
                    raise ProtocolError(_PROTOCOL_ERROR, "client frames must be masked")
                opcode = b0 & 0x0F
                length = b1 & 0x7F
                if length < 126:
                    start = i + 6
                elif length == 126:
                    if n - i < 4:
                        break
                    length = buf[i + 2] << 8 | buf[i + 3]
                    start = i + 8
                else:
                    if n - i < 10:
                        break
                    length = int.from_bytes(buf[i + 2 : i + 10], "big")
                    start = i + 14
                    if length >> 63:
                        raise ProtocolError(_PROTOCOL_ERROR, "frame length has its top bit set")
                # Every check that needs only the header is made before the
                # payload arrives, so a refused frame is never buffered.
                fin = b0 & _FIN
                if opcode >= OP_CLOSE:
                    if opcode > OP_PONG:
                        raise ProtocolError(_PROTOCOL_ERROR, f"unknown opcode {opcode}")
                    if not fin:
                        raise ProtocolError(_PROTOCOL_ERROR, "fragmented control frame")
                    if length > _MAX_CONTROL_PAYLOAD:
                        raise ProtocolError(_PROTOCOL_ERROR, "control frame over 125 bytes")
                elif opcode == OP_CONTINUATION:
                    if not self._message_op:
                        raise ProtocolError(_PROTOCOL_ERROR, "continuation frame with no message")
                    if self._size + length > self._max:
                        raise ProtocolError(_TOO_BIG, f"message over {self._max} bytes")
                elif opcode > OP_BINARY:
                    raise ProtocolError(_PROTOCOL_ERROR, f"unknown opcode {opcode}")
                elif self._message_op:
                    raise ProtocolError(_PROTOCOL_ERROR, "new message before the last one ended")
                elif length > self._max:
                    raise ProtocolError(_TOO_BIG, f"message over {self._max} bytes")
                end = start + length
                if end > n and (opcode >= OP_CLOSE or start > n):
                    break  # kept whole: a header, or a control frame
                if counted == allowed:
                    raise ProtocolError(_POLICY, _TOO_MANY_FRAMES)
                counted += 1
                mask = buf[start - 4 : start]
                if end > n:
                    # A data frame whose payload is still arriving: what is
                    # here joins the message, unmasked; the rest follows.
                    self._begin_frame(opcode, fin, end - n, mask, n - start)
                    self._collect(unmask(buf[start:n], mask), out)
                    i = n
                    break
                payload = unmask(buf[start:end], mask)
                i = end
                if opcode == OP_TEXT and fin:
                    _check_utf8(payload)
                    out.append((OP_TEXT, payload))
                elif opcode >= OP_CLOSE or (opcode == OP_BINARY and fin):
                    if opcode == OP_CLOSE:
                        parse_close(payload)
                    out.append((opcode, payload))
                else:
                    self._begin_frame(opcode, fin, 0, mask, 0)
                    self._collect(payload, out)
        finally:
            self.frames += counted
        self._keep(buf, i)

    def _begin_frame(
        self, opcode: int, fin: int, remaining: int, mask: bytes | bytearray, done: int
    ) -> None:
        """Start collecting a data frame: ``done`` payload bytes in, ``remaining`` to come."""
        if opcode != OP_CONTINUATION:  # the first frame of a message
            self._message_op = opcode
            self._utf8 = _new_utf8_decoder() if opcode == OP_TEXT else None
        self._final = bool(fin)
        self._remaining = remaining
        if remaining:
            turn = done & 3  # the key applies from the payload's first byte
            self._mask = bytes(mask[turn:] + mask[:turn])

    def _rest_of_frame(self, data: bytes | bytearray, out: list[tuple[int, bytes]]) -> int:
        """Collect the next part of a frame's payload from ``data``; the bytes taken."""
        take = min(self._remaining, len(data))
        mask = self._mask
        chunk = unmask(data if take == len(data) else data[:take], mask)
        turn = take & 3
        self._mask = mask[turn:] + mask[:turn]
        self._remaining -= take
        self._collect(chunk, out)
        return take

    def _collect(self, chunk: bytes, out: list[tuple[int, bytes]]) -> None:
        """Add ``chunk`` to the message; hand the message out when its last byte is in."""
        done = self._final and not self._remaining
        utf8 = self._utf8
        # Text is checked as it arrives, so invalid text fails at once; ASCII
        # with no character left open cannot be invalid, so it is not decoded.
        if utf8 is not None and not (chunk.isascii() and not utf8.getstate()[0]):
            try:
                utf8.decode(chunk, done)
            except UnicodeDecodeError as exc:
                raise ProtocolError(
                    _INVALID_DATA, f"invalid UTF-8 in a text message: {exc.reason}"
                ) from None
        held, size = self._size, self._size + len(chunk)
        message = self._message
        # Between messages _message is b"", which takes no slice assignment:
        # a bytearray is made first, even for an empty chunk.
        if size > len(message) or not isinstance(message, bytearray):
            # Grown by an eighth at least, as CPython's bytearray grows
            # (amortised copying, and never much more held than received), but
            # never past the message's known end or the limit: this allocation
            # is what bounds the parser's memory.
            limit = size + self._remaining if self._final else self._max
            grown = bytearray(min(limit, max(size, len(message) + (len(message) >> 3))))
            grown[:held] = memoryview(message)[:held]
            self._message = message = grown
        message[held:size] = chunk
        self._size = size
        if done:
            whole = bytes(message) if size == len(message) else bytes(memoryview(message)[:size])
            out.append((self._message_op, whole))
            self._message_op, self._message, self._size, self._utf8 = 0, b"", 0, None

    def _keep(self, buf: bytes | bytearray, i: int) -> None:
        # Keep the incomplete tail (a header or a control frame) for the next
        # feed; the common case (every frame complete, nothing held before)
        # allocates nothing.
        if i >= len(buf):
            self._buffer = b""
        elif buf is self._buffer and isinstance(buf, bytearray):
            del buf[:i]
        else:
            self._buffer = bytearray(buf[i:])

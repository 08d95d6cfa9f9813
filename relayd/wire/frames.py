"""RFC 6455 framing for the server side, without I/O: client bytes in, messages out.

relayd's hot path reads many small frames per ``receive_some`` and writes many
per ``send_all``, so framing is done here, in one tight loop per read, rather
than one event object per frame (what a general-purpose library does). Nothing
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
1007 (invalid UTF-8 in a text message or close reason), 1009 (a message over
``max_message_bytes``, refused from its header alone, before its payload is
read or buffered). The error carries the messages completed before the
violation in the same read (:attr:`ProtocolError.parsed`), so they are served
before the close. After an error the parser must not be fed again.

Memory: the parser holds at most one incomplete frame plus the fragments of
one incomplete message, each bounded by ``max_message_bytes`` (plus a 14-byte
header), and never buffers a frame it is going to refuse.

The encoders build unmasked server frames (RFC 6455 §5.1: servers never mask).
"""

from __future__ import annotations

import codecs
from typing import Final

from relayd.errors import CloseCode, ProtocolError

__all__ = [
    "NO_STATUS",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "VALID_CLOSE_CODES",
    "FrameParser",
    "close_frame",
    "encode_frame",
    "parse_close",
    "text_frame",
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
#: A control frame's payload is at most 125 bytes (RFC 6455 §5.5).
_MAX_CONTROL_PAYLOAD: Final = 125
#: The close reason fits in a control frame after its 2-byte code.
_MAX_CLOSE_REASON: Final = _MAX_CONTROL_PAYLOAD - 2

#: Close codes a client may send (RFC 6455 §7.4, and the IANA registry up to
#: 1013); 1004-1006 and 1015 are reserved or never sent on the wire.
VALID_CLOSE_CODES: Final = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, *range(3000, 5000)}
)
#: RFC 6455 §7.1.5: a close frame without a code is reported as 1005.
NO_STATUS: Final[int] = CloseCode.NO_STATUS

_PROTOCOL_ERROR: Final = CloseCode.PROTOCOL_ERROR
_INVALID_DATA: Final = CloseCode.INVALID_DATA
_TOO_BIG: Final = CloseCode.TOO_BIG

_new_utf8_decoder: Final = codecs.getincrementaldecoder("utf-8")


def _unmask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    # XOR as one big integer: a few C-level passes over the payload instead of
    # a Python-level loop over its bytes.
    n = len(payload)
    if not n:
        return b""
    key = (mask * ((n + 3) >> 2))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


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
    """

    __slots__ = ("_buffer", "_fragments", "_max", "_message_op", "_size", "_utf8")

    def __init__(self, max_message_bytes: int) -> None:
        self._max = max_message_bytes
        self._buffer = bytearray()  # an incomplete frame, from earlier reads
        self._message_op = 0  # OP_TEXT/OP_BINARY while a fragmented message is open
        self._fragments: list[bytes] = []
        self._size = 0  # bytes in _fragments
        self._utf8: codecs.IncrementalDecoder | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame or message."""
        return len(self._buffer) + self._size

    def feed(self, data: bytes | bytearray) -> list[tuple[int, bytes]]:
        """Parse ``data``, the next bytes from the client.

        Returns:
            The messages and control frames completed by ``data``, in order.

        Raises:
            ProtocolError: the client broke the protocol; the connection must
                be closed. Its ``parsed`` holds what came before the violation.
        """
        out: list[tuple[int, bytes]] = []
        try:
            self._parse(data, out)
        except ProtocolError as exc:
            exc.parsed = out
            raise
        return out

    def _parse(self, data: bytes | bytearray, out: list[tuple[int, bytes]]) -> None:
        if self._buffer:
            self._buffer += data
            buf: bytes | bytearray = self._buffer
        else:
            buf = data
        i, n = 0, len(buf)
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
            if end > n:
                break
            payload = _unmask(buf[start:end], buf[start - 4 : start])
            i = end
            if opcode == OP_TEXT and fin:
                _check_utf8(payload)
                out.append((OP_TEXT, payload))
            elif opcode >= OP_CLOSE or (opcode == OP_BINARY and fin):
                if opcode == OP_CLOSE:
                    parse_close(payload)
                out.append((opcode, payload))
            else:
                message = self._fragment(opcode, payload, fin)
                if message is not None:
                    out.append(message)
        self._keep(buf, i)

    def _fragment(self, opcode: int, payload: bytes, fin: int) -> tuple[int, bytes] | None:
        if opcode != OP_CONTINUATION:  # the first fragment
            self._message_op = opcode
            self._utf8 = _new_utf8_decoder() if opcode == OP_TEXT else None
        if self._utf8 is not None:
            # Fragment by fragment, so invalid text fails as soon as it arrives.
            try:
                self._utf8.decode(payload, final=bool(fin))
            except UnicodeDecodeError as exc:
                raise ProtocolError(
                    _INVALID_DATA, f"invalid UTF-8 in a text message: {exc.reason}"
                ) from None
        self._fragments.append(payload)
        self._size += len(payload)
        if not fin:
            return None
        message = (self._message_op, b"".join(self._fragments))
        self._message_op, self._fragments, self._size, self._utf8 = 0, [], 0, None
        return message

    def _keep(self, buf: bytes | bytearray, i: int) -> None:
        # Keep the incomplete tail for the next feed; the common case (every
        # frame complete, nothing held before) allocates nothing.
        if buf is self._buffer:
            del self._buffer[:i]
        elif i < len(buf):
            self._buffer = bytearray(buf[i:])


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One unfragmented, unmasked server frame."""
    n = len(payload)
    if n < 126:
        head = bytes((_FIN | opcode, n))
    elif n < 65536:
        head = bytes((_FIN | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((_FIN | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


_TEXT_HEADS: Final = tuple(bytes((_FIN | OP_TEXT, n)) for n in range(126))


def text_frame(payload: bytes) -> bytes:
    """A server text frame holding ``payload`` (UTF-8); the hot path's encoder."""
    n = len(payload)
    if n < 126:
        return _TEXT_HEADS[n] + payload
    return encode_frame(OP_TEXT, payload)


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A server close frame; ``reason`` is cut (on a character boundary) to fit.

    Args:
        code: the close code, or None for a close frame with no payload.
        reason: the human-readable reason.
    """
    if code is None:
        return encode_frame(OP_CLOSE, b"")
    data = reason.encode()
    if len(data) > _MAX_CLOSE_REASON:
        data = data[:_MAX_CLOSE_REASON].decode(errors="ignore").encode()
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + data)

"""The frames a server writes, without I/O: unfragmented and unmasked (RFC 6455 §5.1).

:func:`text_frame` is the hot path's encoder (every relayed message is one);
:func:`close_frame` cuts a reason to fit a control frame; :func:`encode_frame`
builds any other. Client frames are parsed by :mod:`relayd.wire.frames`.
"""

from __future__ import annotations

from typing import Final

from relayd.wire.frames import OP_CLOSE, OP_TEXT

__all__ = ["close_frame", "encode_frame", "text_frame"]

#: The header bit of a message's final (here: only) frame (RFC 6455 §5.2).
_FIN: Final = 0x80
#: A control frame's payload is at most 125 bytes (RFC 6455 §5.5): the close
#: reason has what its 2-byte code leaves.
_MAX_CLOSE_REASON: Final = 125 - 2


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

"""Raw WebSocket bytes for tests that must send what no well-behaved client would.

Only what the tests need: an HTTP upgrade request and client frames (masked,
as RFC 6455 requires of clients, unless a test asks otherwise).
"""

from __future__ import annotations

import base64
import os
import struct

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8


def upgrade_request(
    host: str = "127.0.0.1",
    *,
    path: str = "/",
    extra: list[tuple[str, str]] | None = None,
    version: str = "13",
) -> bytes:
    """An HTTP/1.1 WebSocket upgrade request."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        f"Sec-WebSocket-Version: {version}",
        *(f"{name}: {value}" for name, value in extra or []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """One frame; ``length`` overrides the declared payload length."""
    declared = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if mask else 0
    if declared < 126:
        head += bytes([mask_bit | declared])
    elif declared < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", declared)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", declared)
    if not mask:
        return head + payload
    key = os.urandom(4)
    size = len(payload)
    # XOR as one big integer: fast enough for multi-megabyte payloads.
    keystream = (key * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(
        size, "big"
    )
    return head + key + masked


def server_frames(data: bytes, *, after_head: bool = True) -> list[tuple[int, bytes]]:
    """The complete frames in a server's byte stream (after its HTTP response head).

    Server frames are unmasked (RFC 6455 §5.1); a frame cut short at the end
    of ``data`` is left out. Returns ``(opcode, payload)`` pairs in order.
    """
    i = data.find(b"\r\n\r\n") + 4 if after_head else 0
    frames = []
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if length == 126:
            length, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif length == 127:
            length, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        if i + length > len(data):
            break
        frames.append((opcode, data[i : i + length]))
        i += length
    return frames


def close_code(data: bytes) -> int | None:
    """The code of the first close frame in a server's byte stream, if it sent one."""
    for opcode, payload in server_frames(data):
        if opcode == OP_CLOSE:
            return int.from_bytes(payload[:2], "big")
    return None


def text_of(frame: bytes) -> str:
    """The text of one encoded server text frame, checking that it is exactly one."""
    ((opcode, payload),) = server_frames(frame, after_head=False)
    assert opcode == OP_TEXT, frame
    return payload.decode()

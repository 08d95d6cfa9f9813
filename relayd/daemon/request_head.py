"""A handshake's HTTP request head, read off an accepted stream within its bounds.

:class:`HeadReading` reads each request head for the gate
(:class:`~relayd.daemon.gate.Gate`): at most ``max_header_bytes`` long
(:class:`~relayd.wire.handshake.RequestReader`), whole within
``handshake_timeout_s``, and validated as a WebSocket upgrade
(:func:`~relayd.wire.handshake.validate`). Bytes the client sent after the head
(its first frames, in the same TCP segment) come back with the request, for the
connection to parse.

A drain (:meth:`HeadReading.drain`) cuts every wait for a head short, and the
client is then refused with 503.

Error handling: nothing raises but cancellation and bugs. What the client did
wrong is a :class:`~relayd.wire.handshake.Refusal` to answer; a client that left
or broke the stream is a reason to log, with nobody left to answer. The gate
answers and logs; this module only reads.
"""

from __future__ import annotations

import enum
from typing import Final

import trio

from relayd.config import LimitsSettings
from relayd.daemon.transport import Transport
from relayd.policy.admission import SHUTTING_DOWN
from relayd.wire.handshake import Refusal, RequestReader, UpgradeRequest, validate

__all__ = ["HeadReading"]

#: Bytes asked of the socket per read while the request head is incomplete: a
#: head is small, and a large read would only hold more early frames.
_HEAD_READ_BYTES: Final = 16384
#: Why there is no request, when the client is gone: the reasons logged.
_BROKE: Final = "the connection broke before a complete request"
_LEFT: Final = "the client closed before a complete request"


class HeadReading:
    """The request heads being read, all cut short by a drain.

    Attributes:
        draining: set by :meth:`drain`; a head not read whole by then is refused with 503.
    """

    __slots__ = ("_waiting", "draining")

    def __init__(self) -> None:
        self._waiting: set[trio.CancelScope] = set()  # heads not yet read in full
        self.draining = False

    def drain(self) -> None:
        """Stop every wait for a head, now and from now on."""
        self.draining = True
        for waiting in self._waiting:
            waiting.cancel()

    async def read(
        self, transport: Transport, limits: LimitsSettings
    ) -> tuple[UpgradeRequest, bytes] | Refusal | str:
        """The request and the bytes after it; else a refusal to answer, or why the client is gone.

        Waits for the request's bytes within ``handshake_timeout_s`` (408), or
        until a drain (503).
        """
        reader = RequestReader(limits.max_header_bytes)
        # Usually the whole request is there by the time the stream is served:
        # read without a wait, and without the timeout's cancel scope.
        first = transport.read_nowait(_HEAD_READ_BYTES)
        read = _MORE if first is None else _feed(reader, first)
        if read is not _MORE:
            return read
        with trio.move_on_after(limits.handshake_timeout_s) as waiting:
            self._waiting.add(waiting)  # drain() stops the wait too
            try:
                while read is _MORE:
                    try:
                        data = await transport.receive_some(_HEAD_READ_BYTES)
                    except trio.BrokenResourceError:  # reset, or a failed TLS handshake
                        return _BROKE
                    read = _feed(reader, data)
            finally:
                self._waiting.discard(waiting)
        if waiting.cancelled_caught:
            if self.draining:
                return SHUTTING_DOWN
            return Refusal(408, "no complete request within handshake_timeout_s")
        assert read is not _MORE  # the loop above ends only with a result
        return read


class _More(enum.Enum):
    """What :func:`_feed` says while a request is incomplete."""

    MORE = "more"


_MORE: Final = _More.MORE


def _feed(
    reader: RequestReader, data: bytes | bytearray
) -> tuple[UpgradeRequest, bytes] | Refusal | str | _More:
    """Give the client's next bytes to ``reader``: the request, a refusal, more, or gone."""
    if not data:
        return _LEFT
    result = reader.feed(data)
    if result is None:
        return _MORE
    if isinstance(result, Refusal):
        return result
    request, early = result
    upgrade = validate(request)
    if isinstance(upgrade, Refusal):
        return upgrade
    return upgrade, early

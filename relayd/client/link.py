"""One WebSocket connection to relayd, on trio-websocket: open it, run it, close it.

:func:`run_link` is one connection's whole life, in the caller's task; the
client calls it once, and again for each reconnect. Task layout, all in the
nursery :func:`run_link` opens::

    run_link         TCP (and TLS), the upgrade and the welcome (by
    │                relayd.client.opening); then the
    │                dispatcher: each frame read settles the send it answers,
    │                or goes to the client's message channel
    ├── reader       trio-websocket's: socket -> frames, answers pings
    ├── writer       queued envelopes -> socket, one at a time, so a caller
    │                cancelled mid-send never leaves half a frame behind
    └── keepalive    a ping every ``keepalive_s``; no pong within as long
                     again drops the connection (1006)

A connection lost (no pong, or a write of the writer's or the keepalive's
that failed) also ends the dispatcher, which may be waiting on a program
that does not read (:meth:`Link.end_if_lost`).

Buffers, each bounded:

* queued envelopes: at most ``max_in_flight``, each within the server's
  ``max_message_bytes`` when it announced one;
* frames read: trio-websocket holds none beyond the one being handed over
  (``message_queue_size=0``), one partly received message of at most
  ``max_message_chars`` characters (by default
  :func:`~relayd.client.options.default_message_bound`: 1 MiB, or relayd's
  announced limit plus 2 KiB if that is more, at most 64 MiB), and
  what one ``receive_some`` read (4 KiB);
* the client's message channel, ``receive_queue`` messages (the client's).

When the dispatcher cannot hand a message to the channel (nobody reads), it
stops reading frames, trio-websocket stops reading the socket, and TCP slows
relayd: backpressure reaches the server, which then refuses the client's
senders with ``recipient_busy``. Replies travel on the same socket, behind
those messages.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import h11
import trio
from trio_websocket import ConnectionClosed as WebSocketClosed
from trio_websocket import ConnectionRejected, WebSocketConnection
from wsproto.utilities import LocalProtocolError

from relayd.client.endpoint import Endpoint
from relayd.client.errors import (
    ConnectError,
    ConnectTimeout,
    HandshakeRefused,
    MessageTooLarge,
    closed_error,
    send_error,
)
from relayd.client.messages import Message, decode_v1, encode_envelope, seed_message
from relayd.client.opening import Stream, handshake, open_stream
from relayd.client.options import DELIVERY_ROOM, LinkOptions, default_message_bound
from relayd.client.outstanding import Outstanding
from relayd.errors import CloseCode
from relayd.wire.dialects import Ack, Delivery, Dialect, Error

__all__ = [
    "BURST_HEADER",
    "LIMIT_HEADER",
    "RATE_HEADER",
    "CloseInfo",
    "Link",
    "Sending",
    "run_link",
]

#: The response header in which relayd announces its ``max_message_bytes``
#: for the connection (docs/protocol.md, "Connecting").
LIMIT_HEADER: Final = b"relayd-max-message-bytes"
#: The response header in which relayd announces its ``messages_per_second``.
RATE_HEADER: Final = b"relayd-messages-per-second"
#: The response header in which relayd announces its ``message_burst``.
BURST_HEADER: Final = b"relayd-message-burst"
#: How trio-websocket's own 1009 reason starts: a message over ``max_message_chars``
#: arrived (relayd's reads ``message over N bytes``).
_OVER_BOUND_REASON: Final = "Exceeded maximum message size"


@dataclass(frozen=True)
class CloseInfo:
    """How a connection ended.

    Attributes:
        code: the close code: the one relayd sent, 1000 when this client
            closed, 1006 when there was no close frame.
        reason: relayd's close reason, or what this client saw.
        by_client: this client closed it.
        over_bound: this client closed it with 1009 because relayd sent it a
            message over the bound that follows relayd's announced limit
            (``max_message_chars=None``): a sender that connected after a
            reload raised the limit may send more than this connection was
            told. Connecting again may help, unlike after relayd's 1009: the
            new connection is told the limit in force, and its bound follows.
    """

    code: int
    reason: str
    by_client: bool = False
    over_bound: bool = False


class _State(enum.Enum):
    QUEUED = enum.auto()  # waiting for the writer: can still be withdrawn
    WITHDRAWN = enum.auto()  # its sender stopped waiting: still in the queue, never written
    WRITTEN = enum.auto()  # on the socket, or being written: waiting for a reply
    SETTLED = enum.auto()  # its outcome is known (or nobody waits for it any more)


class Sending:
    """One message on its way: queued, written (or withdrawn), then settled exactly once.

    Whoever settles it calls ``release`` once: the in-flight slot the sender
    took is free again.
    """

    __slots__ = ("_release", "done", "error", "frame", "ref", "state", "unwritten")

    def __init__(self, frame: str, ref: int | None, release: Callable[[], None]) -> None:
        self.frame = frame
        self.ref = ref
        self.state = _State.QUEUED
        self.error: BaseException | None = None
        # The connection ended with it still queued: not a byte of it was written, so
        # it was not delivered, and may go on the next connection.
        self.unwritten = False
        self.done = trio.Event()
        self._release = release

    def settle(self, error: BaseException | None) -> None:
        """Record the outcome (None: delivered, written in the seed dialect, or withdrawn)."""
        if self.state is _State.SETTLED:
            return
        self.state = _State.SETTLED
        self.error = error
        self.done.set()
        self._release()


class Link:
    """One open connection: its id, its queue of envelopes, its replies.

    Built by :func:`run_link` once the welcome arrived; it lives until
    :func:`run_link` returns.
    """

    def __init__(
        self,
        ws: WebSocketConnection,
        stream: Stream,
        *,
        client_id: str,
        options: LinkOptions,
        deliveries: trio.MemorySendChannel[Message],
    ) -> None:
        self.id = client_id
        self.dialect = options.dialect
        self.max_message_bytes = _announced_int(ws.handshake_headers, LIMIT_HEADER)
        self.messages_per_second = _announced_rate(ws.handshake_headers)
        self.message_burst = _announced_int(ws.handshake_headers, BURST_HEADER)
        # The bound follows relayd's announced limit: a message over it may come from a
        # client that connected after a reload raised the limit (CloseInfo.over_bound).
        self._bound_follows = False
        if options.max_message_chars is None and self.max_message_bytes is not None:
            # relayd lets any client send this one a message of its limit: a smaller bound
            # here would let any of them close this connection with 1009, for good. The
            # bound is trio-websocket's own, read at each message; it has no setter.
            bound = default_message_bound(self.max_message_bytes)
            ws._max_message_size = bound
            # Capped (MAX_ANNOUNCED_CHARS), it does not follow: a message over it would
            # be over it on every connection, and each would be lost to a reconnect.
            self._bound_follows = bound >= self.max_message_bytes + DELIVERY_ROOM
        self._ws = ws
        self._stream = stream
        self._deliveries = deliveries
        self._keepalive_s = options.keepalive_s
        self._next_ref = 1
        self._outstanding: Outstanding[Sending] = Outstanding()
        # Every one not settled yet, in the order submitted (a dict keeps it; a set did not:
        # the unwritten ones, sent again after a reconnect, went in any order).
        self._sendings: dict[Sending, None] = {}
        # Where fail_all puts the unwritten ones, in the order submitted: the client's
        # list (set by its on_open), which sends them again before any later send.
        self.carried: list[Sending] = []
        # Withdrawn while queued: each still takes its place in the queue, and so
        # keeps its sender's slot until the writer passes over it.
        self._withdrawn: set[Sending] = set()
        # Never blocks: each queued envelope holds one of max_in_flight slots.
        self._queue_in, self._queue_out = trio.open_memory_channel[Sending](options.max_in_flight)
        self._closing = False  # this client started the closing handshake
        self._gone = False  # the connection is over: nothing more is sent
        self._closed = trio.Event()  # set when close() is over
        self._closing_scope: trio.CancelScope | None = None  # close()'s wait, while it waits
        self._lost_reason = ""  # why this client dropped the connection itself
        # The dispatcher's reading, cancelled once the connection is lost (end_if_lost).
        self._reading = trio.CancelScope()

    @property
    def closing(self) -> bool:
        """This client started the closing handshake (:meth:`close`)."""
        return self._closing

    @property
    def open(self) -> bool:
        """Messages can still be sent on it."""
        return not (self._closing or self._gone) and self.ended() is None

    def submit(self, to: str, body: bytes, release: Callable[[], None]) -> Sending:
        """Queue one message; the caller holds an in-flight slot, freed by ``release``.

        Raises:
            MessageTooLarge: the envelope is over the limit relayd announced;
                nothing was queued and ``release`` was not called.
        """
        ref = None
        if self.dialect is Dialect.V1:
            ref = self._next_ref
        frame = encode_envelope(to, body, ref)
        if self.max_message_bytes is not None and len(frame) > self.max_message_bytes:
            raise MessageTooLarge(
                "message_too_large",
                f"the message is {len(frame)} bytes with its envelope, over the server's "
                f"limit of {self.max_message_bytes} bytes; not sent",
                sent=False,
            )
        sending = Sending(frame.decode(), ref, release)
        # Room is certain: every envelope in the queue, withdrawn ones too, holds one
        # of the max_in_flight slots. Queued first, so that nothing is recorded for a
        # message that is not.
        self._queue_in.send_nowait(sending)
        if ref is not None:
            self._next_ref += 1
            self._outstanding.add(ref, sending)
        self._sendings[sending] = None
        return sending

    def abandon(self, sending: Sending) -> None:
        """Its sender stopped waiting: withdraw it if it is still queued.

        A withdrawn message is never written; its slot is freed once the writer
        passes over it, since until then it takes a place in the queue (freed at
        once, a new message could find the queue full). A message already written
        stays outstanding, so that its reply is matched to it and not to another;
        the reply then frees its slot.
        """
        if sending.state is _State.QUEUED:
            if sending.ref is not None:
                self._outstanding.forget(sending.ref)
            self._sendings.pop(sending, None)
            sending.state = _State.WITHDRAWN
            self._withdrawn.add(sending)

    async def close(self) -> None:
        """Close with 1000 and wait for relayd's close frame; the caller bounds the wait.

        The wait ends early if the link ends first (:meth:`fail_all`): then
        trio-websocket's reader, which would read that close frame, is gone
        (see :func:`_late_pong`).
        """
        self._closing = True
        try:
            if not self._gone:
                with trio.CancelScope() as self._closing_scope:
                    await self._ws.aclose(CloseCode.NORMAL)
        finally:
            self._closed.set()

    async def closing_handshake(self) -> None:
        """Wait until :meth:`close` is over: its wait needs trio-websocket's reader."""
        await self._closed.wait()

    # -- tasks -----------------------------------------------------------------------

    async def dispatch(self) -> CloseInfo:
        """Read frames until the connection ends; returns how it ended.

        Cancellation: ended once the connection is lost (:meth:`end_if_lost`);
        a message it was handing to the client's channel then is lost with the
        connection. After a close frame it keeps handing over the last message.
        """
        with self._reading:
            while True:
                try:
                    frame = await self._ws.get_message()
                except WebSocketClosed:
                    break
                if isinstance(frame, bytes):
                    continue  # relayd sends clients text only
                if self.dialect is Dialect.SEED:
                    await self._deliveries.send(seed_message(frame))
                    continue
                match decode_v1(frame):
                    case Delivery(sender=sender, message=message):
                        await self._deliveries.send(Message(sender, bytes(message)))
                    case Ack(ref=ref):
                        self._settle(ref, None)
                    case Error(error=code, detail=detail, ref=ref, retry_after_ms=wait):
                        self._settle(ref, send_error(code, detail, ref, retry_after_ms=wait))
                    case _:
                        pass  # a second welcome, or not relayd: nothing to act on
        return self.ended() or CloseInfo(CloseCode.ABNORMAL, self._lost_reason, self._closing)

    def ended(self) -> CloseInfo | None:
        """How the connection ended; None while it is open, or closing."""
        reason = self._ws.closed
        if reason is None:
            if self._lost_reason:  # the keepalive dropped it under a reader not reading
                return CloseInfo(CloseCode.ABNORMAL, self._lost_reason, self._closing)
            return None
        code, text = int(reason.code), reason.reason or ""
        if code == CloseCode.ABNORMAL:  # not a close of this client's it was in (1000)
            text = self._lost_reason or text
        over_bound = (
            self._bound_follows
            and code == CloseCode.TOO_BIG
            and not self._closing
            and text.startswith(_OVER_BOUND_REASON)
        )
        return CloseInfo(code, text, self._closing, over_bound)

    def _settle(self, ref: str | int | None, error: BaseException | None) -> None:
        sending = self._outstanding.match(ref)
        if sending is not None:
            self._sendings.pop(sending, None)
            sending.settle(error)

    async def write(self) -> None:
        """Write queued envelopes in order until the connection ends."""
        async for sending in self._queue_out:
            if sending.state is _State.WITHDRAWN:
                self._withdrawn.discard(sending)
                sending.settle(None)  # nobody waits: this frees its slot
                continue
            if sending.state is not _State.QUEUED:
                continue  # settled as the connection ended
            sending.state = _State.WRITTEN
            try:
                await self._ws.send_message(sending.frame)
            except WebSocketClosed:
                self.end_if_lost()  # then run_link fails what is left
                return
            if sending.ref is None:  # no reply will come: written is all it gets
                self._sendings.pop(sending, None)
                sending.settle(None)

    async def keepalive(self, interval: float) -> None:
        """Ping every ``interval`` seconds; drop the connection if a pong is as late.

        Dropping it, or a ping that found it lost, ends the dispatcher too
        (:meth:`end_if_lost`).
        """
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as waiting:
                try:
                    await self._ws.ping()
                except WebSocketClosed:
                    self.end_if_lost()
                    return
            if waiting.cancelled_caught:
                self._lost_reason = f"no pong within {interval:g} s"
                self.end_if_lost()
                await trio.aclose_forcefully(self._stream)
                return

    def end_if_lost(self) -> None:
        """End the dispatcher (:meth:`dispatch`) if the connection is lost.

        Lost: the keepalive dropped it, or trio-websocket found it gone without
        a close frame (1006), as when a write failed on a connection relayd had
        dropped. The dispatcher would end only when it next read, which it may
        never do: when the program stops reading, it waits to hand a message
        to the client's full channel. Until it ends, :func:`run_link` settles
        none of the link's sends, which wait for replies that cannot come, and
        nothing reconnects. (Closing the stream is not enough: trio-websocket's
        reader, waiting to hand the dispatcher the next message, does not read
        it, and nothing sees it closed.) The message the dispatcher holds is
        lost with the connection. A close frame, relayd's or this client's, is
        not a loss: the dispatcher still hands over the message before it.
        """
        reason = self._ws.closed
        if self._lost_reason or (reason is not None and reason.code == CloseCode.ABNORMAL):
            self._reading.cancel()

    def fail_all(self, closed: CloseInfo) -> None:
        """Settle every message still waiting: the connection is gone."""
        by_client = closed.by_client or self._closing
        self._gone = True
        self._outstanding.clear()
        for sending in self._sendings:
            if by_client:
                error: BaseException = trio.ClosedResourceError("the client was closed")
            else:
                error = closed_error(closed.code, closed.reason)
            sending.unwritten = sending.state is _State.QUEUED
            if sending.unwritten:
                self.carried.append(sending)
            sending.settle(error)
        self._sendings.clear()
        for sending in self._withdrawn:  # the writer will not pass over them now
            sending.settle(None)
        self._withdrawn.clear()
        if self._closing_scope is not None:
            self._closing_scope.cancel()  # no reader is left to end close()'s wait


def _late_pong(error: BaseException) -> bool:
    """Whether ``error`` is wsproto refusing a pong because this side is closing.

    Closing by this client's choice (it sent its close frame), or because a
    write failed and trio-websocket aborted the connection.
    """
    message = str(error)
    return message.startswith("Event Pong(") and message.endswith(
        "state ConnectionState.LOCAL_CLOSING."
    )


def _header(headers: tuple[tuple[bytes, bytes], ...], wanted: bytes) -> bytes | None:
    """The value of the response header ``wanted`` (lower case); None if absent."""
    for name, value in headers:
        if name.lower() == wanted:
            return value
    return None


def _announced_int(headers: tuple[tuple[bytes, bytes], ...], wanted: bytes) -> int | None:
    value = _header(headers, wanted)
    try:
        limit = int(value) if value is not None else 0
    except ValueError:
        return None
    return limit if limit > 0 else None


def _announced_rate(headers: tuple[tuple[bytes, bytes], ...]) -> float | None:
    value = _header(headers, RATE_HEADER)
    try:
        rate = float(value) if value is not None else 0.0
    except ValueError:
        return None
    return rate if math.isfinite(rate) and rate > 0 else None


async def run_link(
    endpoint: Endpoint,
    options: LinkOptions,
    deliveries: trio.MemorySendChannel[Message],
    on_open: Callable[[Link], None],
) -> CloseInfo:
    """Connect, call ``on_open`` with the link, and run it until it ends.

    Resource handling: everything this opens (sockets, tasks) is closed or
    cancelled when it returns or raises. Cancelling it drops the connection
    without a close frame; close it first with :meth:`Link.close` for a 1000.

    Returns:
        How the connection ended. Messages still waiting for their outcome
        have been settled with the matching :class:`ConnectionClosed` (or
        :class:`trio.ClosedResourceError` when this client closed it).

    Raises:
        ConnectError: no connection (``on_open`` was not called):
            :class:`ConnectTimeout` past ``options.connect_timeout``,
            :class:`HandshakeRefused`, :class:`TLSError`, or a plain
            :class:`ConnectError` for the network or a server that is not relayd.
    """
    url = endpoint.url
    deadline = trio.current_time() + options.connect_timeout
    with trio.move_on_at(deadline) as connecting:
        stream = await open_stream(endpoint, options.ssl_context)
    if connecting.cancelled_caught:
        timeout = options.connect_timeout
        raise ConnectTimeout(url, f"no connection to {url} within {timeout:g} s")
    failure: ConnectError | None = None
    closed = CloseInfo(CloseCode.ABNORMAL, "")
    link: Link | None = None
    try:
        async with trio.open_nursery() as nursery:
            opened = await handshake(nursery, stream, endpoint, options, deadline)
            if isinstance(opened, ConnectError):
                failure = opened
            else:
                ws, client_id = opened
                link = Link(ws, stream, client_id=client_id, options=options, deliveries=deliveries)
                try:
                    on_open(link)
                    nursery.start_soon(link.write)
                    if options.keepalive_s is not None:
                        nursery.start_soon(link.keepalive, options.keepalive_s)
                    closed = await link.dispatch()
                    if closed.by_client:
                        await link.closing_handshake()
                finally:  # cancelled too: no send may wait for a connection that is gone
                    link.fail_all(closed)
            nursery.cancel_scope.cancel()  # trio-websocket's reader, the writer, keepalive
    except* ConnectionRejected as group:  # raised by trio-websocket's reader task
        rejected = group.exceptions[0]
        assert isinstance(rejected, ConnectionRejected)
        body = (rejected.body or b"").decode(errors="replace").strip()
        failure = HandshakeRefused(url, rejected.status_code, body)
    except* h11.ProtocolError as group:
        # wsproto's HTTP parser refused relayd's answer to the upgrade: none is like
        # that (a 101 with a body, say), so it is another server.
        if link is not None:
            raise
        failure = _not_relayd(url, group.exceptions[0])
    except* LocalProtocolError as group:
        # trio-websocket 0.12 answers a ping that came after it started closing with
        # a pong, which wsproto refuses, and its reader task raises
        # (trio-websocket#184). RFC 6455 lets a closing endpoint leave the ping
        # unanswered. Closing by this client's choice, that is a 1000; closing
        # because a write failed (trio-websocket aborts), the connection is lost.
        if link is None:
            # During the upgrade: wsproto refused the answer (a 101 with a wrong
            # Sec-WebSocket-Accept, say), which no relayd sends.
            failure = _not_relayd(url, group.exceptions[0])
        elif not all(_late_pong(error) for error in group.exceptions):
            raise
        elif link.closing:
            closed = CloseInfo(CloseCode.NORMAL, "", by_client=True)
        else:
            ended = link.ended()  # trio-websocket's abort sets it: 1006, without a reason
            closed = CloseInfo(
                ended.code if ended else CloseCode.ABNORMAL,
                (ended.reason if ended else "") or "the connection failed",
            )
    finally:
        await trio.aclose_forcefully(stream)
    if failure is not None:
        raise failure
    return closed


def _not_relayd(url: str, error: BaseException) -> ConnectError:
    """The error for an answer to the upgrade that wsproto or its HTTP parser refused."""
    why = f"{url} answered the WebSocket upgrade as relayd never does (is it relayd?): {error}"
    return ConnectError(url, why, retryable=False)

"""One WebSocket connection to relayd, on trio-websocket: open it, run it, close it.

:func:`run_link` is one connection's whole life, in the caller's task; the
client calls it once, and again for each reconnect. Task layout, all in the
nursery :func:`run_link` opens::

    run_link         TCP (and TLS), the upgrade and the welcome; then the
    │                dispatcher: each frame read settles the send it answers,
    │                or goes to the client's message channel
    ├── reader       trio-websocket's: socket -> frames, answers pings
    ├── writer       queued envelopes -> socket, one at a time, so a caller
    │                cancelled mid-send never leaves half a frame behind
    └── keepalive    a ping every ``keepalive_s``; no pong within as long
                     again drops the connection (1006)

Buffers, each bounded:

* queued envelopes: at most ``max_in_flight``, each within the server's
  ``max_message_bytes`` when it announced one;
* frames read: trio-websocket holds none beyond the one being handed over
  (``message_queue_size=0``), one partly received message of at most
  ``max_message_chars`` characters, and what one ``receive_some`` read (4 KiB);
* the client's message channel, ``receive_queue`` messages (the client's).

When the dispatcher cannot hand a message to the channel (nobody reads), it
stops reading frames, trio-websocket stops reading the socket, and TCP slows
relayd: backpressure reaches the server, which then refuses the client's
senders with ``recipient_busy``. Replies travel on the same socket, behind
those messages.
"""

from __future__ import annotations

import enum
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

import trio
from trio_websocket import ConnectionClosed as WebSocketClosed
from trio_websocket import ConnectionRejected, WebSocketConnection, wrap_client_stream

from relayd.client.endpoint import Endpoint
from relayd.client.errors import (
    ConnectError,
    ConnectTimeout,
    HandshakeRefused,
    MessageTooLarge,
    TLSError,
    closed_error,
    send_error,
)
from relayd.client.messages import Message, decode_v1, encode_envelope, seed_message, welcome_id
from relayd.client.outstanding import Outstanding
from relayd.errors import CloseCode
from relayd.wire.dialects import V1_SUBPROTOCOL, Ack, Delivery, Dialect, Error

__all__ = ["LIMIT_HEADER", "CloseInfo", "Link", "LinkOptions", "Sending", "run_link"]

#: The response header in which relayd announces its ``max_message_bytes``
#: for the connection (docs/protocol.md, "Connecting").
LIMIT_HEADER: Final = b"relayd-max-message-bytes"

#: OpenSSL's reasons for a TLS record that is not one: what a TLS client reads
#: when the server answers in plain text (relayd's 400 to a ClientHello).
_PLAIN_TEXT_REASONS: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"}
)

Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


@dataclass(frozen=True)
class LinkOptions:
    """What every connection of one client is opened with (see :func:`relayd.client.connect`)."""

    dialect: Dialect
    token: str | None
    ssl_context: ssl.SSLContext | None
    connect_timeout: float
    keepalive_s: float | None
    max_in_flight: int
    max_message_chars: int


@dataclass(frozen=True)
class CloseInfo:
    """How a connection ended.

    Attributes:
        code: the close code: the one relayd sent, 1000 when this client
            closed, 1006 when there was no close frame.
        reason: relayd's close reason, or what this client saw.
        by_client: this client closed it.
    """

    code: int
    reason: str
    by_client: bool = False


class _State(enum.Enum):
    QUEUED = enum.auto()  # waiting for the writer: can still be withdrawn
    WRITTEN = enum.auto()  # on the socket, or being written: waiting for a reply
    SETTLED = enum.auto()  # its outcome is known (or nobody waits for it any more)


class Sending:
    """One message on its way: queued, written, then settled exactly once.

    Whoever settles it calls ``release`` once: the in-flight slot the sender
    took is free again.
    """

    __slots__ = ("_release", "done", "error", "frame", "ref", "state")

    def __init__(self, frame: str, ref: int | None, release: Callable[[], None]) -> None:
        self.frame = frame
        self.ref = ref
        self.state = _State.QUEUED
        self.error: BaseException | None = None
        self.done = trio.Event()
        self._release = release

    def settle(self, error: BaseException | None) -> None:
        """Record the outcome (None: delivered, or written in the seed dialect)."""
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
        self.max_message_bytes = _announced_limit(ws.handshake_headers)
        self._ws = ws
        self._stream = stream
        self._deliveries = deliveries
        self._keepalive_s = options.keepalive_s
        self._next_ref = 1
        self._outstanding: Outstanding[Sending] = Outstanding()
        self._sendings: set[Sending] = set()  # every one not settled yet
        # Never blocks: each queued envelope holds one of max_in_flight slots.
        self._queue_in, self._queue_out = trio.open_memory_channel[Sending](options.max_in_flight)
        self._closing = False  # this client started the closing handshake
        self._gone = False  # the connection is over: nothing more is sent
        self._closed = trio.Event()  # set when close() is over
        self._lost_reason = ""  # why this client dropped the connection itself

    @property
    def open(self) -> bool:
        """Messages can still be sent on it."""
        return not (self._closing or self._gone) and self._ws.closed is None

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
        if ref is not None:
            self._next_ref += 1
            self._outstanding.add(ref, sending)
        self._sendings.add(sending)
        self._queue_in.send_nowait(sending)
        return sending

    def abandon(self, sending: Sending) -> None:
        """Its sender stopped waiting: withdraw it if it is still queued.

        A message already written stays outstanding, so that its reply is
        matched to it and not to another; the reply then frees its slot.
        """
        if sending.state is _State.QUEUED:
            if sending.ref is not None:
                self._outstanding.forget(sending.ref)
            self._sendings.discard(sending)
            sending.settle(None)

    async def close(self) -> None:
        """Close with 1000 and wait for relayd's close frame; the caller bounds the wait."""
        self._closing = True
        try:
            await self._ws.aclose(CloseCode.NORMAL)
        finally:
            self._closed.set()

    async def closing_handshake(self) -> None:
        """Wait until :meth:`close` is over: its wait needs trio-websocket's reader."""
        await self._closed.wait()

    # -- tasks -----------------------------------------------------------------------

    async def dispatch(self) -> CloseInfo:
        """Read frames until the connection ends; returns how it ended."""
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
                case Error(error=code, detail=detail, ref=ref):
                    self._settle(ref, send_error(code, detail, ref))
                case _:
                    pass  # a second welcome, or not relayd: nothing to act on
        return self.ended() or CloseInfo(CloseCode.ABNORMAL, self._lost_reason, self._closing)

    def ended(self) -> CloseInfo | None:
        """How the connection ended; None while it is open, or closing."""
        reason = self._ws.closed
        if reason is None:
            return None
        return CloseInfo(int(reason.code), self._lost_reason or reason.reason or "", self._closing)

    def _settle(self, ref: str | int | None, error: BaseException | None) -> None:
        sending = self._outstanding.match(ref)
        if sending is not None:
            self._sendings.discard(sending)
            sending.settle(error)

    async def write(self) -> None:
        """Write queued envelopes in order until the connection ends."""
        async for sending in self._queue_out:
            if sending.state is not _State.QUEUED:
                continue  # withdrawn by its sender
            sending.state = _State.WRITTEN
            try:
                await self._ws.send_message(sending.frame)
            except WebSocketClosed:
                return  # the dispatcher sees the close and fails what is left
            if sending.ref is None:  # no reply will come: written is all it gets
                self._sendings.discard(sending)
                sending.settle(None)

    async def keepalive(self, interval: float) -> None:
        """Ping every ``interval`` seconds; drop the connection if a pong is as late."""
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as waiting:
                try:
                    await self._ws.ping()
                except WebSocketClosed:
                    return
            if waiting.cancelled_caught:
                self._lost_reason = f"no pong within {interval:g} s"
                await trio.aclose_forcefully(self._stream)
                return

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
            sending.settle(error)
        self._sendings.clear()


def _announced_limit(headers: tuple[tuple[bytes, bytes], ...]) -> int | None:
    for name, value in headers:
        if name.lower() == LIMIT_HEADER:
            try:
                limit = int(value)
            except ValueError:
                return None
            return limit if limit > 0 else None
    return None


async def _open_stream(endpoint: Endpoint, ssl_context: ssl.SSLContext | None) -> Stream:
    """TCP, and for ``wss://`` a verified TLS session, before any WebSocket byte.

    The TLS handshake is done here so that a bad certificate is reported as
    such: inside trio-websocket it would only be a stall.

    Raises:
        ConnectError: no TCP connection; the message has each address's reason.
        TLSError: the TLS handshake failed.
    """
    url = endpoint.url
    try:
        tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    except OSError as exc:
        # trio's "all attempts to connect failed" holds each address's reason.
        causes = exc.__cause__.exceptions if isinstance(exc.__cause__, ExceptionGroup) else [exc]
        raise ConnectError(url, f"cannot connect to {url}: {'; '.join(map(str, causes))}") from exc
    if not endpoint.tls:
        return tcp
    context = ssl_context if ssl_context is not None else ssl.create_default_context()
    tls = trio.SSLStream(tcp, context, server_hostname=endpoint.host, https_compatible=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        raise TLSError(url, _tls_failure(endpoint, exc.__cause__)) from exc.__cause__
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return tls


def _tls_failure(endpoint: Endpoint, cause: BaseException | None) -> str:
    text = f"TLS handshake with {endpoint.url} failed: {cause or 'the connection closed'}"
    if isinstance(cause, ssl.SSLError) and cause.reason in _PLAIN_TEXT_REASONS:
        plain = f"ws://{endpoint.host_header}{endpoint.resource}"
        text += f" (the server answered in plain text: it may speak {plain}, not wss://)"
    return text


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
        stream = await _open_stream(endpoint, options.ssl_context)
    if connecting.cancelled_caught:
        timeout = options.connect_timeout
        raise ConnectTimeout(url, f"no connection to {url} within {timeout:g} s")
    failure: ConnectError | None = None
    closed = CloseInfo(CloseCode.ABNORMAL, "")
    try:
        async with trio.open_nursery() as nursery:
            link, failure = await _handshake(
                nursery, stream, endpoint, options, deliveries, deadline
            )
            if link is not None:
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
    finally:
        await trio.aclose_forcefully(stream)
    if failure is not None:
        raise failure
    return closed


async def _handshake(
    nursery: trio.Nursery,
    stream: Stream,
    endpoint: Endpoint,
    options: LinkOptions,
    deliveries: trio.MemorySendChannel[Message],
    deadline: float,
) -> tuple[Link | None, ConnectError | None]:
    """The upgrade and the welcome, by ``deadline``: the link, or why there is none."""
    url = endpoint.url
    watched = _Watched(stream)
    upgraded: tuple[WebSocketConnection, str | bytes] | ConnectError | None = None
    with trio.move_on_at(deadline) as waiting:
        async with trio.open_nursery() as racing:
            racing.start_soon(_cancel_when_set, watched.silent, racing.cancel_scope)
            upgraded = await _upgrade(nursery, watched, endpoint, options)
            racing.cancel_scope.cancel()
    if isinstance(upgraded, ConnectError):
        return None, upgraded
    if upgraded is None and watched.silent.is_set():
        why = f"{url} closed the connection without answering the WebSocket handshake"
        if not endpoint.tls:  # what a TLS server does with a plain request
            why += f" (it may speak wss://{endpoint.host_header}{endpoint.resource}, not ws://)"
        return None, ConnectError(url, why, retryable=False)
    if upgraded is None or waiting.cancelled_caught:
        timeout = options.connect_timeout
        return None, ConnectTimeout(url, f"no WebSocket handshake with {url} within {timeout:g} s")
    ws, first = upgraded
    if options.dialect is Dialect.V1 and ws.subprotocol != V1_SUBPROTOCOL:
        return None, ConnectError(
            url, f"{url} does not speak {V1_SUBPROTOCOL}; try the seed dialect", retryable=False
        )
    client_id = welcome_id(options.dialect, first)
    if client_id is None:
        return None, ConnectError(
            url, f"{url} sent {first!r} where relayd sends the id", retryable=False
        )
    return Link(ws, stream, client_id=client_id, options=options, deliveries=deliveries), None


async def _upgrade(
    nursery: trio.Nursery, stream: _Watched, endpoint: Endpoint, options: LinkOptions
) -> tuple[WebSocketConnection, str | bytes] | ConnectError:
    """The WebSocket upgrade on ``stream`` and the first frame, or why it closed before one."""
    headers = []
    if options.token is not None:
        headers.append((b"Authorization", f"Bearer {options.token}".encode()))
    ws = await wrap_client_stream(
        nursery,
        # trio-websocket uses only the trio.abc.Stream methods of what it wraps (its
        # annotation is narrower than that).
        cast(trio.SocketStream, stream),
        endpoint.host_header,
        endpoint.resource,
        subprotocols=[V1_SUBPROTOCOL] if options.dialect is Dialect.V1 else [],
        extra_headers=headers,
        message_queue_size=0,
        max_message_size=options.max_message_chars,
    )
    try:
        return ws, await ws.get_message()
    except WebSocketClosed as exc:
        reason = exc.reason.reason if exc.reason is not None else None
        why = f"{endpoint.url} closed the connection before sending an id: {reason or 'no reason'}"
        return ConnectError(endpoint.url, why)


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class _Watched(trio.abc.Stream):
    """A connection's stream that notices a server closing it without a word.

    trio-websocket waits for the answer to its upgrade request even after the
    server closed the connection, as a TLS server does when a plain request
    arrives: :attr:`silent` is set when the stream ends before any byte came
    back, so that the wait can stop there.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.silent = trio.Event()
        self._heard = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError:
            self._ended()
            raise
        if data:
            self._heard = True
        else:
            self._ended()
        return data

    def _ended(self) -> None:
        if not self._heard:
            self.silent.set()

    async def aclose(self) -> None:
        await self.stream.aclose()

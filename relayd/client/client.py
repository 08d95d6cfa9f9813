"""The client a program uses: :func:`connect` and the :class:`Client` it yields.

Task layout: ``async with connect(...) as client`` opens a nursery that the
block owns. One task runs in it, the supervisor, which runs one connection
(:func:`~relayd.client.link.run_link`, and the tasks under it) at a time and,
when reconnecting is on, the waits between them. Leaving the block, however
it is left, closes the connection with 1000 (within ``close_timeout``) and
then cancels the supervisor; nothing of the client outlives the block. Once
connected, the supervisor is shielded from cancellation coming from outside
the block: that cancellation reaches the block's own task, whose exit closes
the client, and the closing handshake needs the supervisor's reader running.

Who raises what, where:

* entering the block: :class:`~relayd.client.errors.ConnectError` and its
  subclasses;
* :meth:`Client.send`: :class:`~relayd.client.errors.SendError` subclasses (the
  connection stays open), :class:`~relayd.client.errors.ConnectionClosed`
  subclasses;
* receiving: :class:`~relayd.client.errors.ConnectionClosed` subclasses, once
  every message that arrived before the close has been read;
* after the program's own :meth:`Client.aclose`: ``send`` raises
  :class:`trio.ClosedResourceError`, iteration ends.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal

import trio

from relayd.client.backoff import Backoff, Pacing
from relayd.client.endings import final_error, raise_alone, retryable
from relayd.client.endpoint import Endpoint
from relayd.client.errors import ConnectError
from relayd.client.link import CloseInfo, Link, Sending, run_link
from relayd.client.messages import Message, check_id, encode_body
from relayd.client.options import (
    CLOSE_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    KEEPALIVE_S,
    MAX_IN_FLIGHT,
    RECEIVE_QUEUE,
    LinkOptions,
    check_options,
)
from relayd.wire.dialects import Dialect

__all__ = ["Client", "CloseInfo", "connect"]


class Client:
    """A connection to relayd; made by :func:`connect`, usable inside its block.

    Attributes are read-only. Everything that waits takes its bound from the
    caller's cancel scope (``with trio.fail_after(5): await client.send(...)``);
    the client adds no timeout of its own to sending or receiving.

    Resource handling: the client holds at most ``max_in_flight`` messages
    being sent and ``receive_queue`` messages received but not read (plus the
    buffers of one connection, see :mod:`relayd.client.link`). A program that
    stops reading stops the socket: relayd then refuses messages to it with
    ``recipient_busy`` and, after ``slow_consumer_timeout_s``, drops it.
    """

    def __init__(
        self, endpoint: Endpoint, options: LinkOptions, *, receive_queue: int, close_timeout: float
    ) -> None:
        self._endpoint = endpoint
        self._options = options
        self._close_timeout = close_timeout
        self._slots = trio.Semaphore(options.max_in_flight)
        self._deliveries_in, self._deliveries = trio.open_memory_channel[Message](receive_queue)
        self._link: Link | None = None
        # The messages still queued, not a byte written, when a connection was lost, in
        # the order they were submitted: each goes on the next connection in that order,
        # and before any other send (each leaves the list once submitted again).
        self._carried: list[Sending] = []
        # Held by each new send from its call until its message is submitted (carried
        # ones go first, without it): trio.Lock hands itself on first come, first served,
        # so new sends are submitted in the order they were made, whatever they waited for
        # (a slot, a reconnect, the carried ones). Tasks woken together, as by _changed,
        # run in an order trio leaves arbitrary: sends made while reconnecting went out
        # scrambled.
        self._turn = trio.Lock()
        self._id = ""
        self._opened_at = 0.0  # trio.current_time() when the link opened
        self._changed = trio.Event()  # set, and replaced, whenever the link changes
        self._closing = False
        self._final: Callable[[], BaseException] | None = None  # raised once all is read
        self._supervisor = trio.CancelScope()
        self._finished = trio.Event()

    @property
    def id(self) -> str:
        """The id relayd assigned to this client (the latest, after a reconnect)."""
        return self._id

    @property
    def url(self) -> str:
        """The URL this client connects to."""
        return self._endpoint.url

    @property
    def dialect(self) -> Dialect:
        """The dialect spoken: :attr:`Dialect.V1` or :attr:`Dialect.SEED`."""
        return self._options.dialect

    @property
    def max_message_bytes(self) -> int | None:
        """The largest envelope relayd takes on this connection, as it announced; None if not.

        :meth:`send` refuses a larger one without sending it.
        """
        return self._link.max_message_bytes if self._link is not None else None

    @property
    def messages_per_second(self) -> float | None:
        """The message rate relayd announced for this connection; None if it did not.

        A message over it is refused (:class:`RateLimited`); wait its
        ``retry_after`` before sending it again, or ``1 / messages_per_second``
        seconds when relayd did not say (an older relayd), either a little more
        for the two clocks. An operator's reload
        may change the rate of an open connection (``retry_after`` follows it).
        """
        return self._link.messages_per_second if self._link is not None else None

    @property
    def message_burst(self) -> int | None:
        """The messages relayd announced this connection may send at once; None if it did not.

        Beyond them, messages go at :attr:`messages_per_second`. A reload may change it.
        """
        return self._link.message_burst if self._link is not None else None

    @property
    def closed(self) -> CloseInfo | None:
        """How the latest connection ended; None while it is open."""
        return self._link.ended() if self._link is not None else None

    async def send(self, to: str, message: object) -> None:
        """Send ``message`` to the client ``to`` and wait for its outcome.

        In relayd.v1, returns once relayd has put the message in the
        recipient's queue (its ``ack``). In the seed dialect, which has no
        acks, returns once the message is written to the connection; relayd's
        errors then arrive as messages (:meth:`Message.as_error`).

        Up to ``max_in_flight`` calls may wait at once, from as many tasks;
        each outcome is matched to its message. A further call waits for a
        slot. While reconnecting, calls wait for the new connection. Calls
        go out in the order they were made, whatever they wait for.

        Args:
            to: the recipient's id.
            message: any value JSON can hold (``dict``, ``list``, ``str``,
                numbers, ``bool``, ``None``, dataclasses...); a
                :class:`msgspec.Raw` is sent as the JSON text it holds.

        Cancellation: cancelled before the message reached the socket, it is
        not sent. After that it cannot be taken back: relayd may deliver it,
        and its ``ack`` or error is discarded.

        Raises:
            SendError: relayd did not relay it; the subclass names the reason
                (:class:`UnknownRecipient`, :class:`RecipientBusy`,
                :class:`RateLimited`...). :class:`MessageTooLarge` is also
                raised without sending when the envelope is over the
                :attr:`max_message_bytes` relayd announced.
            ConnectionClosed: the connection ended before relayd answered (the
                message may or may not have been delivered), or it had ended
                and reconnecting, if on, gave up (``__cause__`` says why). A
                message still queued in the client when the connection ended,
                none of it written, is sent on the next connection instead, when
                reconnecting makes one.
            trio.ClosedResourceError: the program closed this client.
            TypeError: ``message`` is not something JSON can hold.
            ValueError: ``message`` or ``to`` holds a string that is not valid
                Unicode (a lone surrogate, as half of an emoji cut in two);
                ``message`` is nested too deeply to encode, or a
                :class:`msgspec.Raw` in it is not one JSON value.
        """
        body = encode_body(message)
        check_id(to)
        carried: Sending | None = None  # this message, unwritten when a connection ended
        try:
            while True:
                carried = await self._send_once(to, body, carried)
                if carried is None:
                    return
        except BaseException:
            if carried is not None:
                self._drop_carried(carried)
            raise

    async def _send_once(self, to: str, body: bytes, carried: Sending | None) -> Sending | None:
        """Send on the connection open now: None once delivered, or the message unwritten.

        ``carried`` is this message, if it was unwritten when a connection ended.
        """
        if carried is None:
            async with self._turn:
                link, sending = await self._submit(to, body, None)
        else:
            link, sending = await self._submit(to, body, carried)
            self._drop_carried(carried)
        try:
            await sending.done.wait()
        except BaseException:
            link.abandon(sending)
            raise
        if sending.error is None:
            return None
        if not sending.unwritten:
            raise sending.error
        # The connection ended before any of it was written: not delivered, so it goes on
        # the next connection, if reconnecting makes one (_usable_link waits for it, or
        # raises the close's exception when there will be none), in its place among the
        # others carried (Link.fail_all listed them).
        return sending

    async def _submit(self, to: str, body: bytes, carried: Sending | None) -> tuple[Link, Sending]:
        """Queue the message on the connection open now, at its turn; waits for a slot."""
        while True:
            while not self._has_turn(carried):
                await self._changed.wait()
            await self._slots.acquire()
            try:
                link = await self._usable_link()
                turn = self._has_turn(carried)  # a connection may have been lost meanwhile
                if turn:
                    sending = link.submit(to, body, self._slots.release)
            except BaseException:
                self._slots.release()
                raise
            if turn:
                return link, sending
            self._slots.release()

    def _has_turn(self, carried: Sending | None) -> bool:
        """Whether a send may submit now: a carried message at its turn, or none carried."""
        if carried is not None and carried in self._carried:
            return self._carried[0] is carried
        return not self._carried

    def _drop_carried(self, carried: Sending) -> None:
        if carried in self._carried:
            self._carried.remove(carried)
            self._notify()  # the next carried one, or the sends waiting behind them

    async def receive(self) -> Message:
        """The next message, waiting for one if none is queued.

        Raises:
            ConnectionClosed: the connection ended, and reconnecting, if on,
                gave up (``__cause__`` says why); every message that arrived
                before is read first.
            trio.ClosedResourceError: the program closed this client and every
                message received before has been read.
        """
        try:
            return await self._deliveries.receive()
        except trio.EndOfChannel:
            final = self._final
        raise trio.ClosedResourceError("the client was closed") if final is None else final()

    def __aiter__(self) -> Client:
        """Every message, in the order relayd sent them; see :meth:`receive`.

        The iteration ends when the program closed the client; it raises
        :class:`ConnectionClosed` when relayd or the network ended it.
        """
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except trio.ClosedResourceError:
            raise StopAsyncIteration from None

    def ids(self) -> AsyncIterator[str]:
        """This client's id now, then its new one after each reconnect.

        A reader that falls behind skips to the latest id. The iteration ends
        when the client is closed for good.
        """
        return _Ids(self)

    async def aclose(self) -> None:
        """Close with 1000, stop reconnecting, and stop every task of the client.

        Idempotent. The closing handshake is bounded by ``close_timeout`` and
        shielded from the caller's cancellation, so that relayd sees a 1000
        even from a program that is being cancelled.
        """
        self._closing = True
        self._notify()  # sends waiting for a reconnect give up
        link = self._link
        if link is not None and link.open:
            with trio.CancelScope(shield=True), trio.move_on_after(self._close_timeout):
                await link.close()
        self._supervisor.cancel()
        with trio.CancelScope(shield=True):
            await self._finished.wait()

    # -- the supervisor ------------------------------------------------------------------

    async def _run(self, backoff: Backoff | None, *, task_status: trio.TaskStatus[None]) -> None:
        """Connect, then keep the client connected as ``backoff`` allows.

        Started by :func:`connect` with ``nursery.start``: the first
        connection's :class:`ConnectError` is raised from there.
        """
        pacing = None if backoff is None else Pacing(backoff)
        try:
            with self._supervisor:
                closed = await self._connection(task_status)
                while True:
                    self._lost(closed)
                    if self._closing or pacing is None or not retryable(closed):
                        self._final = final_error(closed)
                        break
                    # Only a connection that stayed up resets the waits: one closed
                    # at once (1011, 1013, a drop after the welcome) is a failure.
                    pacing.lost_after(trio.current_time() - self._opened_at)
                    outcome = await self._reconnect(pacing)
                    if isinstance(outcome, ConnectError):
                        self._final = final_error(closed, outcome)
                        break
                    closed = outcome
        finally:
            self._deliveries_in.close()
            self._finished.set()
            self._notify()

    async def _reconnect(self, pacing: Pacing) -> CloseInfo | ConnectError:
        """Connect again; the new connection's end, or why there was none."""
        failure = ConnectError(self.url, "no attempt made")
        for delay in pacing.waits():
            await trio.sleep(delay)
            try:
                return await self._connection(None)
            except ConnectError as exc:
                failure = exc
                if not exc.retryable:
                    break
        return failure

    async def _connection(self, task_status: trio.TaskStatus[None] | None) -> CloseInfo:
        """One connection, from connecting to its end."""

        def opened(link: Link) -> None:
            self._opened_at = trio.current_time()
            self._link = link
            link.carried = self._carried
            self._id = link.id
            self._notify()
            if task_status is not None:
                # From now on only aclose() stops the supervisor: a cancelled
                # block reaches aclose() in connect(), whose closing handshake
                # needs trio-websocket's reader, under this scope, still running.
                self._supervisor.shield = True
                task_status.started()

        return await run_link(self._endpoint, self._options, self._deliveries_in, opened)

    def _lost(self, closed: CloseInfo) -> None:
        self._closing = self._closing or closed.by_client
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _usable_link(self) -> Link:
        """The open connection; waits while reconnecting.

        Raises:
            trio.ClosedResourceError: the program closed the client.
            ConnectionClosed: the client is closed for good.
        """
        while True:
            if self._closing:
                raise trio.ClosedResourceError("the client was closed")
            link = self._link
            if link is not None and link.open:
                return link
            if self._final is not None:
                raise self._final()
            await self._changed.wait()


class _Ids:
    """The iterator of :meth:`Client.ids`.

    A plain object, not an async generator: leaving a loop over it early
    needs no clean-up.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._last: str | None = None

    def __aiter__(self) -> _Ids:
        return self

    async def __anext__(self) -> str:
        client = self._client
        while True:
            changed = client._changed
            if client._id != self._last:
                self._last = client._id
                return self._last
            if client._finished.is_set():
                raise StopAsyncIteration
            await changed.wait()


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    dialect: Dialect | Literal["relayd.v1", "seed"] = Dialect.V1,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    close_timeout: float = CLOSE_TIMEOUT_S,
    reconnect: Backoff | None = None,
    max_in_flight: int = MAX_IN_FLIGHT,
    receive_queue: int = RECEIVE_QUEUE,
    max_message_chars: int | None = None,
    keepalive_s: float | None = KEEPALIVE_S,
) -> AsyncIterator[Client]:
    """Connect to relayd; the block is the connection's lifetime.

    Args:
        url: ``ws://HOST:PORT/`` or ``wss://HOST:PORT/``.
        token: sent as ``Authorization: Bearer TOKEN`` (when relayd's
            ``auth.mode`` is on, its subject becomes the client's id).
        ssl_context: for ``wss://``: how to verify the server (default: the
            system's trust store, hostname checked).
        dialect: ``relayd.v1`` (acks, sender ids) or ``seed`` (the original
            post's protocol: no acks, no sender ids).
        connect_timeout: seconds for TCP, TLS, the upgrade and the welcome,
            for the first connection and for each reconnect attempt.
        close_timeout: seconds for the closing handshake when the block ends.
        reconnect: reconnect with this :class:`Backoff` when the connection is
            lost for a reason that may pass (1001, 1006, 1011, 1013, 1000, a
            503...); None (the default) to raise instead. The first connection
            is never retried: its failure is raised here. The waits go on
            growing across connections closed within ``stable_s`` of opening.
        max_in_flight: how many :meth:`Client.send` calls may wait for their
            outcome at once.
        receive_queue: how many received messages wait for the program to
            read them before the client stops reading the socket.
        max_message_chars: the largest message accepted from relayd, in
            characters; a larger one closes the connection with 1009. None (the
            default): 1 MiB, or the limit relayd announced (plus room for the
            sender's id) when that is more, so that no client relayd accepts a
            message from can close this one with it; at most 64 MiB, whatever
            the server announced.
        keepalive_s: ping relayd this often, and drop the connection (1006)
            when the pong is as late; None for no pings.

    Yields:
        The connected client; its :attr:`Client.id` is set.

    Raises:
        ValueError: a bad URL, token, dialect or figure, or an ``ssl_context``
            with a ``ws://`` URL; nothing was connected.
        ConnectError: no connection: :class:`HandshakeRefused` (an HTTP
            status: 401, 403, 503...), :class:`ConnectTimeout`,
            :class:`TLSError`, or the network.
    """
    endpoint, options = check_options(
        url,
        token=token,
        ssl_context=ssl_context,
        dialect=dialect,
        connect_timeout=connect_timeout,
        close_timeout=close_timeout,
        max_in_flight=max_in_flight,
        receive_queue=receive_queue,
        max_message_chars=max_message_chars,
        keepalive_s=keepalive_s,
    )
    client = Client(endpoint, options, receive_queue=receive_queue, close_timeout=close_timeout)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run, reconnect)
            try:
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        raise_alone(group)

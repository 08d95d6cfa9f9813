"""The link to Redis: two connections, a probe, and reconnection (the only coredis user).

Task tree, all owned by :meth:`RedisLink.run`::

    run                 connect; on any failure: log, back off, connect again
    └── session         one connected period; any task failing ends all of it
        ├── publisher   coredis connection: its reader parses replies (PUBLISH
        │               batches, heartbeats) and calls each batch's callback
        ├── subscriber  coredis connection: its reader parses what arrives and
        │               hands each read's messages to Receiver.received
        ├── flushers    one per connection, parked: writes what a socket did
        │               not take at once
        ├── orders      pending (un)subscriptions -> the subscriber, coalesced
        └── probe       every probe_interval_s: heartbeat + a probe to ourselves,
                        which must come back within probe_timeout_s

**Why coredis, and how it is used.** coredis 6.9 is the Redis client that runs
on trio (through anyio); redis-py's asyncio client does not. Its connection
layer (:class:`coredis.connection.TCPConnection`) does the handshake (HELLO 3,
AUTH, SELECT, TLS, unix sockets), the RESP3 parsing in its reader task and
the packing. Its higher parts are not used, and its writing is done here,
for reasons measured on this machine (docs/scaling.md, "The Redis client"):

* its ``PubSub`` queues what arrives without bound, and its ``async for``
  ended silently when Redis restarted; here the subscriber is a plain
  connection whose end is the session's end;
* one request per PUBLISH costs about 20 µs of CPU in coredis (its writer
  yields once per queued command); so each routing pass's messages go out as
  one ``EVALSHA`` of :data:`PUBLISH_SCRIPT`, about 2.3 µs per message;
* a command through coredis costs three steps of its writer task (woken, its
  send's checkpoint, its receive's), a reply two of a task awaiting it, and a
  received message two of a task reading coredis's push buffer plus the
  checkpoint of its "processing budget": 22 task steps per message crossing
  two nodes, where the work is four reads and four writes. So, after the
  handshake, :class:`_Wire` writes commands from the caller's task straight to
  the socket (one ``send``, no checkpoint; a task only for what the socket
  did not take), each reply is taken by a :class:`_Reply` in coredis's reader
  task as it parses it, and what the subscriber receives is handed to the
  receiver from coredis's reader task at the end of each read
  (:class:`_AfterEachRead`). The holder's answers ask for no reply at all
  (``CLIENT REPLY SKIP``). Over TLS the bytes must go through the TLS layer:
  commands are queued for coredis's writer task instead.

This reads three private parts of a coredis 6.9 connection: its request
queue (``_requests``, where each reply is matched to the oldest request: a
:class:`_Reply` is appended in the order its command is written), its packer
(``_packer``) and its push buffer (``_push_message_buffer_out``), and relies
on its reader entering ``processing_budget`` around the parsing of each read
that no request waits for. pyproject.toml keeps coredis to 6.9.x for that, and
tests/test_cluster_link.py exercises each part against a real Redis.

**Bounds** (docs/scaling.md works them out):

* publishing: at most ``publish_buffer_bytes`` of batches wait for Redis's
  answer or for the socket (what the request queue and the unwritten bytes
  hold); past that :meth:`RedisLink.publish` and :meth:`RedisLink.send`
  refuse, and senders are told ``recipient_unreachable``;
* receiving: coredis's reader parses one socket read (64 KiB at most) at a
  time and every message in it is handed to the receiver before it reads
  again; Redis itself cuts a subscriber that falls behind by more than its
  ``client-output-buffer-limit pubsub`` (32 MiB by default).

**Failure detection.** A connection that closes ends the session at once, and
so does a write that fails. A Redis that stops answering (frozen, a network
that drops everything) or a subscription that silently stops delivering
(Centrifugo #1189: a failover behind a proxy) is caught by the probe: the
node publishes to its own channel and expects the probe back on its
subscriber within ``probe_timeout_s``; if it is not, the session ends and the
link reconnects and resubscribes.

Error handling: nothing from Redis escapes :meth:`RedisLink.run`; every
failure is logged (``broker.*`` events) and retried with jittered backoff.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import ssl
from collections.abc import Callable, Iterator
from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import structlog
import trio
from anyio.abc import SocketAttribute
from coredis.connection import (
    BaseConnection,
    TCPConnection,
    TCPLocation,
    UnixDomainSocketConnection,
    UnixDomainSocketLocation,
)
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import RedisError
from coredis.typing import RedisValueT, ResponseType

from relayd.config import ClusterSettings
from relayd.routing.cluster import codec
from relayd.routing.cluster.backoff import Backoff
from relayd.routing.cluster.link import Health, Published, Receiver

__all__ = ["PUBLISH_SCRIPT", "RedisLink", "redact"]

#: Publishes pairs of (channel, message) from ARGV[4...] and returns each
#: PUBLISH's count of receivers. A count of 0 (nobody holds the id) becomes -1
#: while some node is cut off from Redis: a node whose heartbeat (in the
#: sorted set KEYS[1], within ARGV[3] ms) is fresh but which no longer listens
#: on the nodes channel ARGV[1]. Its clients may hold the id, so the sender is
#: told ``recipient_unreachable``, not ``unknown_recipient``. ARGV[2] is unused
#: (kept for the argument layout). One script call per routing pass: one
#: request, one reply, however many messages.
PUBLISH_SCRIPT: Final = b"""
local counts = {}
local cut_off = nil
for i = 4, #ARGV, 2 do
  local n = redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
  if n == 0 then
    if cut_off == nil then
      local t = redis.call('TIME')
      local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      local alive = redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[3]), '+inf')
      local listening = redis.call('PUBSUB', 'NUMSUB', ARGV[1])[2]
      cut_off = alive > listening
    end
    if cut_off then n = -1 end
  end
  counts[#counts + 1] = n
end
return counts
"""

#: A node's heartbeat and probe: records the node (ARGV[1]) as alive now in
#: the sorted set KEYS[1], forgets nodes silent for ten node timeouts (ARGV[4]
#: ms), publishes the probe ARGV[3] on the node's own channel ARGV[2], and
#: returns every heartbeat (name, ms, name, ms...). The node keeps them: after
#: a Redis restart, which forgets them all, it puts them back as they were
#: (``ZADD GT``), so that ids of nodes not yet resubscribed answer
#: ``recipient_unreachable``, not ``unknown_recipient``, until those nodes are
#: back or their heartbeat ages past node_timeout_s.
HEARTBEAT_SCRIPT: Final = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 10 * tonumber(ARGV[4]))
redis.call('PUBLISH', ARGV[2], ARGV[3])
return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
"""

#: Channels per SUBSCRIBE or UNSUBSCRIBE command: resubscribing 100,000 ids
#: takes 100 commands, each a few hundred kilobytes.
CHANNELS_PER_COMMAND: Final = 1000

#: Push messages confirming a SUBSCRIBE or UNSUBSCRIBE, one per channel.
_CONFIRMATIONS: Final = (b"subscribe", b"unsubscribe")


def redact(url: str) -> str:
    """``url`` as it may be logged: the password (never allowed there anyway) masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


class _Lost(Exception):
    """The session is over: a connection closed or failed, or a probe did not come back."""


#: One Redis command as written: its name, then its arguments.
Command = tuple[RedisValueT, ...]

#: Makes a holder's answer ask for no reply: Redis skips the reply of the next command.
_SKIP_REPLY: Final[Command] = (b"CLIENT", b"REPLY", b"SKIP")


class _Reply:
    """The reply to one command, taken in coredis's reader task as it is parsed.

    coredis matches each reply to the oldest entry of the connection's request
    queue: it reads ``current_decode`` and ``current_encoding``, calls
    :meth:`consume`, and when the connection ends calls :meth:`fail` on every
    entry left. That is all an entry needs. ``on_reply`` is called exactly
    once: with the reply, an error reply (a :class:`RedisError`), or the error
    the connection ended with. It runs in coredis's reader task and must not
    wait.
    """

    __slots__ = ("_on_reply", "complete")

    current_decode: Final = False
    current_encoding: Final = "utf-8"

    def __init__(self, on_reply: Callable[[ResponseType | BaseException], None]) -> None:
        self._on_reply = on_reply
        self.complete = False

    def consume(self, response: ResponseType | BaseException) -> None:
        """Take the reply (coredis's reader), or the end of the connection: once."""
        if not self.complete:
            self.complete = True
            self._on_reply(response)

    fail = consume


class _Wire:
    """One Redis connection's outgoing side, once coredis's handshake is done.

    :meth:`send` writes commands from the caller's task: one ``send`` on the
    socket, which never waits and is no checkpoint. What the socket does not
    take is kept (:attr:`unwritten`) and written by :meth:`run` as the socket
    takes it, before anything sent later. Over TLS (``direct`` false) the
    commands are queued for coredis's writer task instead. Either way a
    command's :class:`_Reply` joins coredis's request queue as the command
    is written, so every reply meets its command.

    Resource handling: the session owns the connection and runs :meth:`run`
    in its nursery. Once coredis has closed the socket, :meth:`send` fails
    (the socket object knows it is closed: a descriptor number reused since
    is never written to). Error handling: a write that fails breaks the wire;
    :meth:`send` then refuses, and :meth:`run` raises :class:`_Lost`, which
    ends the session.
    """

    __slots__ = (
        "_broken",
        "_connection",
        "_lot",
        "_pack",
        "_requests",
        "_socket",
        "_unwritten",
        "role",
    )

    def __init__(self, connection: BaseConnection, role: str, *, direct: bool) -> None:
        self.role = role
        self._connection = connection
        self._requests = connection._requests  # coredis's request queue: see the module docstring
        self._pack = connection._packer.pack_commands
        stream = connection.stream
        self._socket = (
            stream.extra(SocketAttribute.raw_socket) if direct and stream is not None else None
        )
        self._unwritten = bytearray()
        self._lot = trio.lowlevel.ParkingLot()  # run, waiting for bytes to write
        self._broken: str | None = None

    @property
    def direct(self) -> bool:
        """Whether commands are written to the socket from the caller's task."""
        return self._socket is not None

    @property
    def unwritten(self) -> int:
        """Bytes sent and not yet taken by the socket."""
        return len(self._unwritten)

    def send(self, commands: list[Command], reply: _Reply | None = None) -> bool:
        """Write ``commands``, without waiting; ``reply`` takes the last one's reply.

        Returns:
            False if nothing was written: the connection is gone (``reply`` is
            then never called).
        """
        if self._broken is not None:
            return False
        sock = self._socket
        if sock is None:
            try:
                for name, *arguments in commands:
                    assert isinstance(name, bytes)
                    self._connection.send_command(name, *arguments)
            except RedisConnectionError:  # not connected (any more): nothing was queued
                return False
        else:
            data = b"".join(self._pack(commands))
            if self._unwritten:
                self._unwritten += data
            else:
                try:
                    sent = sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError as error:  # closed, reset: none of data was written
                    self._broken = f"the {self.role} connection failed: {error}"
                    self._lot.unpark()
                    return False
                if sent < len(data):
                    self._unwritten += memoryview(data)[sent:]
                    self._lot.unpark()
        if reply is not None:
            self._requests.append(reply)  # type: ignore[arg-type]  # what coredis reads of one
        return True

    async def run(self) -> None:
        """Write what the socket did not take at once, as it takes it.

        Raises:
            _Lost: a write failed, here or in :meth:`send`.
        """
        sock, unwritten = self._socket, self._unwritten
        while True:
            while not unwritten and self._broken is None:
                await self._lot.park()
            if self._broken is not None or sock is None:
                raise _Lost(self._broken or f"the {self.role} connection failed")
            try:
                await trio.lowlevel.wait_writable(sock)
                sent = sock.send(unwritten)
            except BlockingIOError:
                continue
            except (OSError, trio.ClosedResourceError) as error:
                raise _Lost(f"the {self.role} connection failed: {error}") from error
            del unwritten[:sent]


class _AfterEachRead:
    """The subscriber's ``processing_budget`` for coredis: hands each read over as it ends.

    coredis's reader enters it around the parsing of every read that no
    request waits for (on the subscriber, every read once it is connected).
    This one never waits and is no checkpoint; on the way out it calls
    ``after``, which takes what the read put in the push buffer. So what Redis
    sends reaches the router in the step of coredis's reader that read it.
    """

    __slots__ = ("_after",)

    def __init__(self, after: Callable[[], None]) -> None:
        self._after = after

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self._after()


class RedisLink:
    """The node's link to Redis (implements :class:`~relayd.routing.cluster.link.Link`).

    Args:
        settings: the ``[cluster]`` settings.
        node: this node's name.
        channels: the cluster's channel names.
        receiver: where received messages go.
        log: the daemon's logger.
        password: the Redis password, read from ``password_file``; None: no AUTH.
    """

    def __init__(
        self,
        settings: ClusterSettings,
        *,
        node: str,
        channels: codec.Channels,
        receiver: Receiver,
        log: structlog.typing.FilteringBoundLogger,
        password: str | None = None,
    ) -> None:
        # coredis logs each failed attempt to connect with a traceback, and each lost
        # connection; the broker.* events say it once, with what relayd does next.
        logging.getLogger("coredis").setLevel(logging.CRITICAL)
        self._settings = settings
        self._node = node
        self._channels = channels
        self._own = channels.of_node(node)
        self._receiver = receiver
        self._log = log
        self._password = password
        self._tls = _tls_context(settings)
        self.health = Health()
        self._backoff = Backoff(settings.reconnect_max_s)
        self._closed = False
        self._stop = trio.CancelScope()
        # Subscriptions wanted, with how many holders each; kept across sessions.
        self._wanted: dict[bytes, int] = {}
        # (Un)subscriptions not yet sent in this session, in order.
        self._orders: list[tuple[bytes, bytes]] = []
        self._orders_lot = trio.lowlevel.ParkingLot()
        self._confirmations: dict[bytes, trio.Event] = {}
        # Publish batches written and not yet answered, oldest first.
        self._outstanding: collections.deque[_Reply] = collections.deque()
        self._publisher: _Wire | None = None
        self._subscriber: _Wire | None = None
        self._subscriber_connection: BaseConnection | None = None
        self._bug: Exception | None = None  # raised in coredis's reader by the receiver
        self._publish_sha = b""
        self._heartbeat_sha = b""
        self._probe_number = 0
        self._probe_back = trio.Event()
        # Every node's last heartbeat (ms of Redis's clock), as the last probe saw them.
        self._heartbeats: dict[bytes, bytes] = {}
        self._changed = trio.lowlevel.ParkingLot()  # up or down

    # -- the router's side ------------------------------------------------------------

    def publish(self, pairs: list[tuple[bytes, bytes]], done: Published) -> bool:  # noqa: D102
        size = sum(len(channel) + len(data) for channel, data in pairs)
        wire = self._wire_for(size)
        if wire is None:
            return False
        arguments: list[RedisValueT] = [
            b"EVALSHA",
            self._publish_sha,
            1,
            self._channels.heartbeats,
            self._channels.nodes,
            b"",
            _ms(self._settings.node_timeout_s),
        ]
        for channel, data in pairs:
            arguments += (channel, data)
        reply = _Reply(functools.partial(self._published, size, done))
        if not wire.send([tuple(arguments)], reply):
            self.health.publish_failures += 1
            return False
        self._outstanding.append(reply)
        self.health.inflight_bytes += size
        self.health.published += len(pairs)
        return True

    def send(self, pairs: list[tuple[bytes, bytes]]) -> bool:  # noqa: D102
        size = sum(len(channel) + len(data) for channel, data in pairs)
        wire = self._wire_for(size)
        if wire is None:
            return False
        commands: list[Command] = []
        for channel, data in pairs:
            commands += (_SKIP_REPLY, (b"PUBLISH", channel, data))
        if not wire.send(commands):
            self.health.publish_failures += 1
            return False
        self.health.published += len(pairs)
        return True

    def _wire_for(self, size: int) -> _Wire | None:
        """Where ``size`` more bytes may be published now; None (a failure) if nowhere.

        The link must be up, and the bytes fit in ``publish_buffer_bytes`` with
        those waiting for Redis's reply and those the socket has not taken.
        """
        health, wire = self.health, self._publisher
        if (
            wire is not None
            and health.up
            and health.inflight_bytes + wire.unwritten + size <= self._settings.publish_buffer_bytes
        ):
            return wire
        health.publish_failures += 1
        return None

    def _published(self, size: int, done: Published, reply: ResponseType | BaseException) -> None:
        """A batch's reply (in coredis's reader task), or the end of its connection."""
        if self._outstanding and self._outstanding[0].complete:
            self._outstanding.popleft()  # replies come in the order batches were written
        health = self.health
        health.inflight_bytes -= size
        if isinstance(reply, list):
            done([int(count) for count in reply])
        else:  # e.g. NOSCRIPT after a SCRIPT FLUSH, or the connection ended
            health.publish_failures += 1
            done(None)

    def subscribe(self, channel: bytes) -> None:  # noqa: D102
        holders = self._wanted.get(channel, 0)
        self._wanted[channel] = holders + 1
        if not holders:
            self._order(b"SUBSCRIBE", channel)

    def unsubscribe(self, channel: bytes) -> None:  # noqa: D102
        holders = self._wanted.get(channel, 0)
        if holders > 1:
            self._wanted[channel] = holders - 1
        elif holders == 1:
            del self._wanted[channel]
            self._order(b"UNSUBSCRIBE", channel)

    async def subscribed(self, channel: bytes) -> None:  # noqa: D102
        if not self.health.up or channel not in self._wanted:
            return
        event = self._confirmations.get(channel)
        if event is None:
            return  # confirmed already
        await event.wait()

    def close(self) -> None:  # noqa: D102
        self._closed = True
        self._stop.cancel()

    async def wait_for(self, condition: Callable[[Health], bool]) -> None:
        """Return once ``condition(health)`` holds, checked at each change; the caller bounds it."""
        while not condition(self.health):
            await self._changed.park()

    def _order(self, command: bytes, channel: bytes) -> None:
        if command == b"SUBSCRIBE":
            self._confirmations.setdefault(channel, trio.Event())
        self._orders.append((command, channel))
        self._orders_lot.unpark()

    # -- the connection's life ---------------------------------------------------------

    async def run(  # noqa: D102
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        with self._stop:
            while not self._closed:
                reason = await self._session()
                if self._closed:
                    break
                wait = self._backoff.next_wait()
                lost = reason.startswith("lost: ")
                self._log.warning(
                    "broker.lost" if lost else "broker.unreachable",
                    url=redact(self._settings.broker_url),
                    node=self._node,
                    reason=reason.removeprefix("lost: "),
                    retry_in_s=round(wait, 3),
                )
                await trio.sleep(wait)

    async def _session(self) -> str:
        """Connect, serve until the link breaks; why it ended (``lost: ...`` once it was up)."""
        reason = "closed"
        self._bug = None
        try:
            async with trio.open_nursery() as nursery:
                publisher, subscriber = await self._connect(nursery)
                nursery.start_soon(self._send_orders, subscriber)
                with trio.fail_after(self._settings.connect_timeout_s):
                    await self._restore_heartbeats(publisher)
                    await self._resubscribe(subscriber)
                await self._first_probe(publisher)
                self._up(len(self._wanted))
                await self._probe(publisher)
        except* _Lost as group:
            reason = str(_first(group))
        except* (RedisError, OSError, trio.TooSlowError) as group:
            error = _first(group)
            reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        except* Exception as group:
            # A bug here must not take the node down: its own clients are
            # served without the broker. Logged with the traceback, retried.
            error = _first(group)
            reason = f"{type(error).__name__}: {error}"
            self._log.error("error", summary=f"broker link: {reason}", exc_info=group)
        finally:
            was_up = self._down()
            if not was_up:
                self.health.failed_attempts += 1
            self._changed.unpark_all()
        return f"lost: {reason}" if was_up else reason

    async def _connect(self, nursery: trio.Nursery) -> tuple[_Wire, _Wire]:
        """Open both connections and load the scripts, within ``connect_timeout_s``."""
        direct = self._tls is None  # a TLS stream must see every byte written
        with trio.fail_after(self._settings.connect_timeout_s):
            publisher = self._connection("publisher")
            subscriber = self._connection("subscriber", after_each_read=self._take_pushes)
            self._subscriber_connection = subscriber
            await nursery.start(self._hold, publisher)
            await nursery.start(self._hold, subscriber)
            wires = _Wire(publisher, "publisher", direct=direct)
            subscriptions = _Wire(subscriber, "subscriber", direct=direct)
            for wire in (wires, subscriptions):
                if wire.direct:
                    nursery.start_soon(wire.run)
            self._publish_sha = _bytes(await _call(wires, b"SCRIPT", b"LOAD", PUBLISH_SCRIPT))
            self._heartbeat_sha = _bytes(await _call(wires, b"SCRIPT", b"LOAD", HEARTBEAT_SCRIPT))
        self._publisher, self._subscriber = wires, subscriptions
        return wires, subscriptions

    def _connection(
        self, role: str, *, after_each_read: Callable[[], None] | None = None
    ) -> BaseConnection:
        url = urlsplit(self._settings.broker_url)
        common = {
            "connect_timeout": self._settings.connect_timeout_s,
            "client_name": f"relayd:{self._node}:{role}",
            "username": unquote(url.username) if url.username else None,
            "password": self._password,
        }
        if after_each_read is not None:
            common["processing_budget"] = _AfterEachRead(after_each_read)
        if url.scheme == "unix":
            db = int(parse_qs(url.query).get("db", ["0"])[0])
            return UnixDomainSocketConnection(
                UnixDomainSocketLocation(url.path),
                db=db,
                **common,  # type: ignore[arg-type]
            )
        return TCPConnection(
            TCPLocation(url.hostname or "", url.port or 6379),
            db=int(url.path.strip("/") or 0),
            ssl_context=self._tls,
            socket_keepalive=True,
            **common,  # type: ignore[arg-type]
        )

    async def _hold(
        self,
        connection: BaseConnection,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``connection``; its end (it returns when Redis closes it) ends the session.

        Raises:
            _Lost: the connection ended.
            Exception: what the receiver raised in the connection's reader
                (a bug: coredis would only have closed the connection).
        """
        await connection.run(task_status=task_status)
        if self._bug is not None:
            raise self._bug
        raise _Lost("a connection to Redis closed")

    async def _restore_heartbeats(self, publisher: _Wire) -> None:
        """Put back the other nodes' heartbeats as last seen (a restarted Redis has none)."""
        others = [
            value
            for node, ms in self._heartbeats.items()
            if node != self._node.encode()
            for value in (ms, node)
        ]
        if others:
            await _call(publisher, b"ZADD", self._channels.heartbeats, b"GT", *others)

    async def _resubscribe(self, subscriber: _Wire) -> None:
        """Subscribe the node's channels and every wanted id; wait for the last confirmation."""
        channels = [self._channels.nodes, self._own, *self._wanted]
        self._orders.clear()  # everything wanted is in this list
        for channel in self._wanted:
            self._confirmations.setdefault(channel, trio.Event())
        last = channels[-1]
        self._confirmations.setdefault(last, trio.Event())
        subscriptions: list[Command] = [(b"SUBSCRIBE", *chunk) for chunk in _chunks(channels)]
        if not subscriber.send(subscriptions):
            raise _Lost("the subscriber connection failed")
        await self._confirmations[last].wait()

    def _take_pushes(self) -> None:
        """Hand what the subscriber's last read brought to the receiver (in coredis's reader).

        Raises:
            Exception: what the receiver raised (a bug), after noting it for
                :meth:`_hold`.
        """
        connection = self._subscriber_connection
        if connection is None:
            return
        # The one private buffer read (see the module docstring), emptied at each read.
        buffer = connection._push_message_buffer_out
        receiver, own, health = self._receiver, self._own, self.health
        batch: list[tuple[bytes, bytes]] = []
        while True:
            try:
                item = buffer.receive_nowait()
            except anyio.WouldBlock:
                break
            kind = item[0]
            if kind == b"message" and len(item) == 3:
                channel, data = item[1], item[2]
                if (
                    isinstance(channel, bytes)
                    and isinstance(data, bytes)
                    and (channel != own or not self._is_probe(data))
                ):
                    batch.append((channel, data))
            elif kind in _CONFIRMATIONS and len(item) == 3:
                if kind == b"subscribe" and isinstance(item[1], bytes):
                    confirmed = self._confirmations.pop(item[1], None)
                    if confirmed is not None:
                        confirmed.set()
                if isinstance(item[2], int):  # the count Redis holds for us now
                    health.subscriptions = item[2]
                    self._changed.unpark_all()
        if batch:
            health.received += len(batch)
            try:
                receiver.received(batch)
            except Exception as error:
                self._bug = error
                raise

    def _is_probe(self, data: bytes) -> bool:
        """Whether ``data``, on this node's channel, is a probe (noting the awaited one)."""
        try:
            message = codec.decode(data)
        except Exception:  # msgspec.DecodeError: left to the receiver to count
            return False
        if not isinstance(message, codec.Probe):
            return False
        if message.number == self._probe_number:
            self._probe_back.set()
        return True

    async def _send_orders(self, subscriber: _Wire) -> None:
        """Send (un)subscriptions as they come, consecutive ones of a kind in one command."""
        while True:
            while not self._orders:
                await self._orders_lot.park()
            orders, self._orders = self._orders, []
            commands: list[Command] = [
                (command, *chunk)
                for command, channels in _coalesce(orders)
                for chunk in _chunks(channels)
            ]
            if not subscriber.send(commands):
                raise _Lost("the subscriber connection failed")

    async def _first_probe(self, publisher: _Wire) -> None:
        with trio.fail_after(self._settings.probe_timeout_s):
            await self._probe_once(publisher)

    async def _probe(self, publisher: _Wire) -> None:
        """Probe every ``probe_interval_s``; raise :class:`_Lost` when one is late."""
        settings = self._settings
        while True:
            await trio.sleep(settings.probe_interval_s)
            with trio.move_on_after(settings.probe_timeout_s) as waiting:
                await self._probe_once(publisher)
            if waiting.cancelled_caught:
                raise _Lost(f"a probe did not come back within {settings.probe_timeout_s} s")

    async def _probe_once(self, publisher: _Wire) -> None:
        self._probe_number += 1
        self._probe_back = trio.Event()
        probe = codec.encode(codec.Probe(self._node, self._probe_number))
        started = trio.current_time()
        heartbeats = await _call(
            publisher,
            b"EVALSHA",
            self._heartbeat_sha,
            1,
            self._channels.heartbeats,
            self._node,
            self._own,
            probe,
            _ms(self._settings.node_timeout_s),
        )
        if isinstance(heartbeats, list):
            pairs = [value for value in heartbeats if isinstance(value, bytes)]
            self._heartbeats = dict(zip(pairs[::2], pairs[1::2], strict=False))
        await self._probe_back.wait()
        self.health.probe_rtt_s = trio.current_time() - started

    def _up(self, resubscribed: int) -> None:
        health = self.health
        health.up = True
        health.connects += 1
        self._changed.unpark_all()
        self._backoff.reset()
        self._log.info(
            "broker.connected",
            url=redact(self._settings.broker_url),
            node=self._node,
            resubscribed=resubscribed,
            probe_rtt_ms=round(health.probe_rtt_s * 1000, 3),
        )

    def _down(self) -> bool:
        """After a session: fail what was in flight, release waiters, tell the router.

        Returns:
            Whether the link had been up.
        """
        health = self.health
        was_up, health.up = health.up, False
        self._publisher = self._subscriber = None
        self._subscriber_connection = None
        if was_up:
            health.losses += 1
        for confirmed in self._confirmations.values():
            confirmed.set()
        self._confirmations.clear()
        self._orders.clear()
        # coredis failed every reply still queued as its connection ended; a
        # batch written after that (while the session was ending) is failed here.
        outstanding, self._outstanding = self._outstanding, collections.deque()
        for reply in outstanding:
            reply.fail(RedisConnectionError("the link to Redis broke"))
        health.inflight_bytes = 0
        self._receiver.link_down()
        return was_up

    async def leave(self) -> None:
        """Remove this node's heartbeat, so that its ids answer ``unknown_recipient`` at once."""
        publisher = self._publisher
        if publisher is None or not self.health.up:
            return
        with (
            trio.move_on_after(self._settings.connect_timeout_s),
            contextlib.suppress(RedisError, _Lost),
        ):
            await _call(publisher, b"ZREM", self._channels.heartbeats, self._node)


async def _call(wire: _Wire, *command: RedisValueT) -> ResponseType:
    """Send one command and wait for its reply; the caller bounds the wait.

    Raises:
        _Lost: the connection is gone.
        RedisError: Redis answered with an error, or the connection ended first.
    """
    done = trio.Event()
    replies: list[ResponseType | BaseException] = []

    def on_reply(reply: ResponseType | BaseException) -> None:
        replies.append(reply)
        done.set()

    if not wire.send([command], _Reply(on_reply)):
        raise _Lost(f"the {wire.role} connection failed")
    await done.wait()
    reply = replies[0]
    if isinstance(reply, BaseException):
        raise reply
    return reply


def _first(group: BaseExceptionGroup[Exception]) -> Exception:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, Exception)
    return error


def _tls_context(settings: ClusterSettings) -> ssl.SSLContext | None:
    if urlsplit(settings.broker_url).scheme != "rediss":
        return None
    return ssl.create_default_context(cafile=settings.tls_ca_file or None)


def _ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)


def _bytes(reply: object) -> bytes:
    if isinstance(reply, str):
        return reply.encode()
    if isinstance(reply, bytes):
        return reply
    raise _Lost(f"unexpected reply from Redis: {reply!r}")


def _chunks(channels: list[bytes]) -> Iterator[list[bytes]]:
    for start in range(0, len(channels), CHANNELS_PER_COMMAND):
        yield channels[start : start + CHANNELS_PER_COMMAND]


def _coalesce(orders: list[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, list[bytes]]]:
    """Runs of consecutive orders of one kind, in order: ``(command, channels)``."""
    run: list[bytes] = []
    kind = b""
    for command, channel in orders:
        if command != kind and run:
            yield kind, run
            run = []
        kind = command
        run.append(channel)
    if run:
        yield kind, run

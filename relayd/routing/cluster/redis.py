"""The link to Redis: two connections, a probe, and reconnection (the only coredis user).

Task tree, all owned by :meth:`RedisLink.run`::

    run                 connect; on any failure: log, back off, connect again
    └── session         one connected period; any task failing ends all of it
        ├── publisher   coredis connection: PUBLISH batches, heartbeats
        ├── subscriber  coredis connection: SUBSCRIBE/UNSUBSCRIBE, messages in
        ├── reader      subscriber's messages -> Receiver.received, batched
        ├── answers     publisher's replies, in order -> each batch's callback
        ├── orders      pending (un)subscriptions -> the subscriber, coalesced
        └── probe       every probe_interval_s: heartbeat + a probe to ourselves,
                        which must come back within probe_timeout_s

**Why coredis, and how it is used.** coredis 6.9 is the Redis client that runs
on trio (through anyio); redis-py's asyncio client does not. Its connection
layer (:class:`coredis.connection.TCPConnection`) does the handshake (HELLO 3,
AUTH, SELECT, TLS, unix sockets), the RESP3 parsing and the packing. Two of its
higher parts are not used, for reasons measured on this machine
(docs/scaling.md, "The Redis client"):

* its ``PubSub`` queues what arrives without bound, and its ``async for``
  ended silently when Redis restarted; here the subscriber is a plain
  connection whose end is the session's end;
* one request per PUBLISH costs about 20 µs of CPU in coredis (its writer
  yields once per queued command); so each routing pass's messages go out as
  one ``EVALSHA`` of :data:`PUBLISH_SCRIPT`, about 2.3 µs per message.

**Bounds** (docs/scaling.md works them out):

* publishing: at most ``publish_buffer_bytes`` of batches wait for Redis's
  answer (what coredis holds in its write buffer and request queue); past
  that :meth:`RedisLink.publish` refuses, and senders are told
  ``recipient_unreachable``;
* receiving: coredis's reader parses at most one socket read (64 KiB) per
  scheduling round into its push buffer, and :meth:`RedisLink._read` empties
  that buffer whenever it runs, without waiting in between (the one private
  attribute read, ``_push_message_buffer_out``: its public iterator takes one
  message per scheduling round, so the buffer would grow under load); Redis
  itself cuts a subscriber that falls behind by more than its
  ``client-output-buffer-limit pubsub`` (32 MiB by default).

**Failure detection.** A connection that closes ends the session at once. A
Redis that stops answering (frozen, a network that drops everything) or a
subscription that silently stops delivering (Centrifugo #1189: a failover
behind a proxy) is caught by the probe: the node publishes to its own channel
and expects the probe back on its subscriber within ``probe_timeout_s``; if it
is not, the session ends and the link reconnects and resubscribes.

Error handling: nothing from Redis escapes :meth:`RedisLink.run`; every
failure is logged (``broker.*`` events) and retried with jittered backoff.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import ssl
from collections.abc import Callable, Iterator
from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit

import structlog
import trio
from coredis.connection import (
    BaseConnection,
    TCPConnection,
    TCPLocation,
    UnixDomainSocketConnection,
    UnixDomainSocketLocation,
)
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import RedisError
from coredis.typing import ResponseType

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
    """The session is over: a connection closed, or a probe did not come back."""


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
        # Batches sent and not yet answered, oldest first: (request, bytes, done).
        self._answers: collections.deque[tuple[object, int, Published]] = collections.deque()
        self._answers_lot = trio.lowlevel.ParkingLot()
        self._publisher: BaseConnection | None = None
        self._publish_sha = b""
        self._heartbeat_sha = b""
        self._probe_number = 0
        self._probe_back = trio.Event()
        # Every node's last heartbeat (ms of Redis's clock), as the last probe saw them.
        self._heartbeats: dict[bytes, bytes] = {}
        self._changed = trio.lowlevel.ParkingLot()  # up or down

    # -- the router's side ------------------------------------------------------------

    def publish(self, pairs: list[tuple[bytes, bytes]], done: Published) -> bool:  # noqa: D102
        health = self.health
        publisher = self._publisher
        size = sum(len(channel) + len(data) for channel, data in pairs)
        if (
            publisher is None
            or not health.up
            or health.inflight_bytes + size > self._settings.publish_buffer_bytes
        ):
            health.publish_failures += 1
            return False
        arguments: list[bytes | int] = [
            self._channels.nodes,
            b"",
            _ms(self._settings.node_timeout_s),
        ]
        for channel, data in pairs:
            arguments += (channel, data)
        try:
            request = publisher.create_request(
                b"EVALSHA", self._publish_sha, 1, self._channels.heartbeats, *arguments
            )
        except RedisConnectionError:
            # The connection broke and the session has not ended yet: nothing was sent.
            health.publish_failures += 1
            return False
        health.inflight_bytes += size
        health.published += len(pairs)
        self._answers.append((request, size, done))
        self._answers_lot.unpark()
        return True

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
        try:
            async with trio.open_nursery() as nursery:
                publisher, subscriber = await self._connect(nursery)
                self._publisher = publisher
                nursery.start_soon(self._read, subscriber)
                nursery.start_soon(self._answer, publisher)
                nursery.start_soon(self._send_orders, subscriber)
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

    async def _connect(self, nursery: trio.Nursery) -> tuple[BaseConnection, BaseConnection]:
        """Open both connections and load the scripts, within ``connect_timeout_s``."""
        with trio.fail_after(self._settings.connect_timeout_s):
            publisher = self._connection("publisher")
            subscriber = self._connection("subscriber")
            await nursery.start(_hold, publisher)
            await nursery.start(_hold, subscriber)
            self._publish_sha = _bytes(
                await publisher.create_request(b"SCRIPT", b"LOAD", PUBLISH_SCRIPT)
            )
            self._heartbeat_sha = _bytes(
                await publisher.create_request(b"SCRIPT", b"LOAD", HEARTBEAT_SCRIPT)
            )
        return publisher, subscriber

    def _connection(self, role: str) -> BaseConnection:
        url = urlsplit(self._settings.broker_url)
        common = {
            "connect_timeout": self._settings.connect_timeout_s,
            "client_name": f"relayd:{self._node}:{role}",
            "username": unquote(url.username) if url.username else None,
            "password": self._password,
        }
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

    async def _restore_heartbeats(self, publisher: BaseConnection) -> None:
        """Put back the other nodes' heartbeats as last seen (a restarted Redis has none)."""
        others = [
            value
            for node, ms in self._heartbeats.items()
            if node != self._node.encode()
            for value in (ms, node)
        ]
        if others:
            await publisher.create_request(b"ZADD", self._channels.heartbeats, b"GT", *others)

    async def _resubscribe(self, subscriber: BaseConnection) -> None:
        """Subscribe the node's channels and every wanted id; wait for the last confirmation."""
        channels = [self._channels.nodes, self._own, *self._wanted]
        self._orders.clear()  # everything wanted is in this list
        for channel in self._wanted:
            self._confirmations.setdefault(channel, trio.Event())
        last = channels[-1]
        self._confirmations.setdefault(last, trio.Event())
        for chunk in _chunks(channels):
            subscriber.send_command(b"SUBSCRIBE", *chunk)
        with trio.fail_after(self._settings.connect_timeout_s):
            await self._confirmations[last].wait()

    async def _read(self, subscriber: BaseConnection) -> None:
        """Hand every received message to the receiver, a whole buffer at a time."""
        # The one private attribute read (see the module docstring): the
        # public iterator over it yields one message per scheduling round.
        buffer = subscriber._push_message_buffer_out
        receiver, own, health = self._receiver, self._own, self.health
        while True:
            try:
                first = await buffer.receive()
            except Exception as error:  # anyio's EndOfStream, ClosedResourceError
                raise _Lost("the subscriber connection closed") from error
            batch: list[tuple[bytes, bytes]] = []
            item: list[ResponseType] | None = first
            while item is not None:
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
                try:
                    item = buffer.receive_nowait()
                except Exception:  # anyio.WouldBlock: the buffer is empty
                    item = None
            if batch:
                health.received += len(batch)
                receiver.received(batch)

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

    async def _answer(self, publisher: BaseConnection) -> None:
        """Take Redis's reply to each batch, in order, and call its callback."""
        answers, health = self._answers, self.health
        while True:
            while not answers:
                await self._answers_lot.park()
            request, size, done = answers[0]
            try:
                reply = await request  # type: ignore[misc]
            except RedisConnectionError as error:
                raise _Lost("the publisher connection closed") from error
            except RedisError:
                reply = None  # e.g. NOSCRIPT after a SCRIPT FLUSH
            answers.popleft()
            health.inflight_bytes -= size
            if isinstance(reply, list):
                done([int(count) for count in reply])
            else:
                health.publish_failures += 1
                done(None)

    async def _send_orders(self, subscriber: BaseConnection) -> None:
        """Send (un)subscriptions as they come, consecutive ones of a kind in one command."""
        while True:
            while not self._orders:
                await self._orders_lot.park()
            orders, self._orders = self._orders, []
            for command, channels in _coalesce(orders):
                for chunk in _chunks(channels):
                    subscriber.send_command(command, *chunk)

    async def _first_probe(self, publisher: BaseConnection) -> None:
        with trio.fail_after(self._settings.probe_timeout_s):
            await self._probe_once(publisher)

    async def _probe(self, publisher: BaseConnection) -> None:
        """Probe every ``probe_interval_s``; raise :class:`_Lost` when one is late."""
        settings = self._settings
        while True:
            await trio.sleep(settings.probe_interval_s)
            with trio.move_on_after(settings.probe_timeout_s) as waiting:
                await self._probe_once(publisher)
            if waiting.cancelled_caught:
                raise _Lost(f"a probe did not come back within {settings.probe_timeout_s} s")

    async def _probe_once(self, publisher: BaseConnection) -> None:
        self._probe_number += 1
        self._probe_back = trio.Event()
        probe = codec.encode(codec.Probe(self._node, self._probe_number))
        started = trio.current_time()
        heartbeats = await publisher.create_request(
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
        self._publisher = None
        if was_up:
            health.losses += 1
        answers, self._answers = self._answers, collections.deque()
        health.inflight_bytes = 0
        for confirmed in self._confirmations.values():
            confirmed.set()
        self._confirmations.clear()
        self._orders.clear()
        for _request, _size, done in answers:
            health.publish_failures += 1
            done(None)
        self._receiver.link_down()
        return was_up

    async def leave(self) -> None:
        """Remove this node's heartbeat, so that its ids answer ``unknown_recipient`` at once."""
        publisher = self._publisher
        if publisher is None or not self.health.up:
            return
        with trio.move_on_after(self._settings.connect_timeout_s), contextlib.suppress(RedisError):
            await publisher.create_request(b"ZREM", self._channels.heartbeats, self._node)


async def _hold(
    connection: BaseConnection, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run ``connection``; its end (it returns when Redis closes it) ends the session."""
    await connection.run(task_status=task_status)
    raise _Lost("a connection to Redis closed")


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

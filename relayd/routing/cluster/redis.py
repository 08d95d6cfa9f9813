"""The link to Redis: two connections, a probe, and reconnection (coredis underneath).

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
layer does the handshake (HELLO 3, AUTH, SELECT, TLS, unix sockets), the RESP3
parsing in its reader task and the packing. Its higher parts are not used: its
``PubSub`` queues what arrives without bound, and its ``async for`` ended
silently when Redis restarted; here the subscriber is a plain connection whose
end is the session's end. Its writing is not used either, for the task steps
it costs per message (docs/scaling.md, "The Redis client"). The parts, each in
its module:

* :mod:`~.redis_connection`: the connections made from the settings;
* :mod:`~.redis_wire`: commands written from the caller's task, replies taken
  as coredis parses them;
* :mod:`~.redis_publisher`: publish batches and answers, within
  ``publish_buffer_bytes``;
* :mod:`~.redis_subscriber`: the subscriptions, and what arrives handed over;
* :mod:`~.redis_probe`: the probe and the nodes' heartbeats.

**Failure detection.** A connection that closes ends the session at once, and
so does a write that fails; a Redis that stops answering, or a subscription
that silently stops delivering, is caught by the probe. The link then
reconnects and resubscribes.

Error handling: nothing from Redis escapes :meth:`RedisLink.run`; every
failure is logged (``broker.*`` events) and retried with jittered backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import structlog
import trio
from coredis.connection import BaseConnection
from coredis.exceptions import RedisError

from relayd.config import ClusterSettings
from relayd.routing.cluster import codec
from relayd.routing.cluster.backoff import Backoff
from relayd.routing.cluster.link import Health, Published, Receiver
from relayd.routing.cluster.redis_connection import open_connection, redact, tls_context
from relayd.routing.cluster.redis_probe import Prober
from relayd.routing.cluster.redis_publisher import Publisher
from relayd.routing.cluster.redis_subscriber import Reader, Subscriptions
from relayd.routing.cluster.redis_wire import Lost, Wire

__all__ = ["RedisLink"]


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

    #: The publisher's own methods, bound rather than wrapped: the router
    #: calls them at every routing pass.
    publish: Callable[[list[tuple[bytes, bytes]], Published], bool]
    ask: Callable[[list[tuple[bytes, bytes]], Published], bool]
    send: Callable[[list[tuple[bytes, bytes]]], bool]

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
        self._receiver = receiver
        self._log = log
        self._password = password
        self._tls = tls_context(settings)
        self.health = health = Health()
        self._backoff = Backoff(settings.reconnect_max_s)
        self._closed = False
        self._stop = trio.CancelScope()
        self._changed = trio.lowlevel.ParkingLot()  # up or down, or the subscriptions' count
        self._attempted = trio.Event()  # the first session is up, or has failed
        own = channels.of_node(node)
        self._publisher = Publisher(settings, channels, health, self._script_lost)
        self._prober = Prober(settings, node, channels, health, self._twin_found, self._script_lost)
        self._subscriptions = Subscriptions([channels.nodes, own], health)
        self._reader = Reader(
            own, receiver, self._subscriptions, self._prober, health, self._changed
        )
        self.publish = self._publisher.publish
        self.ask = self._publisher.ask
        self.send = self._publisher.send

    # -- the router's side ------------------------------------------------------------

    def subscribe(self, channel: bytes) -> None:  # noqa: D102
        self._subscriptions.subscribe(channel)

    def unsubscribe(self, channel: bytes) -> None:  # noqa: D102
        self._subscriptions.unsubscribe(channel)

    async def subscribed(self, channel: bytes) -> None:  # noqa: D102
        await self._subscriptions.subscribed(channel)

    async def first_attempt(self) -> None:  # noqa: D102
        await self._attempted.wait()

    def close(self) -> None:  # noqa: D102
        self._closed = True
        self._stop.cancel()

    async def wait_for(self, condition: Callable[[Health], bool]) -> None:
        """Return once ``condition(health)`` holds, checked at each change; the caller bounds it."""
        while not condition(self.health):
            await self._changed.park()

    async def leave(self) -> None:
        """Remove this node's heartbeat, so that its ids answer ``unknown_recipient`` at once."""
        publisher = self._publisher.wire
        if publisher is None or not self.health.up:
            return
        await self._prober.leave(publisher)

    # -- the connection's life ---------------------------------------------------------

    def _twin_found(self) -> None:
        # Said once: the names stay the same until an operator changes one.
        self._log.error(
            "broker.duplicate_name",
            url=redact(self._settings.broker_url),
            node=self._node,
            detail="another node uses this node's name: give each node its own node_name",
        )

    def _script_lost(self, script: str) -> None:
        # Once per loss and script: the publisher reloads once for all the batches
        # refused meanwhile, and the probe's reload runs with its retry.
        self._log.warning(
            "broker.script_reloaded",
            url=redact(self._settings.broker_url),
            node=self._node,
            script=script,
        )

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
        self._reader.bug = None
        try:
            async with trio.open_nursery() as nursery:
                publisher, subscriber = await self._connect(nursery)
                nursery.start_soon(self._subscriptions.send_orders, subscriber)
                with trio.fail_after(self._settings.connect_timeout_s):
                    await self._prober.restore_heartbeats(publisher)
                    await self._subscriptions.restore(subscriber)
                await self._prober.first(publisher)
                self._up(len(self._subscriptions))
                await self._prober.watch(publisher)
        except* Lost as group:
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
            self._attempted.set()
        return f"lost: {reason}" if was_up else reason

    async def _connect(self, nursery: trio.Nursery) -> tuple[Wire, Wire]:
        """Open both connections and load the scripts, within ``connect_timeout_s``."""
        direct = self._tls is None  # a TLS stream must see every byte written
        settings, name = self._settings, f"relayd:{self._node}"
        with trio.fail_after(settings.connect_timeout_s):
            publisher = open_connection(
                settings, client_name=f"{name}:publisher", password=self._password, tls=self._tls
            )
            subscriber = open_connection(
                settings,
                client_name=f"{name}:subscriber",
                password=self._password,
                tls=self._tls,
                after_each_read=self._reader.take,
            )
            self._reader.connection = subscriber
            await nursery.start(self._hold, publisher)
            await nursery.start(self._hold, subscriber)
            wires = Wire(publisher, "publisher", direct=direct)
            subscriptions = Wire(subscriber, "subscriber", direct=direct)
            for wire in (wires, subscriptions):
                if wire.direct:
                    nursery.start_soon(wire.run)
            await self._publisher.load(wires)
            await self._prober.load(wires)
        return wires, subscriptions

    async def _hold(
        self,
        connection: BaseConnection,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``connection``; its end (it returns when Redis closes it) ends the session.

        Raises:
            Lost: the connection ended.
            Exception: what the receiver raised in the connection's reader
                (a bug: coredis would only have closed the connection).
        """
        await connection.run(task_status=task_status)
        if self._reader.bug is not None:
            raise self._reader.bug
        raise Lost("a connection to Redis closed")

    def _up(self, resubscribed: int) -> None:
        health = self.health
        health.up = True
        health.connects += 1
        self._changed.unpark_all()
        self._attempted.set()
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
        health.subscriptions = 0  # its connections are closed: Redis holds none for it
        self._reader.connection = None
        if was_up:
            health.losses += 1
        self._subscriptions.release()
        self._publisher.detach()
        self._receiver.link_down()
        return was_up


def _first(group: BaseExceptionGroup[Exception]) -> Exception:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, Exception)
    return error

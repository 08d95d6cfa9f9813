"""The probe that tells a link to Redis works, and the heartbeats that say which nodes are alive.

A Redis that stops answering (frozen, a network that drops everything) or a
subscription that silently stops delivering (Centrifugo #1189: a failover
behind a proxy) is found out by the probe: every ``probe_interval_s`` the node
runs :data:`HEARTBEAT_SCRIPT`, which records its heartbeat and publishes a
probe on the node's own channel, and expects the probe back on its subscriber
within ``probe_timeout_s``; if it is not, :class:`~.redis_wire.Lost` ends the
session and the link reconnects and resubscribes.

The heartbeats (a sorted set: node name, Redis's clock in ms) are how
:data:`~.redis_publisher.PUBLISH_SCRIPT` tells a node cut off from Redis
(``recipient_unreachable``) from an id nobody holds (``unknown_recipient``).
"""

from __future__ import annotations

import contextlib
from typing import Final

import trio
from coredis.exceptions import RedisError

from relayd.config import ClusterSettings
from relayd.routing.cluster import codec
from relayd.routing.cluster.link import Health
from relayd.routing.cluster.redis_wire import Lost, Wire, as_bytes, call, ms

__all__ = ["HEARTBEAT_SCRIPT", "Prober"]

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


class Prober:
    """Probes the link within a session, and keeps every node's last heartbeat across sessions.

    Args:
        settings: the ``[cluster]`` settings.
        node: this node's name.
        channels: the cluster's channel names.
        health: the link's health (the probe's round trip kept there).

    Error handling: the probe's methods raise :class:`~.redis_wire.Lost`
    (or :class:`RedisError`) for the session to end; :meth:`is_probe` runs
    in coredis's reader and never raises.
    """

    __slots__ = (
        "_back",
        "_channels",
        "_health",
        "_heartbeats",
        "_node",
        "_number",
        "_own",
        "_settings",
        "_sha",
    )

    def __init__(
        self, settings: ClusterSettings, node: str, channels: codec.Channels, health: Health
    ) -> None:
        self._settings = settings
        self._node = node
        self._channels = channels
        self._own = channels.of_node(node)
        self._health = health
        self._sha = b""
        self._number = 0
        self._back = trio.Event()
        # Every node's last heartbeat (ms of Redis's clock), as the last probe saw them.
        self._heartbeats: dict[bytes, bytes] = {}

    async def load(self, publisher: Wire) -> None:
        """Load :data:`HEARTBEAT_SCRIPT` (each session: a restarted Redis has forgotten it)."""
        self._sha = as_bytes(await call(publisher, b"SCRIPT", b"LOAD", HEARTBEAT_SCRIPT))

    async def restore_heartbeats(self, publisher: Wire) -> None:
        """Put back the other nodes' heartbeats as last seen (a restarted Redis has none)."""
        others = [
            value
            for node, at in self._heartbeats.items()
            if node != self._node.encode()
            for value in (at, node)
        ]
        if others:
            await call(publisher, b"ZADD", self._channels.heartbeats, b"GT", *others)

    def is_probe(self, data: bytes) -> bool:
        """Whether ``data``, on this node's channel, is a probe (noting the awaited one)."""
        try:
            message = codec.decode(data)
        except Exception:  # msgspec.DecodeError: left to the receiver to count
            return False
        if not isinstance(message, codec.Probe):
            return False
        if message.number == self._number:
            self._back.set()
        return True

    async def first(self, publisher: Wire) -> None:
        """The session's first probe; it must come back within ``probe_timeout_s``.

        Raises:
            trio.TooSlowError: it did not.
        """
        with trio.fail_after(self._settings.probe_timeout_s):
            await self._once(publisher)

    async def watch(self, publisher: Wire) -> None:
        """Probe every ``probe_interval_s``; raise :class:`Lost` when one is late."""
        settings = self._settings
        while True:
            await trio.sleep(settings.probe_interval_s)
            with trio.move_on_after(settings.probe_timeout_s) as waiting:
                await self._once(publisher)
            if waiting.cancelled_caught:
                raise Lost(f"a probe did not come back within {settings.probe_timeout_s} s")

    async def _once(self, publisher: Wire) -> None:
        self._number += 1
        self._back = trio.Event()
        probe = codec.encode(codec.Probe(self._node, self._number))
        started = trio.current_time()
        heartbeats = await call(
            publisher,
            b"EVALSHA",
            self._sha,
            1,
            self._channels.heartbeats,
            self._node,
            self._own,
            probe,
            ms(self._settings.node_timeout_s),
        )
        if isinstance(heartbeats, list):
            pairs = [value for value in heartbeats if isinstance(value, bytes)]
            self._heartbeats = dict(zip(pairs[::2], pairs[1::2], strict=False))
        await self._back.wait()
        self._health.probe_rtt_s = trio.current_time() - started

    async def leave(self, publisher: Wire) -> None:
        """Remove this node's heartbeat, so that its ids answer ``unknown_recipient`` at once."""
        with (
            trio.move_on_after(self._settings.connect_timeout_s),
            contextlib.suppress(RedisError, Lost),
        ):
            await call(publisher, b"ZREM", self._channels.heartbeats, self._node)

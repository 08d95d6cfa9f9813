"""The probe that tells a link to Redis works, and the heartbeats that say which nodes are alive.

A Redis that stops answering (frozen, a network that drops everything) or a
subscription that silently stops delivering (Centrifugo #1189: a failover
behind a proxy) is found out by the probe: every ``probe_interval_s`` the node
runs :data:`HEARTBEAT_SCRIPT`, which records its heartbeat and publishes a
probe on the node's own channel, and expects the probe back on its subscriber
within ``probe_timeout_s``; if it is not, :class:`~.redis_wire.Lost` ends the
session and the link reconnects and resubscribes. A Redis that has lost the
scripts (``SCRIPT FLUSH``) is given them again (:func:`~.redis_wire.evalsha`,
loaded and run in one write, so that flushes however frequent do not come
between the two): that is no reason to reconnect.

The heartbeats (a sorted set: node name, Redis's clock in ms) are how
:data:`~.redis_publisher.PUBLISH_SCRIPT` tells a node cut off from Redis
(``recipient_unreachable``) from an id nobody holds (``unknown_recipient``),
and a question some live node missed (``answer_incomplete``) from one every
node received.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
from collections.abc import Callable
from typing import Final

import trio
from coredis.exceptions import RedisError

from relayd.config import ClusterSettings
from relayd.routing.cluster import codec
from relayd.routing.cluster.link import Health
from relayd.routing.cluster.redis_wire import Lost, Wire, call, evalsha, load_script, ms

__all__ = ["HEARTBEAT_SCRIPT", "RESTORE_SCRIPT", "Prober"]

#: A node's heartbeat and probe: records the node (ARGV[1]) as alive now in
#: the sorted set KEYS[1], forgets nodes silent for ten node timeouts (ARGV[4]
#: ms), publishes the probe ARGV[3] on the node's own channel ARGV[2], and
#: returns every heartbeat (name, ms, name, ms...). The node keeps them for
#: :data:`RESTORE_SCRIPT`.
HEARTBEAT_SCRIPT: Final = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 10 * tonumber(ARGV[4]))
redis.call('PUBLISH', ARGV[2], ARGV[3])
return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
"""

#: After a Redis restart, which forgets every heartbeat: the first node back puts
#: back the others' (ARGV: name, age, score, ...), so that the ids of nodes not yet
#: resubscribed answer ``recipient_unreachable``, not ``unknown_recipient``, until
#: those nodes are back or their heartbeat ages past node_timeout_s. Only into an
#: empty set (ZCOUNT, not EXISTS: the commands the ACL grants): a Redis that kept
#: it, or a node back before this one, knows better, and a node that left or died
#: meanwhile must stay gone. A node alive at the last probe (age >= 0: ms before
#: that probe it was last seen) gets Redis's now less its age, the outage not
#: counted; the others (age -1) their last heartbeat (score), as it was.
RESTORE_SCRIPT: Final = b"""
if redis.call('ZCOUNT', KEYS[1], '-inf', '+inf') > 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #ARGV, 3 do
  local age = tonumber(ARGV[i + 1])
  local score = tonumber(ARGV[i + 2])
  if age >= 0 then score = now - age end
  redis.call('ZADD', KEYS[1], 'GT', score, ARGV[i])
end
return 1
"""


class Prober:
    """Probes the link within a session, and keeps every node's last heartbeat across sessions.

    Args:
        settings: the ``[cluster]`` settings.
        node: this node's name.
        channels: the cluster's channel names.
        health: the link's health (the probe's round trip kept there).
        twin_found: called once, from a probe's round, when :attr:`twin` is first seen.
        script_lost: called with ``heartbeat`` or ``restore`` when Redis has lost
            that script, before it is loaded again.

    Error handling: the probe's methods raise :class:`~.redis_wire.Lost`
    (or :class:`RedisError`) for the session to end; :meth:`is_probe` runs
    in coredis's reader and never raises.

    Another node with this node's name (a misconfiguration: two machines with one
    hostname under the ``relayd@PORT`` units, a copied ``node_name``) publishes its
    probes on this node's channel too. Probes are numbered from a random start in
    each process, so such a probe is told from this node's own: it is never taken
    for this node's (which would hide a subscription that stopped delivering),
    and :attr:`twin` says one came, for the link to log ``broker.duplicate_name``.
    """

    __slots__ = (
        "_back",
        "_channels",
        "_health",
        "_heartbeats",
        "_left",
        "_node",
        "_number",
        "_own",
        "_restore_sha",
        "_script_lost",
        "_settings",
        "_sha",
        "_since",
        "_twin_found",
        "twin",
    )

    def __init__(
        self,
        settings: ClusterSettings,
        node: str,
        channels: codec.Channels,
        health: Health,
        twin_found: Callable[[], None] = lambda: None,
        script_lost: Callable[[str], None] = lambda script: None,
    ) -> None:
        self._settings = settings
        self._node = node
        self._channels = channels
        self._own = channels.of_node(node)
        self._health = health
        self._sha = self._restore_sha = b""
        # This process's probes are numbered from a random start (see above); the
        # numbers since it are its own.
        self._since = self._number = secrets.randbelow(1 << 62)
        #: A probe on this node's channel that this process did not send has come.
        self.twin = False
        self._twin_found: Callable[[], None] | None = twin_found
        self._script_lost = script_lost
        self._back = trio.Event()
        # Every node's last heartbeat (ms of Redis's clock), as the last probe saw them.
        self._heartbeats: dict[bytes, bytes] = {}
        # This node has left (its heartbeat removed): it writes none again.
        self._left = False

    async def load(self, publisher: Wire) -> None:
        """Load the scripts (each session: a restarted Redis has forgotten them)."""
        self._sha = await load_script(publisher, HEARTBEAT_SCRIPT)
        self._restore_sha = await load_script(publisher, RESTORE_SCRIPT)

    async def restore_heartbeats(self, publisher: Wire) -> None:
        """Put back the others' heartbeats if Redis has none (it restarted): :data:`RESTORE_SCRIPT`.

        Ages are counted back from this node's last probe, so neither Redis's
        restart nor this node's time cut off (the reconnection wait after it)
        ages the others: otherwise a restart that outlasts ``node_timeout_s`` with
        that wait (5 s each by default) would make every other node look gone
        until it is back itself, and their clients' ids answer
        ``unknown_recipient`` ("drop the message") instead of
        ``recipient_unreachable`` ("try again"). A node that died meanwhile counts
        as alive for ``node_timeout_s`` after this at most: while it does, a
        message to an id nobody holds answers ``recipient_unreachable``.
        """
        own = self._node.encode()
        last = self._heartbeats.get(own)
        if last is None:
            return
        alive_since = int(last) - ms(self._settings.node_timeout_s)
        values: list[bytes] = []
        for node, at in self._heartbeats.items():
            if node != own:
                age = max(0, int(last) - int(at)) if int(at) >= alive_since else -1
                values += (node, str(age).encode(), at)
        if values:
            await evalsha(
                publisher,
                RESTORE_SCRIPT,
                self._restore_sha,
                1,
                self._channels.heartbeats,
                *values,
                reloading=functools.partial(self._script_lost, "restore"),
            )

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
        elif not self._since < message.number < self._number:  # a late one of its own
            self.twin = True
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
            if self._left:
                await trio.sleep_forever()  # the link closes next
            with trio.move_on_after(settings.probe_timeout_s) as waiting:
                await self._once(publisher)
            if waiting.cancelled_caught:
                raise Lost(f"a probe did not come back within {settings.probe_timeout_s} s")

    async def _once(self, publisher: Wire) -> None:
        self._number += 1
        self._back = trio.Event()
        probe = codec.encode(codec.Probe(self._node, self._number))
        started = trio.current_time()
        heartbeats = await evalsha(
            publisher,
            HEARTBEAT_SCRIPT,
            self._sha,
            1,
            self._channels.heartbeats,
            self._node,
            self._own,
            probe,
            ms(self._settings.node_timeout_s),
            reloading=functools.partial(self._script_lost, "heartbeat"),
        )
        if isinstance(heartbeats, list):
            pairs = [value for value in heartbeats if isinstance(value, bytes)]
            self._heartbeats = dict(zip(pairs[::2], pairs[1::2], strict=False))
        await self._back.wait()
        self._health.probe_rtt_s = trio.current_time() - started
        if self.twin and self._twin_found is not None:
            told, self._twin_found = self._twin_found, None
            told()

    async def leave(self, publisher: Wire) -> None:
        """Remove this node's heartbeat, so that its ids answer ``unknown_recipient`` at once.

        No probe is sent from now on: one sent after the ``ZREM``, while its reply was
        awaited, wrote the heartbeat back (its script adds it), and the node's ids then
        answered as a node's that cannot be reached for ``node_timeout_s`` (found when
        a test of two nodes leaving failed one CI run).
        """
        self._left = True
        with (
            trio.move_on_after(self._settings.connect_timeout_s),
            contextlib.suppress(RedisError, Lost),
        ):
            await call(publisher, b"ZREM", self._channels.heartbeats, self._node)

"""The publishing side of the link to Redis: batches of messages, and their counts of receivers.

Each routing pass's messages go out as one ``EVALSHA`` of
:data:`PUBLISH_SCRIPT` (about 2.3 µs per message, where one request per
``PUBLISH`` costs about 20 µs in coredis: docs/scaling.md, "The Redis
client"); its reply, a count of receiving nodes per message, is taken in
coredis's reader task and handed to the batch's callback. The server API's
questions go out the same way, flagged as questions (:meth:`Publisher.ask`).
A holding node's answers go out as plain ``PUBLISH`` commands that ask for
no reply (``CLIENT REPLY SKIP``).

Bound: at most ``publish_buffer_bytes`` of batches wait for Redis's answer
or for the socket (what the request queue and the unwritten bytes hold);
past that :meth:`Publisher.publish`, :meth:`Publisher.ask` and
:meth:`Publisher.send` refuse, and senders are told ``recipient_unreachable``
(the server API's askers ``broker_unavailable``).

A Redis that has lost the script (``SCRIPT FLUSH``, a failover behind a proxy
to a Redis without it) answers ``NOSCRIPT`` without running anything: such a
batch is :data:`~relayd.routing.cluster.link.NOT_SENT` (its senders are told
``recipient_unreachable``, not ``delivery_unconfirmed``), and the first such
answer writes ``SCRIPT LOAD`` at once on the same connection, so the batches
written after it run again, with no reconnection. Such a batch's messages are
not counted as published.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Final

from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import NoScriptError
from coredis.typing import RedisValueT, ResponseType

from relayd.config import ClusterSettings
from relayd.routing.cluster import codec
from relayd.routing.cluster.link import NOT_SENT, Health, Published
from relayd.routing.cluster.redis_wire import SKIP_REPLY, Command, Reply, Wire, load_script, ms

__all__ = ["PUBLISH_SCRIPT", "Publisher"]

#: Publishes pairs of (channel, message) from ARGV[4...] and returns each
#: PUBLISH's count of receivers, or -1 for one some node may have missed: a node
#: cut off from Redis, whose heartbeat (in the sorted set KEYS[1], within ARGV[3]
#: ms) is fresh but which no longer listens on the nodes channel ARGV[1] (every
#: node listens there, and subscribes it after its ids: see
#: :meth:`~.redis_subscriber.Subscriptions.restore`). For a message (ARGV[2]
#: empty) only a count of 0 becomes -1: nobody else holds the id, but the cut-off
#: node's clients may, so the sender is told ``recipient_unreachable``, not
#: ``unknown_recipient``; a message some node received stays counted, as it may
#: be delivered. For questions (ARGV[2] is ``1``: the server API's, which every
#: live node must receive) every count becomes -1 while any live node does not
#: listen: the answers of those that received it would be a part. The check
#: (TIME, ZCOUNT, PUBSUB NUMSUB) runs at most once per call, and only when needed.
#: One script call per routing pass: one request, one reply, however many
#: messages.
PUBLISH_SCRIPT: Final = b"""
local counts = {}
local questions = ARGV[2] == '1'
local cut_off = nil
for i = 4, #ARGV, 2 do
  local n = redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
  if n == 0 or questions then
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


class Publisher:
    """Publishes on the session's publisher connection, within ``publish_buffer_bytes``.

    Args:
        settings: the ``[cluster]`` settings.
        channels: the cluster's channel names.
        health: the link's health (counts and bytes in flight kept there).
        script_lost: called with ``publish`` when Redis has lost the script and
            it is loaded again (once per loss), in coredis's reader.

    Resource handling: the link's session hands it the publisher connection
    with :meth:`load` and takes it back with :meth:`detach`; in between,
    batches are written from the caller's task. Error handling: a batch that
    cannot be written is refused (False), never raised.
    """

    __slots__ = (
        "_channels",
        "_health",
        "_outstanding",
        "_reload_refused",
        "_reloading",
        "_script_lost",
        "_settings",
        "_sha",
        "wire",
    )

    def __init__(
        self,
        settings: ClusterSettings,
        channels: codec.Channels,
        health: Health,
        script_lost: Callable[[str], None] = lambda script: None,
    ) -> None:
        self._settings = settings
        self._channels = channels
        self._health = health
        self.wire: Wire | None = None  # the session's publisher connection, once loaded
        self._sha = b""
        # Publish batches written and not yet answered, oldest first.
        self._outstanding: collections.deque[Reply] = collections.deque()
        # A SCRIPT LOAD written after a NOSCRIPT answer, not yet answered.
        self._reloading = False
        # Redis refused the last SCRIPT LOAD (an ACL without it): the next is no news.
        self._reload_refused = False
        self._script_lost = script_lost

    async def load(self, wire: Wire) -> None:
        """Load :data:`PUBLISH_SCRIPT` on ``wire`` and publish there from now on.

        Raises:
            Lost: the connection is gone, or the reply is not a script's hash.
            RedisError: Redis refused.
        """
        self._sha = await load_script(wire, PUBLISH_SCRIPT)
        self.wire = wire

    def detach(self) -> None:
        """After a session: fail the batches still waiting for a reply, publish nowhere."""
        self.wire = None
        self._reloading = self._reload_refused = False
        # coredis failed every reply still queued as its connection ended; a
        # batch written after that (while the session was ending) is failed here.
        outstanding, self._outstanding = self._outstanding, collections.deque()
        for reply in outstanding:
            reply.fail(RedisConnectionError("the link to Redis broke"))
        self._health.inflight_bytes = 0

    def publish(self, pairs: list[tuple[bytes, bytes]], done: Published) -> bool:
        """:meth:`Link.publish <relayd.routing.cluster.link.Link.publish>`, on this connection."""
        return self._evalsha(pairs, done, b"")

    def ask(self, pairs: list[tuple[bytes, bytes]], done: Published) -> bool:
        """:meth:`Link.ask <relayd.routing.cluster.link.Link.ask>`, on this connection."""
        return self._evalsha(pairs, done, b"1")

    def _evalsha(self, pairs: list[tuple[bytes, bytes]], done: Published, questions: bytes) -> bool:
        """Publish ``pairs`` with :data:`PUBLISH_SCRIPT` (``questions``: its ARGV[2])."""
        size = sum(len(channel) + len(data) for channel, data in pairs)
        wire = self._wire_for(size)
        if wire is None:
            return False
        arguments: list[RedisValueT] = [
            b"EVALSHA",
            self._sha,
            1,
            self._channels.heartbeats,
            self._channels.nodes,
            questions,
            ms(self._settings.node_timeout_s),
        ]
        for channel, data in pairs:
            arguments += (channel, data)
        reply = Reply(functools.partial(self._published, size, len(pairs), done))
        if not wire.send([tuple(arguments)], reply):
            self._health.publish_failures += 1
            return False
        self._outstanding.append(reply)
        self._health.inflight_bytes += size
        self._health.published += len(pairs)
        return True

    def send(self, pairs: list[tuple[bytes, bytes]]) -> bool:
        """:meth:`Link.send <relayd.routing.cluster.link.Link.send>`, on this connection."""
        size = sum(len(channel) + len(data) for channel, data in pairs)
        wire = self._wire_for(size)
        if wire is None:
            return False
        commands: list[Command] = []
        for channel, data in pairs:
            commands += (SKIP_REPLY, (b"PUBLISH", channel, data))
        if not wire.send(commands):
            self._health.publish_failures += 1
            return False
        self._health.published += len(pairs)
        return True

    def _wire_for(self, size: int) -> Wire | None:
        """Where ``size`` more bytes may be published now; None if nowhere.

        The link must be up, and the bytes fit in ``publish_buffer_bytes`` with
        those waiting for Redis's reply and those the socket has not taken. A
        full buffer is a failure (counted); a link known to be down is not: the
        node does not try to publish then (docs/scaling.md).
        """
        health, wire = self._health, self.wire
        if wire is None or not health.up:
            return None
        if health.inflight_bytes + wire.unwritten + size <= self._settings.publish_buffer_bytes:
            return wire
        health.publish_failures += 1
        return None

    def _published(
        self, size: int, count: int, done: Published, reply: ResponseType | BaseException
    ) -> None:
        """A batch's reply (in coredis's reader task), or the end of its connection.

        ``size``: its bytes; ``count``: its messages, counted as published when
        written, and not if Redis refused to run it.
        """
        if self._outstanding and self._outstanding[0].complete:
            self._outstanding.popleft()  # replies come in the order batches were written
        health = self._health
        health.inflight_bytes -= size
        if isinstance(reply, list):
            done([int(count) for count in reply])
            return
        health.publish_failures += 1
        if isinstance(reply, NoScriptError):  # Redis has lost the script: nothing ran
            health.published -= count
            self._reload()
            done(NOT_SENT)
        else:  # the connection ended, or the script failed part way: fate unknown
            done(None)

    def _reload(self) -> None:
        """Load :data:`PUBLISH_SCRIPT` again, without waiting: once per loss.

        Sent at once (in coredis's reader, as the ``NOSCRIPT`` answer is
        parsed: written to the socket then, or over TLS queued for coredis's
        writer, in order either way), so every batch written after it finds
        the script: Redis runs one connection's commands in order. Batches
        written before it are answered ``NOSCRIPT`` too, and need no other
        reload; one after its answer means the script was lost again.
        ``script_lost`` is told, unless Redis refused the last reload too.
        """
        wire = self.wire
        if self._reloading or wire is None:
            return
        if not self._reload_refused:
            self._script_lost("publish")
        self._reloading = wire.send([(b"SCRIPT", b"LOAD", PUBLISH_SCRIPT)], Reply(self._reloaded))

    def _reloaded(self, reply: ResponseType | BaseException) -> None:
        """The reload's answer (the script's hash, unchanged), or the connection's end."""
        self._reloading = False
        self._reload_refused = isinstance(reply, BaseException)

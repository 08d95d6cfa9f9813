"""The router of one process: one routing task, fed by a bounded channel.

Data path: a connection's reader hands the items of one read from its socket
to :meth:`LocalRouter.try_route` (or awaits :meth:`LocalRouter.route`), which
puts them on one bounded memory channel (the router's inbox; a full inbox
makes readers wait, which is TCP backpressure on the senders), or, while
traffic is sparse, routes them at once (below). The single routing task takes
batches off the inbox in order, looks recipients up in the
:class:`~relayd.routing.table.RoutingTable`, encodes each recipient's frame
once per dialect and offers it with
:meth:`~relayd.routing.interface.Peer.deliver`, which never waits. Replies to
a sender (acks, errors) go through the sender's own reply slots, so each
client sees every reply, in the order it sent.

**A lone batch is routed at once.** While traffic is sparse (the routing
task's last pass took one reader's batch alone) and the routing task waits for
its inbox with nothing handed to it, :meth:`LocalRouter.try_route` routes a
reader's batch in the reader's own task, with the same code and in the same
order: the chat regime's lone message then costs one task step, not two.
Batching across readers buys nothing there (each message has a recipient of
its own), and everything else is as when the routing task routes it: nothing
is routed ahead of a batch already queued, and the block does not await. One
batch in :data:`PROBE_EVERY` goes through the routing task all the same (the
others are routed at once), so that readers with batches in the same
scheduling round queue behind it and the pass sees that traffic is no longer
sparse; from then on batches go through the inbox, and a fan-in's hundred
senders are written to their receiver in one write again. Routing at once puts
the deliveries, the socket writes and the log lines in the reader's task, and a
bug in routing is raised there (the reader's connection closes with 1011) rather
than in the routing task. A batch of one item is routed at once without a
routing batch (:func:`~relayd.routing.batch.routing_batch`), which would only
hold the one frame it gives each connection until its end.

Shutdown: :meth:`LocalRouter.close` refuses new items; :meth:`LocalRouter.run`
then delivers what is already queued, detaches every registered peer (so
draining writers flush and end) and returns.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Final

import msgspec
import trio

from relayd.errors import RouterClosed
from relayd.routing.batch import routing_batch
from relayd.routing.fanout import offer
from relayd.routing.inbox import hand_over, try_hand_over
from relayd.routing.interface import Inbound, Peer, Relay
from relayd.routing.replies import DETAILS, ack_frame, error_frame
from relayd.routing.table import DELIVERED, Outcome, RoutingTable
from relayd.telemetry import clock
from relayd.telemetry.line_sink import batched
from relayd.telemetry.messages import MessageEvents, Recorder
from relayd.telemetry.metrics import Stats

__all__ = ["DEFAULT_INBOX_SIZE", "LocalRouter"]

#: Batches the router's inbox holds before readers wait. A batch is what one
#: read brought (at most the reader's receive size in frames), so this bounds
#: the inbox at 256 x 64 KiB of client data: 16 MiB at worst, a few hundred
#: kilobytes in practice. Big enough that the router drains a whole scheduling
#: round of readers without them blocking.
DEFAULT_INBOX_SIZE: Final = 256
#: While traffic is sparse, one reader's batch in this many goes through the routing task
#: rather than being routed in the reader's task, to see whether traffic still is.
PROBE_EVERY: Final = 16


class LocalRouter:
    """Routes between the connections of this process.

    Args:
        events: where message outcomes are counted and logged.
        stats: the counters to add to (errors, relay latency).
        inbox_size: how many batches may wait for the routing task.
    """

    def __init__(
        self, events: MessageEvents, stats: Stats, *, inbox_size: int = DEFAULT_INBOX_SIZE
    ) -> None:
        self._events = events
        self.stats = stats
        self._table: RoutingTable[Peer] = RoutingTable()
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[list[Inbound]](inbox_size)
        self._closed = False
        # The routing task waits for its inbox and nothing was handed to it since.
        self._idle = False
        # Its last pass took one reader's batch alone; batches are then routed at
        # once, but for one in PROBE_EVERY (the countdown to it).
        self._sparse = False
        self._probe = PROBE_EVERY - 1

    @property
    def ready(self) -> bool:  # noqa: D102 - documented on Router
        return True

    def collector(self) -> None:  # noqa: D102
        return None

    @property
    def routes(self) -> int:
        """How many client ids are routable now."""
        return len(self._table)

    async def register(self, peer: Peer) -> None:  # noqa: D102 - documented on Router
        if self._closed:
            raise RouterClosed("router is shutting down")
        self._table.add(peer.client_id, peer)

    def unregister(self, peer: Peer) -> None:  # noqa: D102
        self._table.discard(peer.client_id, peer)

    def try_route(self, items: list[Inbound]) -> bool:  # noqa: D102
        if self._idle and self._sparse and self._probe:
            # Nothing is queued and the routing task is not about to run: routing
            # here keeps the order, and saves that task a step.
            self._probe -= 1
            if len(items) == 1:
                # No routing batch for one item (a lone message, as a rule): it
                # gives each connection one frame, written at once, as the batch's
                # end would write it. (But for a message to the sender's own id with
                # a ref: its delivery and its ack then go in two writes, not one.)
                # Nor a batch of log lines: its one line is held as such a batch's.
                self._route_items(items, self._events.recorder(), clock.now())
            else:
                with batched(), routing_batch():
                    self._route_items(items, self._events.recorder(), clock.now())
            return True
        if try_hand_over(self._inbox_send, items):
            self._idle = False
            return True
        return False

    async def route(self, items: list[Inbound]) -> None:  # noqa: D102
        self._idle = False  # nothing may be routed at once ahead of these
        await hand_over(self._inbox_send, items)

    async def publish(self, to: str, message: msgspec.Raw, *, sender: str) -> Outcome:  # noqa: D102
        with batched(), routing_batch():
            return self._deliver(sender, to, message, len(message), self._events.recorder())

    async def disconnect(self, client_id: str, code: int, reason: str) -> int:  # noqa: D102
        peers = self._table.lookup(client_id)
        for peer in peers:
            peer.disconnect(code, reason)
        return len(peers)

    async def presence(self, client_id: str) -> int:  # noqa: D102
        return len(self._table.lookup(client_id))

    async def list_ids(self, *, after: str | None, limit: int) -> list[str]:  # noqa: D102
        ids = sorted(self._table.ids())
        start = 0 if after is None else bisect.bisect_right(ids, after)
        return list(itertools.islice(ids, start, start + limit))

    def close(self) -> None:  # noqa: D102
        self._closed = True
        self._idle = False
        self._inbox_send.close()

    async def run(  # noqa: D102
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        inbox = self._inbox_receive
        try:
            while True:
                try:
                    first = inbox.receive_nowait()
                except trio.WouldBlock:
                    # Idle only while parked with nothing queued: receive() takes a
                    # queued batch and then yields, and no batch may be routed at
                    # once ahead of it.
                    self._idle = not self._closed
                    try:
                        first = await inbox.receive()
                    except trio.EndOfChannel:
                        break
                    finally:
                        self._idle = False
                except trio.EndOfChannel:
                    break
                # Everything queued is routed before the router yields: each
                # wait for the inbox costs a whole scheduling round, in which
                # every reader may add a batch. One log write for all of it;
                # the recorder is made afresh each time, so a reload applies;
                # the clock is read once (a latency is then low by at most the
                # time one pass takes: a clock read per message cost more).
                taken = 0
                with batched(), routing_batch():
                    record, now = self._events.recorder(), clock.now()
                    items: list[Inbound] | None = first
                    while items is not None:
                        taken += 1
                        self._route_items(items, record, now)
                        try:
                            items = inbox.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            items = None
                self._sparse, self._probe = taken == 1, PROBE_EVERY - 1
        finally:
            for peer in self._table.handles():
                self._table.discard(peer.client_id, peer)
                peer.detach()

    def _route_items(self, items: list[Inbound], record: Recorder, now: float) -> None:
        """Route one reader's batch (in a routing batch unless one item); ``now``: trio's clock."""
        # One function for the whole of a message's routing (and _deliver's two
        # lines written out), without a call per message in between.
        for item in items:
            if not isinstance(item, Relay):
                item.recipient.reply(item.frame)
                continue
            sender, envelope, size, received = item
            client_id, to, message = sender.client_id, envelope.to, envelope.message
            outcome = offer(self._table.lookup(to), client_id, message)
            if outcome is DELIVERED:
                self.stats.observe_latency(now - received)
                ref = envelope.ref  # without one there is no ack: no call to say so
                sender.reply(None if ref is None else ack_frame(sender.dialect, ref))
            else:
                code = outcome.error
                assert code is not None  # every outcome but DELIVERED is an error
                sender.reply(
                    error_frame(sender.dialect, code, DETAILS[code], envelope.ref, self.stats)
                )
            # After the reply: a lone message's line may be written here, and a write
            # that fails (a full disk) must not cost a delivered message its ack.
            record(client_id, to, size, outcome, message)

    def _deliver(
        self, sender: str, to: str, message: msgspec.Raw, size: int, record: Recorder
    ) -> Outcome:
        """Offer ``message`` to every connection holding ``to``; record and return the outcome."""
        outcome = offer(self._table.lookup(to), sender, message)
        record(sender, to, size, outcome, message)
        return outcome

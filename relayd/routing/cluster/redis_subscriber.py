"""The subscribing side of the link to Redis: the subscriptions held, and what arrives on them.

:class:`Subscriptions` keeps the channels the router wants (its ids' and the
node's own), across sessions: each new session subscribes them all again, and
within a session (un)subscriptions go out as they come, consecutive ones of a
kind in one command.

:class:`Reader` takes what the subscriber connection receives, in coredis's
reader task at the end of each read
(:class:`~.redis_connection.AfterEachRead`): messages go to the
:class:`~relayd.routing.cluster.link.Receiver`, confirmations release who
waits for them, and the node's own probes go to the
:class:`~.redis_probe.Prober`. This saves the two task steps of a task
reading coredis's push buffer and the checkpoint of its "processing budget"
per read (docs/scaling.md, "The Redis client"); it reads coredis 6.9's
private push buffer (``_push_message_buffer_out``) and relies on its reader
entering ``processing_budget`` around the parsing of each read that no
request waits for (pyproject.toml keeps coredis to 6.9.x;
tests/test_cluster_link.py exercises it against a real Redis).

Bound: coredis's reader parses one socket read (64 KiB at most) at a time and
every message in it is handed to the receiver before it reads again; Redis
itself cuts a subscriber that falls behind by more than its
``client-output-buffer-limit pubsub`` (32 MiB by default).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import anyio
import trio
from coredis.connection import BaseConnection

from relayd.routing.cluster.link import Health, Receiver
from relayd.routing.cluster.redis_probe import Prober
from relayd.routing.cluster.redis_wire import Command, Lost, Wire

__all__ = ["CHANNELS_PER_COMMAND", "Reader", "Subscriptions", "chunks", "coalesce"]

#: Channels per SUBSCRIBE or UNSUBSCRIBE command: resubscribing 100,000 ids
#: takes 100 commands, each a few hundred kilobytes.
CHANNELS_PER_COMMAND: Final = 1000

#: Push messages confirming a SUBSCRIBE or UNSUBSCRIBE, one per channel.
_CONFIRMATIONS: Final = (b"subscribe", b"unsubscribe")


class Subscriptions:
    """The channels wanted, with how many holders each, and their (un)subscriptions to send.

    Args:
        base: the channels every session subscribes last, after every wanted
            id (the nodes channel, the node's own).
        health: the link's health (whether it is up).

    Resource handling: the link's session runs :meth:`restore`, then
    :meth:`send_orders` in its nursery; :meth:`release` after each session.
    """

    __slots__ = ("_base", "_confirmations", "_health", "_lot", "_orders", "_wanted")

    def __init__(self, base: list[bytes], health: Health) -> None:
        self._base = base
        self._health = health
        # Subscriptions wanted, with how many holders each; kept across sessions.
        self._wanted: dict[bytes, int] = {}
        # (Un)subscriptions not yet sent in this session, in order.
        self._orders: list[tuple[bytes, bytes]] = []
        self._lot = trio.lowlevel.ParkingLot()  # send_orders, waiting for orders
        self._confirmations: dict[bytes, trio.Event] = {}

    def __len__(self) -> int:
        return len(self._wanted)

    def subscribe(self, channel: bytes) -> None:
        """:meth:`Link.subscribe <relayd.routing.cluster.link.Link.subscribe>`."""
        holders = self._wanted.get(channel, 0)
        self._wanted[channel] = holders + 1
        if not holders:
            self._order(b"SUBSCRIBE", channel)

    def unsubscribe(self, channel: bytes) -> None:
        """:meth:`Link.unsubscribe <relayd.routing.cluster.link.Link.unsubscribe>`."""
        holders = self._wanted.get(channel, 0)
        if holders > 1:
            self._wanted[channel] = holders - 1
        elif holders == 1:
            del self._wanted[channel]
            self._order(b"UNSUBSCRIBE", channel)

    async def subscribed(self, channel: bytes) -> None:
        """:meth:`Link.subscribed <relayd.routing.cluster.link.Link.subscribed>`."""
        if not self._health.up or channel not in self._wanted:
            return
        event = self._confirmations.get(channel)
        if event is None:
            return  # confirmed already
        await event.wait()

    def _order(self, command: bytes, channel: bytes) -> None:
        if command == b"SUBSCRIBE":
            self._confirmations.setdefault(channel, trio.Event())
        self._orders.append((command, channel))
        self._lot.unpark()

    async def restore(self, subscriber: Wire) -> None:
        """Subscribe every wanted id, then the node's channels; wait for the last confirmation.

        The nodes channel last: Redis runs one connection's commands in order,
        so a node counted as listening there (by
        :data:`~.redis_publisher.PUBLISH_SCRIPT`, in another connection's
        script) holds every id it held before; while it resubscribes, it
        counts as cut off, not as holding none of its ids.
        """
        channels = [*self._wanted, *self._base]
        self._orders.clear()  # everything wanted is in this list
        for channel in self._wanted:
            self._confirmations.setdefault(channel, trio.Event())
        last = channels[-1]
        self._confirmations.setdefault(last, trio.Event())
        subscriptions: list[Command] = [(b"SUBSCRIBE", *chunk) for chunk in chunks(channels)]
        if not subscriber.send(subscriptions):
            raise Lost("the subscriber connection failed")
        await self._confirmations[last].wait()

    async def send_orders(self, subscriber: Wire) -> None:
        """Send (un)subscriptions as they come, consecutive ones of a kind in one command."""
        while True:
            while not self._orders:
                await self._lot.park()
            orders, self._orders = self._orders, []
            commands: list[Command] = [
                (command, *chunk)
                for command, channels in coalesce(orders)
                for chunk in chunks(channels)
            ]
            if not subscriber.send(commands):
                raise Lost("the subscriber connection failed")

    def confirmed(self, channel: bytes) -> None:
        """Redis confirmed the subscription of ``channel``: release who waits for it."""
        event = self._confirmations.pop(channel, None)
        if event is not None:
            event.set()

    def release(self) -> None:
        """After a session: release every waiter; orders not sent are in :meth:`restore`'s list."""
        for confirmed in self._confirmations.values():
            confirmed.set()
        self._confirmations.clear()
        self._orders.clear()


class Reader:
    """Hands what each read of the subscriber connection brought to where it goes.

    Args:
        own: this node's channel (probes arrive there).
        receiver: where received messages go.
        subscriptions: told of each confirmation.
        prober: shown what arrives on ``own``.
        health: the link's health (counts kept there).
        changed: unparked when the count of subscriptions changes.

    Error handling: what the receiver raises (a bug) is kept in :attr:`bug`
    and raised on, into coredis's reader, which closes the connection; the
    session then raises it again (coredis would only have closed it).
    """

    __slots__ = (
        "_changed",
        "_health",
        "_own",
        "_prober",
        "_receiver",
        "_subscriptions",
        "bug",
        "connection",
    )

    def __init__(
        self,
        own: bytes,
        receiver: Receiver,
        subscriptions: Subscriptions,
        prober: Prober,
        health: Health,
        changed: trio.lowlevel.ParkingLot,
    ) -> None:
        self._own = own
        self._receiver = receiver
        self._subscriptions = subscriptions
        self._prober = prober
        self._health = health
        self._changed = changed
        self.connection: BaseConnection | None = None  # the session's subscriber
        self.bug: Exception | None = None  # raised in coredis's reader by the receiver

    def take(self) -> None:
        """Hand what the subscriber's last read brought to the receiver (in coredis's reader).

        Raises:
            Exception: what the receiver raised (a bug), after noting it in
                :attr:`bug`.
        """
        connection = self.connection
        if connection is None:
            return
        # The one private buffer read (see the module docstring), emptied at each read.
        buffer = connection._push_message_buffer_out
        receiver, own, health = self._receiver, self._own, self._health
        is_probe = self._prober.is_probe
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
                    and (channel != own or not is_probe(data))
                ):
                    batch.append((channel, data))
            elif kind in _CONFIRMATIONS and len(item) == 3:
                if kind == b"subscribe" and isinstance(item[1], bytes):
                    self._subscriptions.confirmed(item[1])
                if isinstance(item[2], int):  # the count Redis holds for us now
                    health.subscriptions = item[2]
                    self._changed.unpark_all()
        if batch:
            health.received += len(batch)
            try:
                receiver.received(batch)
            except Exception as error:
                self.bug = error
                raise


def chunks(channels: list[bytes]) -> Iterator[list[bytes]]:
    """``channels`` in slices of :data:`CHANNELS_PER_COMMAND`, one per command."""
    for start in range(0, len(channels), CHANNELS_PER_COMMAND):
        yield channels[start : start + CHANNELS_PER_COMMAND]


def coalesce(orders: list[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, list[bytes]]]:
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

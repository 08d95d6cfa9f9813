"""The router of one process: one routing task, fed by a bounded channel.

Data path: a connection's reader awaits :meth:`Router.route` with the items
of one read from its socket (a batch: one hand-off however many frames the
read held), which puts them on one bounded memory channel (the router's inbox;
a full inbox makes readers wait, which is TCP backpressure on the senders).
The single routing task takes batches off it in order, looks recipients up in
the :class:`~relayd.routing.table.RoutingTable`, encodes each recipient's frame once
per dialect and hands it to their outboxes with
:meth:`~relayd.routing.outbox.Outbox.offer`, which never waits: the router is never
held up by a slow recipient. Replies to a sender (acks, errors) go through the
sender's own outbox, into the reply slots its reader reserved, so each client
sees every reply, in the order it sent.

:class:`LocalRouter` implements :class:`~relayd.routing.interface.Router`
for the connections of one process.

Shutdown: :meth:`Router.close` refuses new items; :meth:`Router.run` then
delivers what is already queued, closes every registered outbox (so writers
flush and end) and returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import structlog
import trio

from relayd.errors import RouterClosed
from relayd.routing.interface import Inbound, Peer, Relay
from relayd.routing.table import Outcome, RoutingTable, outcome_of
from relayd.telemetry.log import batched, line_writer
from relayd.telemetry.metrics import Stats
from relayd.wire.dialects import Dialect, Envelope, ack_payload, delivery_payload, error_payload
from relayd.wire.frames import text_frame

__all__ = ["DEFAULT_INBOX_SIZE", "LocalRouter"]

#: Batches the router's inbox holds before readers wait. A batch is what one
#: read brought (at most the reader's receive size in frames), so this bounds
#: the inbox at 256 x 64 KiB of client data: 16 MiB at worst, a few hundred
#: kilobytes in practice. Big enough that the router drains a whole scheduling
#: round of readers without them blocking.
DEFAULT_INBOX_SIZE: Final = 256


class LocalRouter:
    """Routes between the connections of this process.

    Args:
        log: where ``message.relay`` events go.
        log_messages: emit one ``message.relay`` event per message.
        log_bodies: include the message body in those events.
        inbox_size: how many items may wait for the routing task.
        stats: the counters to add to (messages, errors, relay latency).
    """

    def __init__(
        self,
        log: structlog.typing.FilteringBoundLogger,
        *,
        log_messages: bool = True,
        log_bodies: bool = False,
        inbox_size: int = DEFAULT_INBOX_SIZE,
        stats: Stats | None = None,
    ) -> None:
        self._log = log
        self.stats = stats or Stats()
        self._log_messages = log_messages
        self._log_bodies = log_bodies
        self._table: RoutingTable[Peer] = RoutingTable()
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[list[Inbound]](inbox_size)
        self._closed = False

    @property
    def routes(self) -> int:
        """How many client ids are routable now."""
        return len(self._table)

    def reconfigure(self, *, log_messages: bool, log_bodies: bool) -> None:  # noqa: D102
        self._log_messages = log_messages
        self._log_bodies = log_bodies

    def register(self, peer: Peer) -> None:  # noqa: D102 - documented on Router
        if self._closed:
            raise RouterClosed("router is shutting down")
        self._table.add(peer.client_id, peer)

    def unregister(self, peer: Peer) -> None:  # noqa: D102
        self._table.discard(peer.client_id, peer)
        peer.outbox.close()

    async def route(self, items: list[Inbound]) -> None:  # noqa: D102
        try:
            # Without a wait when there is room: the reader's next read is a
            # checkpoint anyway, and a yield here would cost a scheduling
            # round per read.
            self._inbox_send.send_nowait(items)
        except trio.WouldBlock:
            try:
                await self._inbox_send.send(items)
            except trio.ClosedResourceError:
                raise RouterClosed("router is shutting down") from None
        except trio.ClosedResourceError:
            raise RouterClosed("router is shutting down") from None

    def close(self) -> None:  # noqa: D102
        self._closed = True
        self._inbox_send.close()

    async def run(  # noqa: D102
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        inbox = self._inbox_receive
        try:
            async for first in inbox:
                # Everything queued is routed before the router yields: each
                # wait for the inbox costs a whole scheduling round, in which
                # every reader may add a batch. One log write for all of it,
                # and the fast line writer when the JSON format is on; both are
                # set up afresh each time, so a reload of [log] applies.
                with batched():
                    log = self._message_log()
                    items: list[Inbound] | None = first
                    while items is not None:
                        for item in items:
                            if isinstance(item, Relay):
                                self._relay(item, log)
                            else:
                                item.recipient.outbox.reply(item.frame)
                        try:
                            items = inbox.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            items = None
        finally:
            for peer in self._table.handles():
                self.unregister(peer)

    def _message_log(self) -> Callable[[dict[str, Any]], None] | None:
        """How one batch logs ``message.relay``: a function of the fields, or None (not at all)."""
        if not self._log_messages:
            return None
        fast = line_writer("message.relay")
        if fast is not None:
            return fast
        log = self._log.bind()
        return lambda fields: log.info("message.relay", **fields)

    def _relay(self, item: Relay, log: Callable[[dict[str, Any]], None] | None) -> None:
        sender, envelope = item.sender, item.envelope
        recipients = self._table.lookup(envelope.to)
        if len(recipients) == 1:  # the common case, without the general one's containers
            peer = recipients[0]
            frame = text_frame(delivery_payload(peer.dialect, sender.client_id, envelope.message))
            accepted = [peer.outbox.offer(frame)]
        else:
            frames: dict[Dialect, bytes] = {}
            accepted = []
            for peer in recipients:
                frame = frames.get(peer.dialect) or frames.setdefault(
                    peer.dialect,
                    text_frame(delivery_payload(peer.dialect, sender.client_id, envelope.message)),
                )
                accepted.append(peer.outbox.offer(frame))
        outcome = outcome_of(accepted)
        stats = self.stats
        stats.messages[outcome] += 1
        if outcome is Outcome.DELIVERED:
            stats.observe_latency(trio.current_time() - item.received)
        self._answer(sender, envelope, outcome)
        if log is not None:
            fields: dict[str, Any] = {
                "from": sender.client_id,
                "to": envelope.to,
                "bytes": item.size,
                "outcome": outcome.value,
            }
            if self._log_bodies:
                fields["body"] = bytes(envelope.message).decode()
            log(fields)

    def _answer(self, sender: Peer, envelope: Envelope, outcome: Outcome) -> None:
        code = outcome.error
        reply: bytes | None
        if code is None:
            reply = None if envelope.ref is None else ack_payload(sender.dialect, envelope.ref)
        else:
            self.stats.errors[code.value] += 1
            reply = error_payload(sender.dialect, code, _DETAILS[outcome], envelope.ref)
        # Fills (or frees) the reply slot the sender's reader reserved.
        sender.outbox.reply(None if reply is None else text_frame(reply))


_DETAILS: Final = {
    Outcome.UNKNOWN_RECIPIENT: "no client with that id is connected",
    Outcome.RECIPIENT_BUSY: "the recipient is not reading fast enough; try again later",
}

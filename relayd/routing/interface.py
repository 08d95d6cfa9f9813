"""The router as connections see it: the interface, and what passes through it.

Data path: a connection's reader hands the router the items of one read from
its socket with :meth:`Router.route` (a batch: one hand-off however many frames
the read held). The router answers each item exactly once, through the
sender's outbox, and hands each message to its recipients' outboxes without
ever waiting on a recipient.

:class:`Router` is the whole interface: :class:`~relayd.routing.local.LocalRouter`
routes within one process; a broker-backed router implements the same methods
and connections do not change.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import trio

from relayd.routing.outbox import Outbox
from relayd.wire.dialects import Dialect, Envelope

__all__ = ["Inbound", "Peer", "Relay", "Reply", "Router"]


@dataclasses.dataclass(eq=False, slots=True)
class Peer:
    """What the router knows of one connection.

    Attributes:
        client_id: the id messages are addressed to.
        dialect: how the connection wants its frames written.
        outbox: where the router hands it frames.
        conn: the connection's number, for logs.
    """

    client_id: str
    dialect: Dialect
    outbox: Outbox
    conn: int


class Relay(NamedTuple):
    """A message a client asked to relay (a tuple: one is made per message).

    Attributes:
        sender: the sending connection.
        envelope: the decoded request.
        size: the client frame's size in bytes.
        received: when the reader took it off the socket (trio's clock).
    """

    sender: Peer
    envelope: Envelope
    size: int
    received: float


class Reply(NamedTuple):
    """An encoded frame for one connection that its own reader produced (an error, an echo)."""

    recipient: Peer
    frame: bytes


Inbound = Relay | Reply


class Router(Protocol):
    """The routing service as connections see it."""

    def register(self, peer: Peer) -> None:
        """Start routing messages for ``peer.client_id`` to ``peer``.

        Raises:
            RouterClosed: the router is shutting down.
        """

    def unregister(self, peer: Peer) -> None:
        """Stop routing to ``peer`` and close its outbox; idempotent."""

    async def route(self, items: list[Inbound]) -> None:
        """Queue ``items`` for routing, in order; waits while the router is behind.

        The caller has reserved a reply slot in its outbox for each item
        (:meth:`~relayd.routing.outbox.Outbox.reserve`); the router answers each item
        exactly once through :meth:`~relayd.routing.outbox.Outbox.reply`, with the
        reply frame or None. The router owns ``items`` from here.

        Raises:
            RouterClosed: the router is shutting down; the items were not taken.
        """

    def close(self) -> None:
        """Take nothing more; :meth:`run` finishes what is queued and returns."""

    def reconfigure(self, *, log_messages: bool, log_bodies: bool) -> None:
        """Apply reloaded ``[log]`` settings to messages routed from now on."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Route until closed; reports started once items can be routed."""

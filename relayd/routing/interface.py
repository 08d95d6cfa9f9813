"""The router as connections see it: the interface, and what passes through it.

Data path: a connection's reader hands the router the items of one read from
its socket with :meth:`Router.route` (a batch: one hand-off however many frames
the read held). The router answers each item exactly once, through the
sender's :meth:`Peer.reply`, and hands each message to its recipients with
:meth:`Peer.deliver`, which never waits: the router is never held up by a slow
recipient.

:class:`Router` is the whole interface: :class:`~relayd.routing.local.LocalRouter`
routes within one process; a broker-backed router implements the same methods
and connections do not change. :class:`Peer` is the whole of a connection the
router sees; the daemon's connection implements it, and owns its outbox.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import msgspec
import trio
from prometheus_client.registry import Collector

from relayd.routing.table import Outcome
from relayd.wire.dialects import Dialect, Envelope

__all__ = ["Inbound", "Peer", "Relay", "Replied", "Reply", "Router"]


class Replied(Protocol):
    """Whoever a :class:`Reply` is for: a connection, or its reader's marker."""

    def reply(self, frame: bytes | None) -> None:
        """Fill the reply slot reserved for this item (None frees it)."""


class Peer(Protocol):
    """One connection as a router sees it.

    Attributes:
        client_id: the id messages are addressed to.
        dialect: how the connection wants its frames written.
        conn: the connection's number in this process, for logs.
    """

    client_id: str
    dialect: Dialect
    conn: int

    def deliver(self, frame: bytes) -> bool:
        """Offer a message frame from another client; never waits.

        Returns:
            True if it is in the connection's outbox (the sender hears
            ``ack``); False if the outbox is full or the connection is leaving.
        """

    def reply(self, frame: bytes | None) -> None:
        """Fill the reply slot the connection reserved for one of its items (None frees it)."""

    def detach(self) -> None:
        """The router will route nothing more to this connection (it is shutting down)."""

    def disconnect(self, code: int, reason: str) -> None:
        """Close the connection for policy with ``code`` and ``reason`` (the server API)."""


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
    """An encoded frame for one connection that its own reader produced (an error, an echo).

    Routed in turn with the reader's other items: its recipient's ``reply`` is
    called once the items before it are routed (a reader's marker uses that).
    """

    recipient: Replied
    frame: bytes | None


Inbound = Relay | Reply


class Router(Protocol):
    """The routing service as connections, the server and its API see it."""

    @property
    def ready(self) -> bool:
        """True while messages reach every recipient they could (``/readyz``).

        Always, for one process; for a cluster node, while its link to the
        cluster is up.
        """

    def collector(self) -> Collector | None:
        """The router's own metrics for ``/metrics`` (the cluster's), or None."""

    async def register(self, peer: Peer) -> None:
        """Start routing messages for ``peer.client_id`` to ``peer``.

        When this returns, messages to the id reach ``peer`` from wherever they
        are sent (a broker router subscribes first): the welcome frame may go out.

        Raises:
            RouterClosed: the router is shutting down.
        """

    def unregister(self, peer: Peer) -> None:
        """Stop routing to ``peer``; idempotent. Its connection closes its own outbox."""

    def try_route(self, items: list[Inbound]) -> bool:
        """Route ``items`` as :meth:`route` does, if that needs no wait.

        A router may route them at once, in the caller's task, where that keeps
        their order (the local router does while traffic is sparse): the
        deliveries, writes and log lines are then done in that task, and a bug
        in routing is raised there, possibly after some items were answered.
        Else it queues them. Never waits and is no checkpoint, so a caller under a
        deadline can hand over without that deadline cutting the hand-over
        short.

        Returns:
            True if the router took ``items``; False if it is behind (nothing
            was taken: :meth:`route` waits for room).

        Raises:
            RouterClosed: the router is shutting down; the items were not taken.
        """

    async def route(self, items: list[Inbound]) -> None:
        """Queue ``items`` for routing, in order; waits while the router is behind.

        The caller has reserved a reply slot for each item; the router answers
        each item exactly once through its sender's :meth:`Peer.reply`, with
        the reply frame or None. The router owns ``items`` from here.

        Raises:
            RouterClosed: the router is shutting down; the items were not taken.
        """

    async def publish(self, to: str, message: msgspec.Raw, *, sender: str) -> Outcome:
        """Deliver ``message`` (raw JSON) to every connection holding ``to``, from ``sender``.

        For the server API: recipients get it as any message, in their dialect.

        Returns:
            The outcome, as a client sender would hear it.
        """

    async def disconnect(self, client_id: str, code: int, reason: str) -> int:
        """Close every connection holding ``client_id`` with ``code``; how many were closed."""

    async def presence(self, client_id: str) -> int:
        """How many connections hold ``client_id`` (on every node of a cluster)."""

    async def list_ids(self, *, after: str | None, limit: int) -> list[str]:
        """Connected ids in sorted order, at most ``limit``, each greater than ``after``."""

    def close(self) -> None:
        """Take nothing more; :meth:`run` finishes what is queued and returns."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Route until closed; reports started once items can be routed.

        On its way out it detaches every registered peer (:meth:`Peer.detach`),
        so draining writers flush and end.
        """

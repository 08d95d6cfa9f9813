"""What nodes say to each other through Redis, and on which channels (pure: no I/O, no trio).

Channels (all under the configured prefix, ``relayd:`` by default)::

    relayd:id:<client id>   one per id: every node holding a connection with
                            that id subscribes; a message to the id is published
                            here, and PUBLISH's answer is how many nodes hold it
    relayd:node:<name>      one per node: answers to what it asked, and its probes
    relayd:nodes            every node: cluster-wide questions (a page of ids)

and one key, ``relayd:heartbeats``: a sorted set of node names scored by the
time of their last probe, so that a node that vanished is known to be gone
(:mod:`relayd.routing.cluster.redis_probe`).

Messages are msgpack arrays, a tag first (:data:`Message`). A relayed body
travels as the raw JSON bytes the sender's envelope held; nothing re-encodes it.
A message that does not decode (another program publishing under the prefix,
a newer relayd) raises :class:`msgspec.DecodeError`; the receiver counts and
drops it.

Answers carry a small integer each (:class:`Answer`): an :class:`Verdict` for a
delivery, a count of connections for a presence question or a disconnect.
"""

from __future__ import annotations

import enum
from typing import Final

import msgspec

__all__ = [
    "Answer",
    "Answers",
    "Channels",
    "Deliver",
    "Ids",
    "ListIds",
    "Message",
    "Probe",
    "Query",
    "QueryKind",
    "Verdict",
    "decode",
    "encode",
]


class Verdict(enum.IntEnum):
    """What a holding node did with a delivery, as it answers the origin."""

    DELIVERED = 0  # in the outbox of at least one of its connections with the id
    BUSY = 1  # every such outbox was full
    GONE = 2  # it no longer holds the id (the connection closed meanwhile)


class QueryKind(enum.IntEnum):
    """A question about one id, asked of every node holding it."""

    PRESENCE = 0  # answer: how many connections hold the id here
    DISCONNECT = 1  # close them (with .code, .reason); answer: how many


class Deliver(msgspec.Struct, frozen=True, array_like=True, tag=1):
    """A message for a client id, published on its id channel.

    Attributes:
        origin: the sending node; answers go to its node channel.
        seq: the origin's number for this message, echoed in the answer.
        sender: the sending client's id (the ``from`` of the delivery).
        message: the message's raw JSON, as the sender's envelope held it.
    """

    origin: str
    seq: int
    sender: str
    message: bytes


class Query(msgspec.Struct, frozen=True, array_like=True, tag=2):
    """A question about an id, published on its id channel (see :class:`QueryKind`)."""

    origin: str
    seq: int
    kind: QueryKind
    code: int = 0
    reason: str = ""


class Answer(msgspec.Struct, frozen=True, array_like=True):
    """One answer: the question's ``seq`` and its value (a :class:`Verdict` or a count)."""

    seq: int
    value: int


class Answers(msgspec.Struct, frozen=True, array_like=True, tag=3):
    """Every answer a node owes one origin from one pass of its router, on the origin's channel."""

    node: str
    answers: list[Answer]


class ListIds(msgspec.Struct, frozen=True, array_like=True, tag=4):
    """Asked on the nodes channel: each node's ids after ``after``, at most ``limit``, sorted."""

    origin: str
    seq: int
    after: str | None
    limit: int


class Ids(msgspec.Struct, frozen=True, array_like=True, tag=5):
    """A node's answer to :class:`ListIds`."""

    node: str
    seq: int
    ids: list[str]


class Probe(msgspec.Struct, frozen=True, array_like=True, tag=6):
    """What a node publishes to itself to learn that its subscription still delivers."""

    node: str
    number: int


Message = Deliver | Query | Answers | ListIds | Ids | Probe

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """The bytes to publish for ``message``."""
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """The message ``data`` holds.

    Raises:
        msgspec.DecodeError: ``data`` is not a message of this version.
    """
    message: Message = _decoder.decode(data)
    return message


class Channels:
    """The names of one cluster's channels and keys in Redis, as bytes.

    Args:
        prefix: the ``cluster.channel_prefix`` setting.
    """

    __slots__ = ("_id", "heartbeats", "nodes", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.encode()
        self._id = self.prefix + b"id:"
        #: The channel every node subscribes to.
        self.nodes = self.prefix + b"nodes"
        #: The sorted set of node heartbeats.
        self.heartbeats = self.prefix + b"heartbeats"

    def of_id(self, client_id: str) -> bytes:
        """The channel of ``client_id``."""
        return self._id + client_id.encode()

    def of_node(self, node: str) -> bytes:
        """The channel of node ``node``."""
        return self.prefix + b"node:" + node.encode()

    def id_of(self, channel: bytes) -> str | None:
        """The client id whose channel ``channel`` is, or None if it is not an id channel."""
        if not channel.startswith(self._id):
            return None
        try:
            return channel[len(self._id) :].decode()
        except UnicodeDecodeError:
            return None

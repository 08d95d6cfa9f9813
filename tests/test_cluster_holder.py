"""Tests for relayd.routing.cluster.holder.Holder: what a node does with what others publish.

Messages and questions for the ids it holds, and the answers it owes. Plain
values only: a real routing table of fake peers, and a fake link that records
what the holder publishes (decoded back, so each test reads what the origin
node would receive). No broker, no trio run.
"""

from __future__ import annotations

import itertools

import msgspec
import trio

from relayd.routing.cluster import codec
from relayd.routing.cluster.holder import Holder
from relayd.routing.cluster.link import Health, Published
from relayd.routing.interface import Peer
from relayd.routing.table import RoutingTable
from relayd.wire.dialects import Dialect

NODE = "here"
CHANNELS = codec.Channels("relayd:")
CONN_NUMBERS = itertools.count(1)


class FakePeer:
    """A connection holding ``client_id``: takes offered frames unless ``full``."""

    def __init__(
        self, client_id: str, dialect: Dialect = Dialect.V1, *, full: bool = False
    ) -> None:
        self.client_id = client_id
        self.dialect = dialect
        self.conn = next(CONN_NUMBERS)
        self.full = full
        self.offered: list[bytes] = []
        self.disconnected: list[tuple[int, str]] = []

    def deliver(self, frame: bytes) -> bool:
        self.offered.append(frame)
        return not self.full

    def reply(self, frame: bytes | None) -> None:
        raise AssertionError("the holder never replies")

    def detach(self) -> None:
        raise AssertionError("the holder never detaches")

    def disconnect(self, code: int, reason: str) -> None:
        self.disconnected.append((code, reason))


class FakeLink:
    """Records each batch the holder sends; refuses them while ``down``."""

    def __init__(self) -> None:
        self.health = Health()
        self.down = False
        self.sent: list[list[tuple[bytes, codec.Message]]] = []
        self.refused = 0

    def publish(self, pairs: list[tuple[bytes, bytes]], done: Published) -> bool:
        raise AssertionError("answers ask for no counts: the holder only sends")

    def ask(self, pairs: list[tuple[bytes, bytes]], done: Published) -> bool:
        raise AssertionError("the holder asks nothing: it only sends")

    def send(self, pairs: list[tuple[bytes, bytes]]) -> bool:
        if self.down:
            self.refused += 1
            return False
        self.sent.append([(channel, codec.decode(data)) for channel, data in pairs])
        return True

    def subscribe(self, channel: bytes) -> None:
        raise AssertionError("the holder subscribes to nothing")

    async def first_attempt(self) -> None:
        raise AssertionError("the holder does not start the link")

    def unsubscribe(self, channel: bytes) -> None:
        raise AssertionError("the holder subscribes to nothing")

    async def subscribed(self, channel: bytes) -> None:
        raise AssertionError("the holder subscribes to nothing")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise AssertionError("the holder does not run the link")

    async def leave(self) -> None:
        raise AssertionError("the holder does not run the link")

    def close(self) -> None:
        raise AssertionError("the holder does not run the link")


def holder(*peers: FakePeer, link: FakeLink | None = None) -> tuple[Holder, FakeLink]:
    """A holder on ``NODE`` whose routing table holds ``peers``."""
    table: RoutingTable[Peer] = RoutingTable()
    for peer in peers:
        table.add(peer.client_id, peer)
    link = link or FakeLink()
    return Holder(NODE, table, CHANNELS, link), link


def text(payload: bytes) -> bytes:
    """An unmasked final text frame, written out here (payloads under 126 bytes)."""
    assert len(payload) < 126
    return bytes((0x81, len(payload))) + payload


def deliver(origin: str, seq: int, message: bytes = b'{"n":1}') -> codec.Deliver:
    return codec.Deliver(origin, seq, "alice", message)


def answers(origin: str, *pairs: tuple[int, int]) -> tuple[bytes, codec.Message]:
    """What ``NODE`` publishes to ``origin``: its answers, as (seq, value) pairs."""
    return CHANNELS.of_node(origin), codec.Answers(NODE, [codec.Answer(*p) for p in pairs])


def test_a_delivery_reaches_every_holder_in_its_dialect_and_is_answered() -> None:
    v1, seed = FakePeer("bob"), FakePeer("bob", Dialect.SEED)
    node, link = holder(v1, seed, FakePeer("carol"))
    node.take(CHANNELS.of_id("bob"), deliver("there", 7))
    assert v1.offered == [text(b'{"type":"message","from":"alice","message":{"n":1}}')]
    assert seed.offered == [text(b'{"n":1}')]
    node.flush()
    assert link.sent == [[answers("there", (7, codec.Verdict.DELIVERED))]]


def test_a_delivery_every_holder_refuses_is_answered_busy() -> None:
    bob = FakePeer("bob", full=True)
    node, link = holder(bob, FakePeer("carol"))
    node.take(CHANNELS.of_id("bob"), deliver("there", 3))
    node.flush()
    assert len(bob.offered) == 1
    assert link.sent == [[answers("there", (3, codec.Verdict.BUSY))]]


def test_a_delivery_for_an_id_no_longer_held_is_answered_gone() -> None:
    carol = FakePeer("carol")
    node, link = holder(carol)
    node.take(CHANNELS.of_id("bob"), deliver("there", 4))
    node.flush()
    assert carol.offered == []
    assert link.sent == [[answers("there", (4, codec.Verdict.GONE))]]


def test_a_delivery_on_a_channel_that_is_no_id_channel_is_answered_gone() -> None:
    bob = FakePeer("bob")
    node, link = holder(bob)
    node.take(b"relayd:node:bob", deliver("there", 5))
    node.take(b"relayd:id:\xff", deliver("there", 6))  # no UTF-8 id
    node.flush()
    assert bob.offered == []
    assert link.sent == [[answers("there", (5, codec.Verdict.GONE), (6, codec.Verdict.GONE))]]


def test_its_own_nodes_delivery_is_not_taken_twice() -> None:
    bob = FakePeer("bob")
    node, link = holder(bob)
    node.take(CHANNELS.of_id("bob"), deliver(NODE, 8))
    node.flush()
    assert bob.offered == []
    assert link.sent == []


def test_a_delivery_without_a_seq_is_delivered_and_not_answered() -> None:
    bob = FakePeer("bob")
    node, link = holder(bob)
    node.take(CHANNELS.of_id("bob"), deliver("there", 0))
    node.flush()
    assert len(bob.offered) == 1
    assert link.sent == []


def test_a_presence_question_is_answered_with_the_count_and_closes_nothing() -> None:
    peers = [FakePeer("bob"), FakePeer("bob"), FakePeer("carol")]
    node, link = holder(*peers)
    node.take(CHANNELS.of_id("bob"), codec.Query("there", 9, codec.QueryKind.PRESENCE))
    node.take(CHANNELS.of_id("dave"), codec.Query("there", 10, codec.QueryKind.PRESENCE))
    node.take(b"relayd:nodes", codec.Query("there", 11, codec.QueryKind.PRESENCE))
    node.flush()
    assert link.sent == [[answers("there", (9, 2), (10, 0), (11, 0))]]
    assert [peer.disconnected for peer in peers] == [[], [], []]
    assert [peer.offered for peer in peers] == [[], [], []]


def test_a_disconnect_closes_every_holder_and_is_answered_with_the_count() -> None:
    peers = [FakePeer("bob"), FakePeer("bob"), FakePeer("carol")]
    node, link = holder(*peers)
    query = codec.Query("there", 12, codec.QueryKind.DISCONNECT, 4000, "kicked")
    node.take(CHANNELS.of_id("bob"), query)
    node.flush()
    assert link.sent == [[answers("there", (12, 2))]]
    assert [peer.disconnected for peer in peers] == [[(4000, "kicked")], [(4000, "kicked")], []]


def test_a_page_of_ids_is_the_smallest_after_the_cursor_in_order() -> None:
    node, link = holder(*(FakePeer(client_id) for client_id in ["d", "b", "e", "a", "c"]))
    node.take(CHANNELS.nodes, codec.ListIds("there", 1, None, 3))
    node.take(CHANNELS.nodes, codec.ListIds("there", 2, "b", 2))
    node.take(CHANNELS.nodes, codec.ListIds("elsewhere", 3, "c", 10))
    node.take(CHANNELS.nodes, codec.ListIds("there", 4, "e", 10))
    node.flush()
    there = CHANNELS.of_node("there")
    assert link.sent == [
        [
            (there, codec.Ids(NODE, 1, ["a", "b", "c"])),
            (there, codec.Ids(NODE, 2, ["c", "d"])),
            (CHANNELS.of_node("elsewhere"), codec.Ids(NODE, 3, ["d", "e"])),
            (there, codec.Ids(NODE, 4, [])),
        ]
    ]


def test_the_answers_owed_go_out_in_one_batch_one_message_per_origin() -> None:
    node, link = holder(FakePeer("bob"), FakePeer("carol", full=True))
    node.take(CHANNELS.of_id("bob"), deliver("one", 1))
    node.take(CHANNELS.of_id("carol"), deliver("two", 1))
    node.take(CHANNELS.of_id("carol"), deliver("one", 2))
    node.take(CHANNELS.nodes, codec.ListIds("two", 2, None, 1))
    node.take(CHANNELS.of_id("bob"), codec.Query("two", 3, codec.QueryKind.PRESENCE))
    assert link.sent == []  # nothing before the flush
    node.flush()
    assert link.sent == [
        [
            answers("one", (1, codec.Verdict.DELIVERED), (2, codec.Verdict.BUSY)),
            answers("two", (1, codec.Verdict.BUSY), (3, 1)),
            (CHANNELS.of_node("two"), codec.Ids(NODE, 2, ["bob"])),
        ]
    ]


def test_a_flush_with_nothing_owed_publishes_nothing() -> None:
    node, link = holder(FakePeer("bob"))
    node.flush()
    assert link.sent == []
    assert link.refused == 0
    node.take(CHANNELS.of_id("bob"), deliver("there", 1))
    node.flush()
    node.flush()  # everything owed went out with the first
    assert link.sent == [[answers("there", (1, codec.Verdict.DELIVERED))]]


def test_answers_the_link_refuses_are_dropped_not_kept() -> None:
    node, link = holder(FakePeer("bob"))
    link.down = True
    node.take(CHANNELS.of_id("bob"), deliver("there", 1))
    node.take(CHANNELS.nodes, codec.ListIds("there", 2, None, 5))
    node.flush()
    assert link.refused == 1
    link.down = False
    node.take(CHANNELS.of_id("bob"), deliver("there", 3))
    node.flush()
    assert link.sent == [[answers("there", (3, codec.Verdict.DELIVERED))]]


def test_the_answer_is_these_bytes_on_the_origins_channel() -> None:
    # The bytes themselves, not their decoding: what another node's relayd reads.
    raw: list[list[tuple[bytes, bytes]]] = []

    class RawLink(FakeLink):
        def send(self, pairs: list[tuple[bytes, bytes]]) -> bool:
            raw.append(pairs)
            return True

    node, _ = holder(FakePeer("bob"), link=RawLink())
    node.take(CHANNELS.of_id("bob"), deliver("there", 7))
    node.flush()
    assert raw == [[(b"relayd:node:there", msgspec.msgpack.encode([3, "here", [[7, 0]]]))]]

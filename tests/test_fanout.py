"""Tests for relayd.routing.fanout.offer: one message offered to every connection holding an id.

Plain values only: each fake peer records the frames it was offered and takes or
refuses them as the test says; no outbox, no trio.
"""

from __future__ import annotations

import msgspec
import pytest

from relayd.routing import fanout
from relayd.routing.fanout import offer
from relayd.routing.table import Outcome
from relayd.wire.dialects import Dialect, delivery_payload


class FakePeer:
    """A connection holding an id: takes offered frames unless ``full``."""

    def __init__(self, dialect: Dialect, *, full: bool = False) -> None:
        self.client_id = "bob"
        self.dialect = dialect
        self.conn = 1
        self.full = full
        self.offered: list[bytes] = []

    def deliver(self, frame: bytes) -> bool:
        self.offered.append(frame)
        return not self.full

    def reply(self, frame: bytes | None) -> None:
        raise AssertionError("offer never replies")

    def detach(self) -> None:
        raise AssertionError("offer never detaches")

    def disconnect(self, code: int, reason: str) -> None:
        raise AssertionError("offer never disconnects")


def text(payload: bytes) -> bytes:
    """An unmasked final text frame, written out here (payloads under 126 bytes)."""
    assert len(payload) < 126
    return bytes((0x81, len(payload))) + payload


MESSAGE = msgspec.Raw(b'{"n":1}')
V1_FRAME = text(b'{"type":"message","from":"alice","message":{"n":1}}')
SEED_FRAME = text(b'{"n":1}')


def test_nobody_holds_the_id() -> None:
    assert offer([], "alice", MESSAGE) is Outcome.UNKNOWN_RECIPIENT


@pytest.mark.parametrize(("dialect", "frame"), [(Dialect.V1, V1_FRAME), (Dialect.SEED, SEED_FRAME)])
def test_one_holder_takes_it_in_its_dialect(dialect: Dialect, frame: bytes) -> None:
    peer = FakePeer(dialect)
    assert offer([peer], "alice", MESSAGE) is Outcome.DELIVERED
    assert peer.offered == [frame]


def test_a_seed_holder_receives_a_string_message_as_its_text() -> None:
    peer = FakePeer(Dialect.SEED)
    assert offer([peer], "alice", msgspec.Raw(b'"hi \\u0021"')) is Outcome.DELIVERED
    assert peer.offered == [text(b"hi !")]


def test_one_full_holder_is_busy() -> None:
    peer = FakePeer(Dialect.V1, full=True)
    assert offer([peer], "alice", MESSAGE) is Outcome.RECIPIENT_BUSY
    assert peer.offered == [V1_FRAME]


def test_every_holder_is_offered_it_even_after_one_took_it() -> None:
    peers = [FakePeer(Dialect.V1), FakePeer(Dialect.V1, full=True), FakePeer(Dialect.V1)]
    assert offer(peers, "alice", MESSAGE) is Outcome.DELIVERED
    assert [peer.offered for peer in peers] == [[V1_FRAME]] * 3


@pytest.mark.parametrize("taker", [0, 1])
def test_one_holder_of_two_taking_it_is_delivered(taker: int) -> None:
    peers = [FakePeer(Dialect.V1, full=True), FakePeer(Dialect.SEED, full=True)]
    peers[taker].full = False
    assert offer(peers, "alice", MESSAGE) is Outcome.DELIVERED
    assert [peer.offered for peer in peers] == [[V1_FRAME], [SEED_FRAME]]


def test_every_holder_full_is_busy() -> None:
    peers = [FakePeer(Dialect.SEED, full=True), FakePeer(Dialect.V1, full=True)]
    assert offer(peers, "alice", MESSAGE) is Outcome.RECIPIENT_BUSY
    assert [peer.offered for peer in peers] == [[SEED_FRAME], [V1_FRAME]]


@pytest.mark.parametrize("first", [Dialect.V1, Dialect.SEED])
def test_each_holder_gets_its_own_dialects_frame(first: Dialect) -> None:
    second = Dialect.SEED if first is Dialect.V1 else Dialect.V1
    peers = [FakePeer(first), FakePeer(second), FakePeer(first), FakePeer(second)]
    assert offer(peers, "alice", MESSAGE) is Outcome.DELIVERED
    expected = {Dialect.V1: V1_FRAME, Dialect.SEED: SEED_FRAME}
    assert [peer.offered for peer in peers] == [[expected[peer.dialect]] for peer in peers]


def test_the_message_is_encoded_once_per_dialect(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[Dialect] = []

    def counting(dialect: Dialect, sender: str, message: msgspec.Raw) -> bytes:
        encoded.append(dialect)
        return delivery_payload(dialect, sender, message)

    monkeypatch.setattr(fanout, "delivery_payload", counting)
    peers = [FakePeer(Dialect.V1), FakePeer(Dialect.SEED), FakePeer(Dialect.V1)]
    peers += [FakePeer(Dialect.SEED), FakePeer(Dialect.V1)]
    assert offer(peers, "alice", MESSAGE) is Outcome.DELIVERED
    assert encoded == [Dialect.V1, Dialect.SEED]
    # The same frame object for every holder of one dialect: encoded once, shared.
    assert peers[0].offered[0] is peers[2].offered[0] is peers[4].offered[0]
    assert peers[1].offered[0] is peers[3].offered[0]

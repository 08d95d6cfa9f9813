"""The pure parts of the cluster: the inter-node format, channel names, answers awaited, backoff.

No sockets and no trio: values in, values out, with hypothesis where inputs are open.
"""

from __future__ import annotations

import random
import tracemalloc

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.routing.cluster import codec
from relayd.routing.cluster.backoff import FIRST_WAIT_S, Backoff
from relayd.routing.cluster.codec import Verdict
from relayd.routing.cluster.pending import ORDER_SLACK, Decided, Kind, Waiting

names = st.text(st.characters(codec=None, exclude_categories=["Cs"]), max_size=40)
seqs = st.integers(min_value=0, max_value=2**63 - 1)

messages = st.one_of(
    st.builds(codec.Deliver, names, seqs, names, st.binary(max_size=200)),
    st.builds(
        codec.Query, names, seqs, st.sampled_from(codec.QueryKind), st.integers(0, 4999), names
    ),
    st.builds(
        codec.Answers, names, st.lists(st.builds(codec.Answer, seqs, st.integers(-1, 10**6)))
    ),
    st.builds(codec.ListIds, names, seqs, st.none() | names, st.integers(0, 10000)),
    st.builds(codec.Ids, names, seqs, st.lists(names, max_size=5)),
    st.builds(codec.Probe, names, seqs),
)


@given(messages)
def test_every_message_survives_the_round_trip(message: codec.Message) -> None:
    assert codec.decode(codec.encode(message)) == message


def test_a_body_travels_as_its_raw_json_bytes() -> None:
    body = b'{"text": "h\\u00e9llo", "n": [1, 2.50]}'
    data = codec.encode(codec.Deliver("node-a", 7, "sender", body))
    decoded = codec.decode(data)
    assert isinstance(decoded, codec.Deliver)
    assert decoded.message == body  # byte for byte: nothing re-encoded it


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", msgspec.msgpack.encode([99, "x"]), msgspec.json.encode({"to": "x"})],
)
def test_what_is_not_a_message_raises_decode_error(data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        codec.decode(data)


def test_channel_names() -> None:
    channels = codec.Channels("relayd:")
    assert channels.of_id("abc") == b"relayd:id:abc"
    assert channels.of_node("n1") == b"relayd:node:n1"
    assert channels.nodes == b"relayd:nodes"
    assert channels.heartbeats == b"relayd:heartbeats"
    assert channels.id_of(b"relayd:id:abc") == "abc"
    assert channels.id_of(b"relayd:node:n1") is None
    assert channels.id_of(b"other:id:abc") is None
    assert channels.id_of(b"relayd:id:\xff") is None


@given(names)
def test_an_id_comes_back_from_its_channel(client_id: str) -> None:
    channels = codec.Channels("c1:")
    assert channels.id_of(channels.of_id(client_id)) == client_id


# --- Waiting: the outcome a sender hears ------------------------------------------------------


def test_questions_are_numbered_on_from_the_first_number_given_never_from_0() -> None:
    waiting: Waiting[str] = Waiting(2.0, first=7)
    assert [waiting.ask(asker, Kind.RELAY, 0.0) for asker in "abc"] == [7, 8, 9]
    # An answer to a number this Waiting never gave (another process's) decides nothing.
    assert waiting.answer(1, Verdict.DELIVERED) is None
    assert len(waiting) == 3
    with pytest.raises(ValueError, match="above 0"):
        Waiting(2.0, first=0)  # 0 means "nobody waits" on the wire


def test_the_first_delivered_answer_decides_at_once() -> None:
    waiting: Waiting[str] = Waiting(2.0)
    seq = waiting.ask("alice", Kind.RELAY, 0.0)
    waiting.expect(seq, 3)
    assert waiting.answer(seq, Verdict.BUSY) is None
    assert waiting.answer(seq, Verdict.DELIVERED) == ("alice", Verdict.DELIVERED)
    assert waiting.answer(seq, Verdict.DELIVERED) is None  # decided once
    assert len(waiting) == 0


@pytest.mark.parametrize(
    ("verdicts", "outcome"),
    [
        ([Verdict.BUSY, Verdict.BUSY], Verdict.BUSY),
        ([Verdict.GONE, Verdict.BUSY], Verdict.BUSY),
        ([Verdict.BUSY, Verdict.GONE], Verdict.BUSY),  # a busy holder is not forgotten
        ([Verdict.GONE, Verdict.GONE], Verdict.GONE),
    ],
)
def test_without_a_delivery_all_answers_decide(verdicts: list[Verdict], outcome: Verdict) -> None:
    waiting: Waiting[str] = Waiting(2.0)
    seq = waiting.ask("alice", Kind.RELAY, 0.0)
    waiting.expect(seq, len(verdicts))
    *first, last = verdicts
    for verdict in first:
        assert waiting.answer(seq, verdict) is None
    assert waiting.answer(seq, last) == ("alice", outcome)


def test_answers_may_come_before_the_count_of_receivers() -> None:
    waiting: Waiting[str] = Waiting(2.0)
    seq = waiting.ask("alice", Kind.RELAY, 0.0)
    assert waiting.answer(seq, Verdict.BUSY) is None  # the publish's reply is still on its way
    assert waiting.expect(seq, 1) == ("alice", Verdict.BUSY)


def test_nobody_received_it() -> None:
    waiting: Waiting[str] = Waiting(2.0)
    seq = waiting.ask("alice", Kind.RELAY, 0.0)
    assert waiting.expect(seq, 0) == ("alice", Verdict.GONE)


def test_missing_answers_leave_the_delivery_unconfirmed_at_the_deadline() -> None:
    waiting: Waiting[str] = Waiting(2.0)
    first = waiting.ask("alice", Kind.RELAY, 0.0)
    second = waiting.ask("bob", Kind.RELAY, 1.0)
    waiting.expect(first, 2)
    waiting.expect(second, 1)
    waiting.answer(first, Verdict.BUSY)
    assert waiting.next_deadline == 2.0
    assert list(waiting.expire(1.999)) == []
    assert list(waiting.expire(2.0)) == [("alice", Decided.UNCONFIRMED)]
    assert waiting.next_deadline == 3.0
    assert waiting.answer(second, Verdict.DELIVERED) == ("bob", Verdict.DELIVERED)
    assert waiting.next_deadline is None
    assert list(waiting.expire(10.0)) == []


def test_counting_questions_sum_what_came() -> None:
    waiting: Waiting[str] = Waiting(2.0)
    seq = waiting.ask("api", Kind.COUNT, 0.0)
    waiting.expect(seq, 3)
    assert waiting.answer(seq, 2) is None
    assert waiting.answer(seq, 1) is None
    assert waiting.answer(seq, 4) == ("api", 7)
    late = waiting.ask("api", Kind.COUNT, 0.0)
    waiting.expect(late, 2)
    waiting.answer(late, 5)
    assert list(waiting.expire(2.0)) == [("api", 5)]


def test_a_node_holding_none_counts_none() -> None:
    waiting: Waiting[str] = Waiting(2.0)
    seq = waiting.ask("api", Kind.COUNT, 0.0)
    waiting.expect(seq, 3)
    assert waiting.answer(seq, 0) is None
    assert waiting.answer(seq, -1) is None  # nonsense from a broken node adds nothing
    assert waiting.answer(seq, 2) == ("api", 2)


def test_a_lost_link_decides_everything_open() -> None:
    waiting: Waiting[str] = Waiting(2.0)
    waiting.ask("alice", Kind.RELAY, 0.0)
    count = waiting.ask("api", Kind.COUNT, 0.0)
    waiting.answer(count, 3)
    assert sorted(map(str, waiting.abandon())) == sorted(
        map(str, [("alice", Decided.UNCONFIRMED), ("api", 3)])
    )
    assert len(waiting) == 0
    assert waiting.next_deadline is None


# Steps of a node's life: ask at the clock's time, decide the i-th open question (an
# answer, or a withdrawal), move the clock on, expire what is due.
steps = st.lists(
    st.one_of(
        st.just(("ask", 0)),
        st.tuples(st.sampled_from(["deliver", "withdraw"]), st.integers(0, 20)),
        st.tuples(st.just("tick"), st.integers(1, 1500)),  # milliseconds
        st.just(("expire", 0)),
    ),
    max_size=80,
)


@given(steps)
def test_questions_expire_oldest_first_at_their_deadlines_whatever_was_answered(
    script: list[tuple[str, int]],
) -> None:
    waiting: Waiting[int] = Waiting(2.0)
    now_ms = 0
    model: dict[int, tuple[float, int]] = {}  # seq -> (deadline, asker), oldest first
    for kind, value in script:
        now = now_ms / 1000
        if kind == "ask":
            seq = waiting.ask(len(model) + now_ms * 100, Kind.RELAY, now)
            model[seq] = (now + 2.0, len(model) + now_ms * 100)
        elif kind in ("deliver", "withdraw") and model:
            seq = list(model)[value % len(model)]
            _, asker = model.pop(seq)
            if kind == "deliver":
                assert waiting.answer(seq, Verdict.DELIVERED) == (asker, Verdict.DELIVERED)
            else:
                assert waiting.withdraw(seq) == asker
        elif kind == "tick":
            now_ms += value
        elif kind == "expire":
            due = [seq for seq, (deadline, _) in model.items() if deadline <= now]
            expected = [(model.pop(seq)[1], Decided.UNCONFIRMED) for seq in due]
            assert list(waiting.expire(now)) == expected
        assert len(waiting) == len(model)
        oldest = min((deadline for deadline, _ in model.values()), default=None)
        assert waiting.next_deadline == oldest


def test_answered_questions_leave_nothing_behind() -> None:
    waiting: Waiting[int] = Waiting(2.0)
    for warm in range(3000):  # the deque's blocks and the dict's table, at their size
        waiting.answer(waiting.ask(warm, Kind.RELAY, 0.0), Verdict.DELIVERED)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for asker in range(100_000):  # 50,000 msg/s for 2 s, each answered at once
            seq = waiting.ask(asker, Kind.RELAY, asker / 50_000)
            assert waiting.answer(seq, Verdict.DELIVERED) == (asker, Verdict.DELIVERED)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Numbers of answered questions: at most ORDER_SLACK of them, about 40 bytes each
    # (the int and its slot), not one per question of the last timeout (4 MB here).
    assert kept < ORDER_SLACK * 48 + 4096
    assert waiting.next_deadline is None
    assert list(waiting.expire(1e9)) == []


# --- Backoff ------------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_the_maximum_and_resets() -> None:
    backoff = Backoff(1.0, random.Random(7))
    waits = [backoff.next_wait() for _ in range(8)]
    steps = [min(FIRST_WAIT_S * 2**i, 1.0) for i in range(8)]
    for wait, step in zip(waits, steps, strict=True):
        assert step / 2 <= wait <= step
    assert len(set(waits)) == len(waits)  # jittered
    backoff.reset()
    assert backoff.next_wait() <= FIRST_WAIT_S


# -- the bytes between nodes --------------------------------------------------------

#: Each message as this version publishes it (MessagePack, arrays with a tag first).
#: Nodes of a cluster read each other's bytes, so a change here breaks a rolling
#: upgrade: it must be deliberate, and seen.
WIRE = [
    (codec.Deliver("n1", 7, "alice", b'"hi"'), "9501a26e3107a5616c696365c40422686922"),
    (codec.Query("n1", 8, codec.QueryKind.PRESENCE), "9602a26e31080000a0"),
    (
        codec.Query("n1", 9, codec.QueryKind.DISCONNECT, 1008, "bye"),
        "9602a26e310901cd03f0a3627965",
    ),
    (
        codec.Answers(
            "n2",
            [
                codec.Answer(7, Verdict.DELIVERED),
                codec.Answer(8, Verdict.BUSY),
                codec.Answer(9, Verdict.GONE),
            ],
        ),
        "9303a26e3293920700920801920902",
    ),
    (codec.ListIds("n1", 10, None, 100), "9504a26e310ac064"),
    (codec.Ids("n2", 10, ["a", "b"]), "9405a26e320a92a161a162"),
    (codec.Probe("n1", 3), "9306a26e3103"),
]


@pytest.mark.parametrize(("message", "wire"), WIRE, ids=lambda v: type(v).__name__)
def test_each_message_has_the_bytes_other_nodes_read(message: codec.Message, wire: str) -> None:
    assert codec.encode(message).hex() == wire
    assert codec.decode(bytes.fromhex(wire)) == message


@pytest.mark.parametrize(
    "message",
    [*(m for m, _ in WIRE), codec.Answer(7, Verdict.BUSY)],
    ids=lambda v: type(v).__name__,
)
def test_messages_are_immutable(message: codec.Message | codec.Answer) -> None:
    field = message.__struct_fields__[0]
    with pytest.raises(AttributeError):
        setattr(message, field, "changed")


def test_the_first_retry_comes_within_a_tenth_of_a_second() -> None:
    # A Redis restart takes a fraction of a second (backoff.py); without a
    # seeded source the jitter is still drawn.
    backoff = Backoff(30.0)
    first = backoff.next_wait()
    assert 0.05 <= first <= 0.1
    assert 0.1 <= backoff.next_wait() <= 0.2

"""Tests for relayd.routing.outbox: the bounded hand-over between the router and a writer.

The outbox is pure (no trio, no clock), so every test here is plain values; a
model test runs random sequences of operations against a few lines of
bookkeeping that say what the outbox must hold. Waking the writer and the
reader, and the slow-consumer clock, belong to the connection
(tests/test_connection.py, tests/test_server.py).
"""

from __future__ import annotations

import gc

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.routing.outbox import TAKE_BYTES, Offer, Outbox

CAPACITY = 3


def make(capacity: int = CAPACITY) -> Outbox:
    return Outbox(capacity)


# --- deliveries ---------------------------------------------------------------------------------


def test_new_outbox_is_open_and_empty() -> None:
    box = make()
    assert (box.closed, len(box), box.has_frames(), box.dropped) == (False, 0, False, 0)


def test_offer_queues_deliveries_up_to_capacity_then_says_full() -> None:
    box = make()
    assert [box.offer(b"d%d" % i) for i in range(CAPACITY)] == [Offer.QUEUED] * CAPACITY
    assert len(box) == CAPACITY
    assert box.offer(b"one too many") is Offer.FULL
    assert len(box) == CAPACITY
    assert box.take() == [b"d0", b"d1", b"d2"]


def test_take_makes_room_for_deliveries_again() -> None:
    box = make(capacity=1)
    assert box.offer(b"a") is Offer.QUEUED
    assert box.offer(b"refused") is Offer.FULL
    assert box.take() == [b"a"]
    assert box.offer(b"room again") is Offer.QUEUED


# --- reply slots --------------------------------------------------------------------------------


def test_reserve_takes_up_to_capacity_reply_slots() -> None:
    box = make()
    assert box.reserve(2)
    assert not box.reserve(2)
    assert box.reserve(1)
    assert not box.reserve(1)


def test_reply_slots_are_independent_of_deliveries() -> None:
    box = make()
    for i in range(CAPACITY):
        assert box.offer(b"d%d" % i) is Offer.QUEUED
    assert box.offer(b"refused") is Offer.FULL
    assert box.reserve(CAPACITY)
    assert [box.reply(b"r%d" % i) for i in range(CAPACITY)] == [True] * CAPACITY
    assert len(box) == 2 * CAPACITY
    assert box.take() == [b"d0", b"d1", b"d2", b"r0", b"r1", b"r2"]


def test_replies_do_not_use_up_room_for_deliveries() -> None:
    box = make()
    assert box.reserve(CAPACITY)
    for i in range(CAPACITY):
        box.reply(b"r%d" % i)
    assert [box.offer(b"d%d" % i) for i in range(CAPACITY)] == [Offer.QUEUED] * CAPACITY


def test_reply_none_frees_its_slot_and_queues_nothing() -> None:
    box = make()
    assert box.reserve(CAPACITY)
    assert box.reply(None) is False
    assert len(box) == 0
    assert box.reserve(1)
    assert not box.reserve(1)


def test_reply_frame_is_queued_and_holds_its_slot_until_taken() -> None:
    box = make()
    assert box.reserve(CAPACITY)
    assert box.reply(b"ack") is True
    assert len(box) == 1
    assert not box.reserve(1)
    assert box.take() == [b"ack"]
    assert box.reserve(1)
    assert not box.reserve(1)


def test_take_frees_only_the_slots_its_replies_held() -> None:
    box = make()
    assert box.reserve(CAPACITY)
    box.reply(b"ack")  # one slot now held by a queued reply, two still reserved
    box.take()
    assert box.reserve(1)
    assert not box.reserve(1)


def test_reserve_beyond_takes_slots_past_capacity_and_each_still_holds_its_reply() -> None:
    box = Outbox(2)
    assert box.reserve(2)
    assert not box.reserve(1)
    box.reserve_beyond(3)  # a closing connection's last read: no wait for room
    for n in range(5):
        box.reply(b"r%d" % n)
    assert box.take() == [b"r0", b"r1", b"r2", b"r3", b"r4"]  # none dropped
    assert box.reserve(2)  # the bound again, once they are taken


def test_reserve_always_succeeds_once_closed() -> None:
    box = make()
    assert box.reserve(CAPACITY)
    box.close()
    assert box.reserve(CAPACITY)
    assert box.reserve(1)


# --- control frames -----------------------------------------------------------------------------


def test_control_frames_go_ahead_of_messages() -> None:
    box = make()
    box.offer(b"d0")
    assert box.reserve(1)
    box.reply(b"r0")
    assert box.control(b"pong1")
    box.offer(b"d1")
    box.control(b"pong2")
    assert box.take() == [b"pong1", b"pong2", b"d0", b"r0", b"d1"]
    assert box.take() == []


def test_only_the_latest_16_control_frames_are_kept() -> None:
    box = make()
    pongs = [b"pong%d" % i for i in range(16 + 5)]
    for pong in pongs:
        box.control(pong)
    assert box.take() == pongs[-16:]


def test_control_frames_are_outside_the_bounds_and_len() -> None:
    box = make()
    for i in range(16):
        box.control(b"pong%d" % i)
    assert len(box) == 0
    assert box.has_frames()
    assert [box.offer(b"d%d" % i) for i in range(CAPACITY)] == [Offer.QUEUED] * CAPACITY
    assert box.reserve(CAPACITY)
    assert len(box) == CAPACITY


# --- take ---------------------------------------------------------------------------------------


def test_take_on_an_empty_outbox_returns_nothing() -> None:
    box = make()
    assert box.take() == []


def test_take_takes_everything_oldest_first() -> None:
    box = make()
    assert box.reserve(2)
    box.offer(b"d0")
    box.reply(b"r0")
    box.offer(b"d1")
    box.reply(b"r1")
    assert box.take() == [b"d0", b"r0", b"d1", b"r1"]
    assert len(box) == 0
    assert not box.has_frames()
    assert box.take() == []


def test_take_takes_up_to_64_kib_at_least_one_frame() -> None:
    box = make(capacity=4)
    big = b"b" * (32768 + 1)
    for frame in (big, big, b"s1", b"s2"):
        assert box.offer(frame) is Offer.QUEUED
    assert box.take() == [big]  # two would pass 64 KiB
    assert box.take() == [big, b"s1", b"s2"]
    huge = b"h" * (65536 * 2)
    assert box.offer(huge) is Offer.QUEUED
    assert box.take() == [huge]  # alone over the budget: still taken


def test_a_partial_take_frees_the_slots_of_the_replies_it_took_and_no_more() -> None:
    box = make(capacity=2)
    big = b"r" * 65536
    assert box.reserve(2)
    box.reply(big)
    box.reply(big)
    assert box.offer(b"d1") is Offer.QUEUED
    assert not box.reserve(1)  # both reply slots hold unwritten replies
    assert box.take() == [big]
    assert box.reserve(1)  # the reply taken freed its slot, the other still holds one
    assert not box.reserve(1)
    assert box.offer(b"d2") is Offer.QUEUED  # one delivery of two queued: room for another
    assert box.offer(b"d3") is Offer.FULL
    assert box.take() == [big]
    assert box.take() == [b"d1", b"d2"]


def test_a_partial_take_of_deliveries_leaves_replies_counted_as_replies() -> None:
    # A delivery taken must free a delivery's room, never a reply slot.
    box = make(capacity=2)
    big = b"d" * 65536
    assert box.offer(big) is Offer.QUEUED
    assert box.offer(big) is Offer.QUEUED
    assert box.reserve(2)
    box.reply(b"r1")
    box.reply(b"r2")
    assert box.take() == [big]
    assert box.offer(b"d3") is Offer.QUEUED  # a delivery's room came back (an Offer is true)
    assert not box.reserve(1)  # both reply slots are still held by queued replies


def test_a_partial_take_frees_a_delivery_room_for_every_delivery_it_took() -> None:
    # Frames queued behind others (not only the first of a take) are told apart too.
    box = make(capacity=3)
    big = b"d" * (TAKE_BYTES // 2)
    for frame in (b"d0", big, big):
        assert box.offer(frame) is Offer.QUEUED
    assert box.take() == [b"d0", big]
    assert box.offer(b"d3") is Offer.QUEUED
    assert box.offer(b"d4") is Offer.QUEUED
    assert box.offer(b"d5") is Offer.FULL


def test_a_partial_take_frees_a_reply_slot_for_every_reply_it_took() -> None:
    box = make(capacity=2)
    big = b"r" * (TAKE_BYTES // 2)
    assert box.reserve(2)
    box.reply(b"r0")
    box.reply(big)
    assert box.offer(big) is Offer.QUEUED
    assert box.take() == [b"r0", big]
    assert box.reserve(2)  # both replies taken: both slots free


def _lists_held(box: Outbox) -> list[object]:
    return [o for o in gc.get_referents(box) if isinstance(o, list)]


def test_an_outbox_with_nothing_waiting_holds_no_list() -> None:
    # An idle connection's outbox: its memory is part of every idle connection's.
    box = make(capacity=2)
    assert _lists_held(box) == []
    assert box.offer(b"d0") is Offer.QUEUED
    assert box.control(b"pong")
    assert _lists_held(box)
    assert box.take() == [b"pong", b"d0"]
    assert _lists_held(box) == []
    huge = b"h" * (TAKE_BYTES + 1)
    assert box.offer(huge) is Offer.QUEUED
    assert box.take() == [huge]  # a partial take, of one frame
    assert _lists_held(box) == []
    assert box.reserve(1)
    box.reply(b"ack")
    box.discard()
    assert _lists_held(box) == []


# --- close and discard --------------------------------------------------------------------------


def test_close_refuses_deliveries_but_takes_replies_already_reserved() -> None:
    box = make()
    box.offer(b"d0")
    assert box.reserve(2)
    box.close()
    assert box.closed
    assert box.offer(b"late delivery") is Offer.CLOSED  # not a slow consumer: it is leaving
    assert box.reply(b"decided reply") is True
    assert not box.settled  # one reply still to come
    box.reply(None)
    assert box.take() == [b"d0", b"decided reply"]
    assert box.settled


def test_settled_needs_closed_empty_and_nothing_reserved() -> None:
    box = make()
    assert not box.settled  # open
    box.close()
    assert box.settled
    other = make()
    other.control(b"pong")
    other.close()
    assert not other.settled  # a control frame still waits
    other.take()
    assert other.settled


def test_discard_drops_everything_and_counts_the_messages() -> None:
    box = make()
    box.offer(b"d0")
    box.offer(b"d1")
    box.control(b"pong")  # a control frame is not a message
    assert box.reserve(2)
    box.reply(b"r0")
    box.discard()
    assert (box.closed, len(box), box.has_frames(), box.dropped) == (True, 0, False, 3)
    assert box.take() == []
    assert box.reply(b"late ack") is False  # decided after the discard: dropped too
    assert box.dropped == 4
    assert not box.control(b"late pong")
    assert box.offer(b"late delivery") is Offer.CLOSED
    assert box.take() == []


def test_a_reply_of_none_after_discard_drops_nothing() -> None:
    box = make()
    assert box.reserve(1)
    box.discard()
    box.reply(None)
    assert box.dropped == 0


# --- model --------------------------------------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.integers(1, 2)),  # 1: a small frame, 2: a big one
        st.tuples(st.just("reserve"), st.integers(1, CAPACITY)),
        st.tuples(st.just("reply"), st.integers(0, 2)),  # 0: reply(None), else a frame
        st.just(("control", 0)),
        st.just(("take", 0)),
        st.just(("close", 0)),
        st.just(("discard", 0)),
    ),
    max_size=40,
)


@settings(max_examples=300)
@given(ops=operations)
def test_outbox_matches_a_model_of_its_bounds(ops: list[tuple[str, int]]) -> None:
    # Big frames (more than half a take's bytes) make takes partial: the
    # model then knows which frames taken were replies and which deliveries.
    box = make()
    queue: list[tuple[bytes, bool]] = []  # frames, and whether each is a reply
    control: list[bytes] = []
    deliveries = replies = reserved = dropped = 0
    closed = discarded = False
    for i, (op, arg) in enumerate(ops):
        frame = b"%s-%d" % (op.encode(), i)
        if arg == 2:
            frame = frame.ljust(TAKE_BYTES // 2 + 1, b".")
        if op == "offer":
            expected = (
                Offer.CLOSED if closed else Offer.FULL if deliveries >= CAPACITY else Offer.QUEUED
            )
            assert box.offer(frame) is expected
            if expected is Offer.QUEUED:
                queue.append((frame, False))
                deliveries += 1
        elif op == "reserve":
            room = closed or reserved + replies + arg <= CAPACITY
            assert box.reserve(arg) is room
            reserved += arg if room else 0
        elif op == "reply":
            # With no slot reserved, a reply is a router's bug: dropped, counted.
            queued = bool(arg) and bool(reserved) and not discarded
            assert box.reply(frame if arg else None) is queued
            if queued:
                queue.append((frame, True))
                replies += 1
            elif arg:
                dropped += 1
            reserved = max(0, reserved - 1)
        elif op == "control":
            assert box.control(frame) is not discarded
            if not discarded:
                control = [*control, frame][-16:]
        elif op == "take":
            count, size = 0, 0
            for queued_frame, _ in queue:
                size += len(queued_frame)
                if count and size > TAKE_BYTES:
                    break
                count += 1
            taken, queue = queue[:count], queue[count:]
            assert box.take() == control + [f for f, _ in taken]
            control = []
            deliveries -= sum(not is_reply for _, is_reply in taken)
            replies -= sum(is_reply for _, is_reply in taken)
        elif op == "close":
            box.close()
            closed = True
        elif op == "discard":
            box.discard()
            dropped += len(queue)
            queue, control, deliveries, replies = [], [], 0, 0
            closed = discarded = True
        assert len(box) == len(queue)
        assert box.dropped == dropped
        assert box.settled is (closed and not reserved and not queue and not control)


def test_a_reply_without_a_reserved_slot_is_dropped_and_upsets_no_bound() -> None:
    box = make()
    assert box.reply(b"stray") is False
    assert box.reply(None) is False
    assert box.dropped == 1
    assert box.reserve(CAPACITY)  # every slot is still there
    box.close()
    box.reply(None)
    box.reply(None)
    box.reply(None)
    assert box.settled


def test_a_take_is_64_kib_exactly_and_not_a_byte_more() -> None:
    box = make(capacity=4)
    half = b"h" * 32768
    for frame in (half, half, half, b"h" * 32769):
        assert box.offer(frame) is Offer.QUEUED
    assert box.take() == [half, half]  # 65,536 bytes: both
    assert box.take() == [half]  # 65,537 bytes would be one too many
    assert box.take() == [b"h" * 32769]

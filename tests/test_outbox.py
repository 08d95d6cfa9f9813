"""Tests for relayd.routing.outbox: the bounded hand-over between the router and a writer.

No sockets and no sleeps: a waiting task is seen waiting with
``trio.testing.wait_all_tasks_blocked()``, time is moved with the autojump
clock, and every wait that could hang is bounded with ``trio.fail_after``. A
model test runs random sequences of operations against a few lines of
bookkeeping that say what the outbox must hold.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.routing.outbox import MAX_CONTROL_FRAMES, TAKE_BYTES, Outbox

CAPACITY = 3
TIMEOUT_S = 10.0
#: Real seconds a task in these tests may take to wake: nothing here waits on
#: anything but another task of the same test.
WAKE_S = 5.0


class Deadlines:
    """Records what the outbox tells its connection about the slow-consumer clock."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, deadline: float) -> None:
        self.calls.append(deadline)


def make(capacity: int = CAPACITY) -> tuple[Outbox, Deadlines]:
    deadlines = Deadlines()
    return Outbox(capacity, TIMEOUT_S, deadlines), deadlines


async def started(nursery: trio.Nursery, fn: Callable[[], Awaitable[object]]) -> trio.Event:
    """Run ``fn`` in ``nursery`` until it blocks; the event is set once it returns."""
    done = trio.Event()

    async def run() -> None:
        await fn()
        done.set()

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()
    return done


# --- deliveries ---------------------------------------------------------------------------------


async def test_offer_queues_deliveries_up_to_capacity_then_refuses() -> None:
    box, _ = make()
    assert [box.offer(b"d%d" % i) for i in range(CAPACITY)] == [True] * CAPACITY
    assert len(box) == CAPACITY
    assert box.offer(b"one too many") is False
    assert len(box) == CAPACITY
    assert box.take_nowait() == [b"d0", b"d1", b"d2"]


async def test_first_refusal_starts_the_slow_consumer_clock_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    box, deadlines = make()
    for i in range(CAPACITY):
        box.offer(b"d%d" % i)
    assert deadlines.calls == []
    refused_at = trio.current_time()
    assert not box.offer(b"x")
    assert deadlines.calls == [refused_at + TIMEOUT_S]
    autojump_clock.jump(3.0)
    assert not box.offer(b"y")
    assert not box.offer(b"z")
    assert deadlines.calls == [refused_at + TIMEOUT_S]  # not pushed back by later refusals


async def test_take_stops_the_slow_consumer_clock_with_inf() -> None:
    box, deadlines = make()
    for i in range(CAPACITY + 1):
        box.offer(b"d%d" % i)
    assert len(deadlines.calls) == 1
    assert box.take_nowait() == [b"d0", b"d1", b"d2"]
    assert deadlines.calls[1:] == [math.inf]
    assert box.offer(b"room again")


async def test_refusal_after_a_take_starts_the_clock_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    box, deadlines = make(capacity=1)
    box.offer(b"a")
    first_at = trio.current_time()
    assert not box.offer(b"refused")
    box.take_nowait()
    autojump_clock.jump(7.0)
    box.offer(b"b")
    again_at = trio.current_time()
    assert not box.offer(b"refused again")
    assert again_at > first_at
    assert deadlines.calls == [first_at + TIMEOUT_S, math.inf, again_at + TIMEOUT_S]


async def test_take_without_a_refusal_leaves_the_clock_alone() -> None:
    box, deadlines = make()
    box.offer(b"a")
    box.take_nowait()
    box.take_nowait()
    assert deadlines.calls == []


async def test_awaited_take_stops_the_slow_consumer_clock() -> None:
    box, deadlines = make(capacity=1)
    box.offer(b"a")
    box.offer(b"refused")
    with trio.fail_after(WAKE_S):
        assert await box.take() == [b"a"]
    assert deadlines.calls[-1] == math.inf


# --- reply slots --------------------------------------------------------------------------------


def test_reserve_takes_up_to_capacity_reply_slots() -> None:
    box, _ = make()
    assert box.reserve(2)
    assert not box.reserve(2)
    assert box.reserve(1)
    assert not box.reserve(1)


async def test_reply_slots_are_independent_of_deliveries() -> None:
    box, _ = make()
    for i in range(CAPACITY):
        assert box.offer(b"d%d" % i)
    assert not box.offer(b"refused")
    assert box.reserve(CAPACITY)
    for i in range(CAPACITY):
        box.reply(b"r%d" % i)
    assert len(box) == 2 * CAPACITY
    assert box.take_nowait() == [b"d0", b"d1", b"d2", b"r0", b"r1", b"r2"]


def test_replies_do_not_use_up_room_for_deliveries() -> None:
    box, _ = make()
    assert box.reserve(CAPACITY)
    for i in range(CAPACITY):
        box.reply(b"r%d" % i)
    assert [box.offer(b"d%d" % i) for i in range(CAPACITY)] == [True] * CAPACITY


def test_reply_none_frees_its_slot() -> None:
    box, _ = make()
    assert box.reserve(CAPACITY)
    box.reply(None)
    assert len(box) == 0
    assert box.reserve(1)
    assert not box.reserve(1)


def test_reply_frame_is_queued_and_holds_its_slot_until_taken() -> None:
    box, _ = make()
    assert box.reserve(CAPACITY)
    box.reply(b"ack")
    assert len(box) == 1
    assert not box.reserve(1)
    assert box.take_nowait() == [b"ack"]
    assert box.reserve(1)
    assert not box.reserve(1)


def test_take_frees_only_the_slots_its_replies_held() -> None:
    box, _ = make()
    assert box.reserve(CAPACITY)
    box.reply(b"ack")  # one slot now held by a queued reply, two still reserved
    box.take_nowait()
    assert box.reserve(1)
    assert not box.reserve(1)


async def test_wait_for_room_returns_at_once_when_there_is_room() -> None:
    box, _ = make()
    with trio.fail_after(WAKE_S):
        await box.wait_for_room(CAPACITY)
    assert not box.reserve(1)


async def test_wait_for_room_blocks_until_reply_none_frees_a_slot() -> None:
    box, _ = make()
    assert box.reserve(CAPACITY)
    async with trio.open_nursery() as nursery:
        done = await started(nursery, lambda: box.wait_for_room(1))
        assert not done.is_set()
        box.reply(None)
        with trio.fail_after(WAKE_S):
            await done.wait()
    assert not box.reserve(1)  # the waiter holds the slot it waited for


async def test_wait_for_room_blocks_until_take_frees_reply_slots() -> None:
    box, _ = make()
    assert box.reserve(CAPACITY)
    for i in range(CAPACITY):
        box.reply(b"r%d" % i)
    async with trio.open_nursery() as nursery:
        done = await started(nursery, lambda: box.wait_for_room(2))
        box.offer(b"delivery")  # deliveries make no room for replies
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert box.take_nowait() == [b"r0", b"r1", b"r2", b"delivery"]
        with trio.fail_after(WAKE_S):
            await done.wait()
    assert box.reserve(1)
    assert not box.reserve(1)


async def test_wait_for_room_for_several_slots_waits_for_all_of_them() -> None:
    box, _ = make()
    assert box.reserve(CAPACITY)
    async with trio.open_nursery() as nursery:
        done = await started(nursery, lambda: box.wait_for_room(2))
        box.reply(None)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        box.reply(None)
        with trio.fail_after(WAKE_S):
            await done.wait()
    assert not box.reserve(1)  # the waiter holds both slots it waited for


async def test_cancelled_wait_for_room_leaves_nothing_reserved() -> None:
    box, _ = make()
    assert box.reserve(CAPACITY)
    async with trio.open_nursery() as nursery:
        done = await started(nursery, lambda: box.wait_for_room(CAPACITY))
        nursery.cancel_scope.cancel()
    assert not done.is_set()
    for _ in range(CAPACITY):
        box.reply(None)
    assert box.reserve(CAPACITY)


async def test_close_releases_a_waiting_wait_for_room() -> None:
    box, _ = make()
    assert box.reserve(CAPACITY)
    async with trio.open_nursery() as nursery:
        done = await started(nursery, lambda: box.wait_for_room(1))
        box.close()
        with trio.fail_after(WAKE_S):
            await done.wait()


def test_reserve_always_succeeds_once_closed() -> None:
    box, _ = make()
    assert box.reserve(CAPACITY)
    box.close()
    assert box.reserve(CAPACITY)
    assert box.reserve(1)


# --- control frames -----------------------------------------------------------------------------


def test_control_frames_go_ahead_of_messages() -> None:
    box, _ = make()
    box.offer(b"d0")
    assert box.reserve(1)
    box.reply(b"r0")
    box.control(b"pong1")
    box.offer(b"d1")
    box.control(b"pong2")
    assert box.take_nowait() == [b"pong1", b"pong2", b"d0", b"r0", b"d1"]
    assert box.take_nowait() == []


def test_only_the_latest_control_frames_are_kept() -> None:
    box, _ = make()
    pongs = [b"pong%d" % i for i in range(MAX_CONTROL_FRAMES + 5)]
    for pong in pongs:
        box.control(pong)
    assert box.take_nowait() == pongs[-MAX_CONTROL_FRAMES:]


def test_control_frames_are_outside_the_bounds_and_len() -> None:
    box, _ = make()
    for i in range(MAX_CONTROL_FRAMES):
        box.control(b"pong%d" % i)
    assert len(box) == 0
    assert [box.offer(b"d%d" % i) for i in range(CAPACITY)] == [True] * CAPACITY
    assert box.reserve(CAPACITY)
    assert len(box) == CAPACITY


# --- take and close -----------------------------------------------------------------------------


def test_take_nowait_on_an_empty_outbox_returns_nothing() -> None:
    box, _ = make()
    assert box.take_nowait() == []


def test_take_nowait_takes_everything_oldest_first() -> None:
    box, _ = make()
    assert box.reserve(2)
    box.offer(b"d0")
    box.reply(b"r0")
    box.offer(b"d1")
    box.reply(b"r1")
    assert box.take_nowait() == [b"d0", b"r0", b"d1", b"r1"]
    assert len(box) == 0
    assert box.take_nowait() == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [("offer", [b"delivery"]), ("reply", [b"reply"]), ("control", [b"pong"])],
)
async def test_take_waits_for_a_frame_and_takes_it(name: str, expected: list[bytes]) -> None:
    box, _ = make()
    assert box.reserve(1)
    taken: list[list[bytes]] = []

    async def writer() -> None:
        taken.append(await box.take())

    async with trio.open_nursery() as nursery:
        done = await started(nursery, writer)
        assert not done.is_set()
        if name == "offer":
            box.offer(b"delivery")
        elif name == "reply":
            box.reply(b"reply")
        else:
            box.control(b"pong")
        with trio.fail_after(WAKE_S):
            await done.wait()
    assert taken == [expected]


async def test_reply_none_does_not_wake_a_waiting_take() -> None:
    box, _ = make()
    assert box.reserve(1)
    async with trio.open_nursery() as nursery:
        done = await started(nursery, box.take)
        box.reply(None)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        box.close()
        with trio.fail_after(WAKE_S):
            await done.wait()


async def test_close_lets_the_writer_take_what_is_left_then_the_end() -> None:
    box, _ = make()
    box.offer(b"d0")
    box.control(b"pong")
    box.close()
    assert box.closed
    with trio.fail_after(WAKE_S):
        assert await box.take() == [b"pong", b"d0"]
        assert await box.take() == []
        assert await box.take() == []


async def test_close_wakes_a_waiting_take_with_the_end() -> None:
    box, _ = make()
    taken: list[list[bytes]] = []

    async def writer() -> None:
        taken.append(await box.take())

    async with trio.open_nursery() as nursery:
        done = await started(nursery, writer)
        box.close()
        with trio.fail_after(WAKE_S):
            await done.wait()
    assert taken == [[]]


async def test_closed_outbox_takes_no_more_frames() -> None:
    box, deadlines = make(capacity=1)
    assert box.reserve(1)
    box.close()
    assert not box.offer(b"late delivery")
    box.reply(b"late reply")
    box.control(b"late pong")
    assert len(box) == 0
    assert box.take_nowait() == []
    assert deadlines.calls == []  # a refusal after close is not a slow consumer


def test_new_outbox_is_open_and_empty() -> None:
    box, _ = make()
    assert not box.closed
    assert len(box) == 0


# --- model --------------------------------------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.just(("offer", 0)),
        st.tuples(st.just("reserve"), st.integers(1, CAPACITY)),
        st.tuples(st.just("reply"), st.integers(0, 1)),  # 0: reply(None), 1: a frame
        st.just(("control", 0)),
        st.just(("take", 0)),
        st.just(("close", 0)),
    ),
    max_size=40,
)


@settings(max_examples=150)
@given(ops=operations)
def test_outbox_matches_a_model_of_its_bounds(ops: list[tuple[str, int]]) -> None:
    async def run() -> None:
        box, deadlines = make()
        frames: list[bytes] = []
        control: list[bytes] = []
        deliveries = replies = reserved = 0
        closed = clock_running = False
        expected_calls: list[float] = []
        for i, (op, arg) in enumerate(ops):
            frame = b"%s-%d" % (op.encode(), i)
            if op == "offer":
                room = not closed and deliveries < CAPACITY
                assert box.offer(frame) is room
                if room:
                    frames.append(frame)
                    deliveries += 1
                elif not closed and not clock_running:
                    clock_running = True
                    expected_calls.append(trio.current_time() + TIMEOUT_S)
            elif op == "reserve":
                room = closed or reserved + replies + arg <= CAPACITY
                assert box.reserve(arg) is room
                reserved += arg if room else 0
            elif op == "reply" and reserved:
                reserved -= 1
                box.reply(frame if arg else None)
                if arg and not closed:
                    frames.append(frame)
                    replies += 1
            elif op == "control" and not closed:
                box.control(frame)
                control = [*control, frame][-MAX_CONTROL_FRAMES:]
            elif op == "control":
                box.control(frame)
            elif op == "take":
                assert box.take_nowait() == control + frames
                frames, control, deliveries, replies = [], [], 0, 0
                if clock_running:
                    clock_running = False
                    expected_calls.append(math.inf)
            elif op == "close":
                box.close()
                closed = True
            assert len(box) == len(frames)
            assert deadlines.calls == expected_calls

    trio.run(run, clock=trio.testing.MockClock())


def test_take_nowait_takes_up_to_take_bytes_at_least_one_frame() -> None:
    outbox, _ = make(capacity=4)
    big = b"b" * (TAKE_BYTES // 2 + 1)
    for frame in (big, big, b"s1", b"s2"):
        assert outbox.offer(frame)
    assert outbox.take_nowait() == [big]  # two would pass TAKE_BYTES
    assert outbox.take_nowait() == [big, b"s1", b"s2"]
    huge = b"h" * (TAKE_BYTES * 2)
    assert outbox.offer(huge)
    assert outbox.take_nowait() == [huge]  # alone over the budget: still taken


async def test_a_partial_take_frees_the_slots_of_the_replies_it_took() -> None:
    outbox, _ = make(capacity=2)
    big = b"r" * TAKE_BYTES
    assert outbox.reserve(2)
    outbox.reply(big)
    outbox.reply(big)
    assert outbox.offer(b"d1")
    assert not outbox.reserve(1)  # both reply slots hold unwritten replies
    assert outbox.take_nowait() == [big]
    assert outbox.reserve(1)  # the reply taken freed its slot, the other still holds one
    assert not outbox.reserve(1)
    assert outbox.offer(b"d2")  # one delivery of two queued: room for another
    assert not outbox.offer(b"d3")
    assert outbox.take_nowait() == [big]
    assert outbox.take_nowait() == [b"d1", b"d2"]


def test_replies_for_a_closed_outbox_are_counted_as_dropped() -> None:
    outbox, _ = make()
    assert outbox.reserve(2)
    outbox.close()
    outbox.reply(b"late ack")
    outbox.reply(None)  # no reply: nothing dropped
    assert (outbox.replies_dropped, len(outbox)) == (1, 0)

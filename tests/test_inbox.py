"""Tests for relayd.routing.inbox.Inbox: the local router's bounded queue of batches.

Each test drives the inbox from tasks of its own and uses
``trio.testing.wait_all_tasks_blocked`` to let them reach their waits; no sleeps.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from relayd.errors import RouterClosed
from relayd.routing.inbox import Inbox


def test_batches_come_out_in_order_up_to_the_size() -> None:
    inbox: Inbox[str] = Inbox(2)
    assert inbox.put_nowait("a")
    assert inbox.put_nowait("b")
    assert not inbox.put_nowait("c")  # full: refused, not queued
    assert len(inbox) == 2
    assert [inbox.take(), inbox.take(), inbox.take()] == ["a", "b", None]


def test_an_inbox_holds_at_least_one_batch() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Inbox[str](0)


async def test_put_waits_for_room_and_waiters_get_it_in_the_order_they_came() -> None:
    inbox: Inbox[str] = Inbox(1)
    assert inbox.put_nowait("first")
    done: list[str] = []

    async def put(item: str) -> None:
        await inbox.put(item)
        done.append(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(put, "second")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(put, "third")
        await trio.testing.wait_all_tasks_blocked()
        assert not inbox.put_nowait("late")  # the room that comes is the waiters'
        assert inbox.take() == "first"  # lets "second" in
        await trio.testing.wait_all_tasks_blocked()
        assert done == ["second"]
        assert not inbox.put_nowait("late")
        assert inbox.take() == "second"
        await trio.testing.wait_all_tasks_blocked()
        assert [inbox.take(), inbox.take()] == ["third", None]
    assert done == ["second", "third"]


async def test_put_with_room_is_no_checkpoint() -> None:
    inbox: Inbox[str] = Inbox(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        await inbox.put("a")  # would raise Cancelled at a checkpoint
    assert not scope.cancelled_caught
    assert inbox.take() == "a"


async def test_a_cancelled_put_queues_nothing() -> None:
    inbox: Inbox[str] = Inbox(1)
    assert inbox.put_nowait("a")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(inbox.put, "never")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert [inbox.take(), inbox.take()] == ["a", None]  # and "never" took no room
    assert inbox.put_nowait("b")


async def test_wait_returns_once_a_batch_is_queued() -> None:
    inbox: Inbox[str] = Inbox(4)
    woke: list[str | None] = []

    async def route() -> None:
        await inbox.wait()
        woke.append(inbox.take())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(route)
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        assert inbox.put_nowait("a")
    assert woke == ["a"]


async def test_wait_returns_at_once_when_a_batch_waits() -> None:
    inbox: Inbox[str] = Inbox(4)
    assert inbox.put_nowait("a")
    with trio.fail_after(1):
        await inbox.wait()
    assert inbox.take() == "a"


async def test_a_cancelled_wait_leaves_the_inbox_usable() -> None:
    inbox: Inbox[str] = Inbox(4)
    with trio.move_on_after(0) as scope:
        await inbox.wait()
    assert scope.cancelled_caught
    assert inbox.put_nowait("a")  # no stale waiter to reschedule
    await inbox.wait()
    assert inbox.take() == "a"


async def test_close_refuses_new_batches_wakes_everyone_and_keeps_what_was_queued() -> None:
    inbox: Inbox[str] = Inbox(1)
    assert inbox.put_nowait("queued")
    refused: list[str] = []

    async def put(item: str) -> None:
        try:
            await inbox.put(item)
        except RouterClosed:
            refused.append(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(put, "waiting")
        await trio.testing.wait_all_tasks_blocked()
        inbox.close()
    assert refused == ["waiting"]
    assert inbox.closed
    with pytest.raises(RouterClosed):
        inbox.put_nowait("late")
    with pytest.raises(RouterClosed):
        await inbox.put("late")
    assert [inbox.take(), inbox.take()] == ["queued", None]


async def test_close_wakes_the_routing_task() -> None:
    inbox: Inbox[str] = Inbox(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(inbox.wait)
        await trio.testing.wait_all_tasks_blocked()
        inbox.close()
    await inbox.wait()  # closed: at once
    assert inbox.take() is None

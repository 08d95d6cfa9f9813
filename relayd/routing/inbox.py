"""A router's inbox: how a reader's batch is handed to the routing task.

Every router takes batches through one bounded queue, its inbox, which its
routing task drains. A full inbox makes readers wait: TCP backpressure on the
senders. The local router's is an :class:`Inbox`; a cluster node's is a trio
memory channel, handed to with :func:`try_hand_over` and :func:`hand_over`.
Both behave alike: a batch is handed over without a wait when there is room,
readers that wait for room are let in in the order they came, and closing
refuses new batches and wakes the readers waiting (``RouterClosed``) while the
routing task still takes what was queued.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, TypeVar

import outcome
import trio

from relayd.errors import RouterClosed
from relayd.routing.interface import Inbound

__all__ = ["Inbox", "hand_over", "try_hand_over"]

T = TypeVar("T")


class Inbox(Generic[T]):
    """A bounded queue of batches from readers to one routing task; not thread-safe.

    What a trio memory channel with one receiver does, with less work per
    batch: the routing task hands over every batch a busy relay reads, and the
    channel's statistics, its clones and its value objects are not needed.

    Args:
        size: how many batches may wait before :meth:`put_nowait` refuses
            and :meth:`put` waits; at least 1.
    """

    __slots__ = ("_closed", "_items", "_receiver", "_senders", "_size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("an inbox holds at least one batch")
        self._items: deque[T] = deque()
        self._size = size
        self._closed = False
        # The routing task, while it waits in wait(); None otherwise.
        self._receiver: trio.lowlevel.Task | None = None
        # Tasks waiting in put() for room, oldest first, with their batches.
        self._senders: OrderedDict[trio.lowlevel.Task, T] = OrderedDict()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (queued batches may still be taken)."""
        return self._closed

    def put_nowait(self, item: T) -> bool:
        """Queue ``item`` if there is room (and no one waits for it); never waits.

        Returns:
            True if queued; False if the inbox is full.

        Raises:
            RouterClosed: the inbox is closed.
        """
        if self._closed:
            raise RouterClosed("router is shutting down")
        if len(self._items) >= self._size:
            return False  # full: put()'s waiters, if any, get the room as it comes
        self._items.append(item)
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            trio.lowlevel.reschedule(receiver)
        return True

    async def put(self, item: T) -> None:
        """Queue ``item``, waiting for room behind those already waiting.

        Not a checkpoint when there is room (see :func:`hand_over`).

        Raises:
            RouterClosed: the inbox is closed, or closes while this waits (the
                item is not queued).
        """
        if self.put_nowait(item):
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        self._senders[task] = item

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            del self._senders[task]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def take(self) -> T | None:
        """The oldest batch queued, or None if none is (closed or not); never waits."""
        items = self._items
        if not items:
            return None
        item = items.popleft()
        if self._senders:  # the room goes to the reader that has waited longest
            task, waiting = self._senders.popitem(last=False)
            items.append(waiting)
            trio.lowlevel.reschedule(task)
        return item

    async def wait(self) -> None:
        """Wait until a batch is queued or the inbox is closed (at once if either is so).

        One task at a time may wait.
        """
        if self._items or self._closed:
            await trio.lowlevel.checkpoint()
            return
        assert self._receiver is None, "one routing task per inbox"
        task = self._receiver = trio.lowlevel.current_task()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            if self._receiver is task:
                self._receiver = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def close(self) -> None:
        """Take no more: waiting readers get ``RouterClosed``; what is queued may still be taken."""
        self._closed = True
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            trio.lowlevel.reschedule(receiver)
        senders, self._senders = self._senders, OrderedDict()
        for task in senders:
            trio.lowlevel.reschedule(task, outcome.Error(RouterClosed("router is shutting down")))

    def __len__(self) -> int:
        """Batches queued (not those waiting for room)."""
        return len(self._items)


def try_hand_over(inbox: trio.MemorySendChannel[list[Inbound]], items: list[Inbound]) -> bool:
    """Put ``items`` in ``inbox`` if it has room; never waits (see ``Router.try_route``).

    Raises:
        RouterClosed: the inbox is closed (the router is shutting down).
    """
    try:
        inbox.send_nowait(items)
    except trio.WouldBlock:
        return False
    except trio.ClosedResourceError:
        raise RouterClosed("router is shutting down") from None
    return True


async def hand_over(inbox: trio.MemorySendChannel[list[Inbound]], items: list[Inbound]) -> None:
    """Put ``items`` in ``inbox``, waiting for room (see ``Router.route``).

    The caller bounds the wait, if it must.

    Raises:
        RouterClosed: the inbox is closed (the router is shutting down).
    """
    # Without a wait when there is room: the reader's next read is a
    # checkpoint anyway, and a yield here would cost a scheduling round per read.
    if try_hand_over(inbox, items):
        return
    try:
        await inbox.send(items)
    except trio.ClosedResourceError:
        raise RouterClosed("router is shutting down") from None

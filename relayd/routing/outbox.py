"""A connection's outbox: the bounded queue between the router and its writer.

It holds two kinds of frames, each with its own bound of ``capacity``:

* **Deliveries** (messages from other clients). The router hands them over
  with :meth:`Outbox.offer`, which never waits: a full outbox refuses the
  frame (its sender is told ``recipient_busy``).
* **Replies** to the connection's own frames (acks, errors, echoes). They are
  never refused: the reader reserves a slot for each frame before routing it
  (:meth:`Outbox.reserve`, :meth:`Outbox.wait_for_room`), and the router fills
  each slot with its reply, or frees it when there is none
  (:meth:`Outbox.reply`). A client that sends faster than it reads its
  replies is not read from until it catches up: TCP backpressure, not loss.

The writer takes what is waiting with :meth:`Outbox.take`, oldest first, up
to :data:`TAKE_BYTES` at a time (at least one frame), and writes it with one
``send_all``: many small frames go out in one system call, and a client that
reads steadily but slowly keeps taking. The slow-consumer clock starts when a
delivery is refused and stops when the writer takes frames; if it runs for
``slow_consumer_timeout_s``, the owning connection closes with 1013. (The
reader bounds its own wait for reply slots by the same time.)

Control frames the connection owes its client (pongs) go through
:meth:`Outbox.control`, outside the bounds and ahead of the messages. At most
:data:`MAX_CONTROL_FRAMES` wait; a client that pings faster than it reads gets
pongs for its latest pings only, as RFC 6455 §5.5.3 allows.

Memory per connection is bounded by ``2 x capacity`` frames of at most
``max_message_bytes`` plus the envelope around them, plus
:data:`MAX_CONTROL_FRAMES` control frames of at most 127 bytes; and beyond
the outbox, what the writer took and is writing: at most :data:`TAKE_BYTES`
or one frame.

Resource handling: the connection owns the outbox; the router only offers and
replies. :meth:`close` (from the router when it unregisters the connection or
stops) lets the writer take what is queued and then see the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

import trio

__all__ = ["MAX_CONTROL_FRAMES", "TAKE_BYTES", "Outbox"]

#: Control frames (pongs) that may wait for the writer. Autobahn's case 2.10
#: expects a pong for each of 10 pings sent at once; more than that is a flood.
MAX_CONTROL_FRAMES: Final = 16
#: Bytes of frames the writer takes at a time (more if the first frame alone
#: is bigger). Enough for hundreds of small frames per system call; small
#: enough that taking again, which is progress, comes often for a slow reader.
TAKE_BYTES: Final = 65536


class Outbox:
    """A bounded, never-blocking hand-over of encoded frames to one connection's writer.

    Args:
        capacity: how many deliveries may wait, and how many replies.
        slow_consumer_timeout_s: how long deliveries may be refused before the
            connection is judged a slow consumer.
        on_stuck_deadline: called with the time at which the connection must
            close as a slow consumer when the clock starts, and with
            ``math.inf`` when it stops.
        on_frames: called when frames arrive and no writer is waiting in
            :meth:`take`: the connection starts one.
    """

    __slots__ = (
        "_capacity",
        "_closed",
        "_control",
        "_deliveries",
        "_frames",
        "_is_reply",
        "_on_frames",
        "_on_stuck_deadline",
        "_refused_since",
        "_replies",
        "_reserved",
        "_room",
        "_timeout",
        "_waiter",
        "replies_dropped",
    )

    def __init__(
        self,
        capacity: int,
        slow_consumer_timeout_s: float,
        on_stuck_deadline: Callable[[float], None],
        *,
        on_frames: Callable[[], None] = lambda: None,
    ) -> None:
        self._capacity = capacity
        self._on_frames = on_frames
        self._frames: list[bytes] = []
        self._is_reply: list[bool] = []  # for each of _frames
        self._deliveries = 0  # of _frames
        self._replies = 0  # of _frames
        self._reserved = 0  # reply slots taken by the reader, not yet filled by the router
        self._control: list[bytes] = []
        self._timeout = slow_consumer_timeout_s
        self._on_stuck_deadline = on_stuck_deadline
        self._refused_since: float | None = None
        self._closed = False
        #: Replies the router had for this connection after it closed.
        self.replies_dropped = 0
        self._waiter = trio.lowlevel.ParkingLot()  # the writer, waiting for frames
        # The reader, waiting for reply slots: rare, so made when first needed.
        self._room: trio.lowlevel.ParkingLot | None = None

    # -- the router's side -------------------------------------------------------

    def offer(self, frame: bytes) -> bool:
        """Queue a delivery if there is room; never waits.

        Returns:
            True if queued; False if the outbox is full or already closed.
        """
        if self._closed:
            return False
        if self._deliveries >= self._capacity:
            if self._refused_since is None:
                self._refused_since = trio.current_time()
                self._on_stuck_deadline(self._refused_since + self._timeout)
            return False
        self._deliveries += 1
        self._frames.append(frame)
        self._is_reply.append(False)
        self._wake()
        return True

    def reply(self, frame: bytes | None) -> None:
        """Fill one reserved reply slot with ``frame``, or free it (None); never waits."""
        self._reserved -= 1
        if frame is None:
            if self._room:
                self._room.unpark()
        elif self._closed:
            self.replies_dropped += 1
        else:
            self._replies += 1
            self._frames.append(frame)
            self._is_reply.append(True)
            self._wake()

    # -- the reader's side ---------------------------------------------------------

    def control(self, frame: bytes) -> None:
        """Queue a control frame ahead of the messages; the oldest goes if too many wait."""
        if self._closed:
            return
        control = self._control
        control.append(frame)
        if len(control) > MAX_CONTROL_FRAMES:
            del control[0]
        self._wake()

    def reserve(self, n: int) -> bool:
        """Take ``n`` reply slots if they are free (``n`` at most ``capacity``).

        Always succeeds once the outbox is closed: the replies are dropped
        with the connection, so there is nothing to wait for.
        """
        if self._reserved + self._replies + n > self._capacity and not self._closed:
            return False
        self._reserved += n
        return True

    async def wait_for_room(self, n: int) -> None:
        """Wait until :meth:`reserve` can take ``n`` slots, and take them.

        The caller bounds the wait: a client that never reads its replies
        never makes room. Cancellation leaves nothing reserved.
        """
        while not self.reserve(n):
            if self._room is None:
                self._room = trio.lowlevel.ParkingLot()
            await self._room.park()

    # -- the writer's side ---------------------------------------------------------

    async def take(self) -> list[bytes]:
        """Wait for frames and take them: the control frames, then :meth:`take_nowait`'s.

        Returns:
            The frames, oldest first; an empty list once the outbox is closed
            and everything in it was taken.
        """
        while not self._frames and not self._control:
            if self._closed:
                return []
            await self._waiter.park()
        return self.take_nowait()

    def take_nowait(self) -> list[bytes]:
        """Take the control frames, then the oldest frames up to :data:`TAKE_BYTES`.

        Takes at least one frame if any waits; stops the slow-consumer clock.
        """
        frames = self._frames
        count, size = 0, 0
        for frame in frames:
            size += len(frame)
            if count and size > TAKE_BYTES:
                break
            count += 1
        if count == len(frames):  # all of them, the usual case
            taken, replies = frames, self._replies
            self._frames, self._is_reply = [], []
        else:
            taken, replies = frames[:count], sum(self._is_reply[:count])
            del frames[:count], self._is_reply[:count]
        self._deliveries -= count - replies
        if self._control:
            taken = self._control + taken
            self._control = []
        if replies:
            self._replies -= replies
            if self._room:
                self._room.unpark()
        if self._refused_since is not None:
            self._refused_since = None
            self._on_stuck_deadline(math.inf)
        return taken

    def has_frames(self) -> bool:
        """True if frames (control frames included) wait for the writer."""
        return bool(self._frames or self._control)

    # -- both ------------------------------------------------------------------------

    def close(self) -> None:
        """Take no more frames; the writer takes the rest, then sees the end."""
        self._closed = True
        self._waiter.unpark_all()
        if self._room is not None:
            self._room.unpark_all()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def _wake(self) -> None:
        if self._waiter:
            self._waiter.unpark()
        else:
            self._on_frames()

    def __len__(self) -> int:
        """Message frames waiting (control frames not counted)."""
        return len(self._frames)

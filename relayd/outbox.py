"""A connection's outbox: the bounded queue between the router and its writer.

The router hands frames over with :meth:`Outbox.offer`, which never waits: a
full outbox refuses the frame (the sender is told ``recipient_busy``) and
starts the slow-consumer clock. If the writer takes no frame from it for
``slow_consumer_timeout_s`` after that, the owning connection closes with 1013;
a frame taken (:meth:`Outbox.relieve`) or accepted again stops the clock.
Memory per connection is bounded by ``capacity`` frames of at most
``max_message_bytes`` plus the envelope around them.

Resource handling: the connection owns the outbox; the router only offers.
:meth:`close` (from the router when it unregisters the connection or stops)
lets the writer drain what is queued and then see the end of the channel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

__all__ = ["Frame", "Outbox"]

#: What a writer sends: text frames, or binary ones on the echo route.
Frame = str | bytes


class Outbox:
    """A bounded, never-blocking hand-over of frames to one connection's writer.

    Args:
        capacity: how many frames may wait.
        slow_consumer_timeout_s: how long it may refuse frames before the
            connection is judged a slow consumer.
        on_stuck_deadline: called with the time at which the connection must
            close as a slow consumer (when the outbox starts refusing), and
            with ``math.inf`` when it takes frames again.
    """

    __slots__ = ("_full_since", "_on_stuck_deadline", "_send", "_timeout", "receive")

    def __init__(
        self,
        capacity: int,
        slow_consumer_timeout_s: float,
        on_stuck_deadline: Callable[[float], None],
    ) -> None:
        self._send, self.receive = trio.open_memory_channel[Frame](capacity)
        self._timeout = slow_consumer_timeout_s
        self._on_stuck_deadline = on_stuck_deadline
        self._full_since: float | None = None

    def offer(self, frame: Frame) -> bool:
        """Queue ``frame`` if there is room; never waits.

        Returns:
            True if queued; False if the outbox is full or already closed.
        """
        try:
            self._send.send_nowait(frame)
        except trio.WouldBlock:
            if self._full_since is None:
                self._full_since = trio.current_time()
                self._on_stuck_deadline(self._full_since + self._timeout)
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        if self._full_since is not None:
            self._full_since = None
            self._on_stuck_deadline(math.inf)
        return True

    def relieve(self) -> None:
        """Note that the writer took a frame: there is room again, stop the clock."""
        if self._full_since is not None:
            self._full_since = None
            self._on_stuck_deadline(math.inf)

    def close(self) -> None:
        """Take no more frames; the writer drains the rest, then sees the end."""
        self._send.close()

    def __len__(self) -> int:
        """Frames waiting."""
        return self._send.statistics().current_buffer_used

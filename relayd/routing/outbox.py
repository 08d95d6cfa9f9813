"""A connection's outbox: the bounded queue between the router and its writer, without I/O.

It holds two kinds of frames, each with its own bound of ``capacity``:

* **Deliveries** (messages from other clients). The router offers them
  (:meth:`Outbox.offer`), which never waits: a full outbox refuses the frame
  (its sender is told ``recipient_busy``), and says it was full rather than
  closed (:attr:`Offer.FULL`), which starts the connection's slow-consumer clock.
* **Replies** to the connection's own frames (acks, errors, echoes). They are
  never refused: the reader reserves a slot for each frame before routing it
  (:meth:`Outbox.reserve`), and the router fills each slot with its reply, or
  frees it when there is none (:meth:`Outbox.reply`). A client that sends
  faster than it reads its replies is not read from until it catches up: TCP
  backpressure, not loss.

The writer takes what is waiting with :meth:`Outbox.take`, oldest first, up to
:data:`TAKE_BYTES` at a time (at least one frame), and writes it with one
``send_all``: many small frames go out in one system call, and a client that
reads steadily but slowly keeps taking.

Control frames the connection owes its client (pongs) go through
:meth:`Outbox.control`, outside the bounds and ahead of the messages. At most
:data:`MAX_CONTROL_FRAMES` wait; a client that pings faster than it reads gets
pongs for its latest pings only, as RFC 6455 §5.5.3 allows.

How it ends: :meth:`Outbox.close` takes no more deliveries (the connection is
leaving the routing table); replies already decided still come and are taken.
:meth:`Outbox.discard` drops everything, now and from then on (nobody is left to
write to), counting what it dropped.

Memory per connection is bounded by ``2 x capacity`` frames of at most
``max_message_bytes`` plus the envelope around them, plus
:data:`MAX_CONTROL_FRAMES` control frames of at most 127 bytes; once the
connection is closing, its last read's replies may go past ``capacity``
(:meth:`Outbox.reserve_beyond`, or :meth:`Outbox.reserve` once closed), one
reply per frame of that read.

Nothing here waits or reads a clock: the connection that owns the outbox
(:mod:`relayd.daemon.connection`) wakes its writer and its reader, and keeps
the slow-consumer clock. Tested with plain values in ``tests/test_outbox.py``.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["MAX_CONTROL_FRAMES", "TAKE_BYTES", "Offer", "Outbox"]

#: Control frames (pongs) that may wait for the writer. Autobahn's case 2.10
#: expects a pong for each of 10 pings sent at once; more than that is a flood.
MAX_CONTROL_FRAMES: Final = 16
#: Bytes of frames the writer takes at a time (more if the first frame alone
#: is bigger). Enough for hundreds of small frames per system call; small
#: enough that taking again, which is progress, comes often for a slow reader.
TAKE_BYTES: Final = 65536


class Offer(enum.Enum):
    """What became of a delivery offered to an outbox."""

    QUEUED = "queued"
    FULL = "full"  # refused for want of room: a slow consumer, perhaps
    CLOSED = "closed"  # refused: the connection is leaving


# Returned from module globals: an attribute of an enum class is looked up
# through EnumType.__getattr__'s slot, several times a global's cost.
_QUEUED: Final = Offer.QUEUED
_FULL: Final = Offer.FULL
_CLOSED: Final = Offer.CLOSED


class Outbox:
    """Encoded frames waiting for one connection's writer; see the module docstring.

    Args:
        capacity: how many deliveries may wait, and how many replies.

    Attributes:
        capacity: as given, for the outbox's life (an attribute: its reader
            reads it for every batch it routes).
        dropped: message frames that were queued or decided for this
            connection but will never be written (:meth:`discard`), and
            replies that came without a reserved slot.
    """

    __slots__ = (
        "_closed",
        "_control",
        "_deliveries",
        "_discarded",
        "_frames",
        "_is_reply",
        "_replies",
        "_reserved",
        "capacity",
        "dropped",
    )

    def __init__(self, capacity: int) -> None:
        self.capacity: Final = capacity
        # The three lists are made when their first frame comes, and let go
        # when taken: an idle connection's outbox holds none (168 bytes).
        self._frames: list[bytes] | None = None
        self._is_reply: list[bool] | None = None  # for each of _frames
        self._deliveries = 0  # of _frames
        self._replies = 0  # of _frames
        self._reserved = 0  # reply slots taken by the reader, not yet filled by the router
        self._control: list[bytes] | None = None
        self._closed = False
        self._discarded = False
        self.dropped = 0

    # -- the router's side ---------------------------------------------------------

    def offer(self, frame: bytes) -> Offer:
        """Queue a delivery if there is room; say what became of it."""
        if self._closed:
            return _CLOSED
        if self._deliveries >= self.capacity:
            return _FULL
        self._deliveries += 1
        # Inline, not a shared helper: once per message, and a call would be
        # most of what this costs. (_frames and _is_reply are made and let go
        # together; the second test is for the type checker.)
        frames, is_reply = self._frames, self._is_reply
        if frames is None or is_reply is None:
            self._frames, self._is_reply = [frame], [False]
        else:
            frames.append(frame)
            is_reply.append(False)
        return _QUEUED

    def reply(self, frame: bytes | None) -> bool:
        """Fill one reserved reply slot with ``frame``, or free it (None).

        A reply with no slot reserved is a bug in its router: it is dropped
        (and counted in :attr:`dropped`), never let to upset the bounds.

        Returns:
            True if a frame was queued for the writer; False for None, and for
            a frame dropped because the outbox was discarded.
        """
        if self._reserved <= 0:
            if frame is not None:
                self.dropped += 1
            return False
        self._reserved -= 1
        if frame is None:
            return False
        if self._discarded:
            self.dropped += 1
            return False
        self._replies += 1
        # Inline, as in offer: once per message.
        frames, is_reply = self._frames, self._is_reply
        if frames is None or is_reply is None:
            self._frames, self._is_reply = [frame], [True]
        else:
            frames.append(frame)
            is_reply.append(True)
        return True

    # -- the reader's side ---------------------------------------------------------

    def control(self, frame: bytes) -> bool:
        """Queue a control frame ahead of the messages; the oldest goes if too many wait.

        Returns:
            True if queued (False once discarded).
        """
        if self._discarded:
            return False
        control = self._control
        if control is None:
            self._control = [frame]
        else:
            control.append(frame)
            if len(control) > MAX_CONTROL_FRAMES:
                del control[0]
        return True

    def reserve(self, n: int) -> bool:
        """Take ``n`` reply slots if they are free (``n`` at most ``capacity``).

        Always succeeds once the outbox is closed: what the replies become is
        then the closing connection's business, not a reason to wait.
        """
        if self._reserved + self._replies + n > self.capacity and not self._closed:
            return False
        self._reserved += n
        return True

    def reserve_beyond(self, n: int) -> None:
        """Take ``n`` reply slots whether or not they are free, as a closed outbox's reserve does.

        For the last read of a connection whose reading is over (closing over
        the rate limit, for policy, at the client's close frame, or draining):
        its replies are all that is left, so waiting for room would only delay
        the close. The bound is then that read's items, as for a closed outbox.
        """
        self._reserved += n

    # -- the writer's side ---------------------------------------------------------

    def take(self) -> list[bytes]:
        """Take the control frames, then the oldest frames up to :data:`TAKE_BYTES`.

        Takes at least one frame if any waits.

        Returns:
            The frames, oldest first; empty if none wait.
        """
        frames, control = self._frames, self._control
        if frames is None:
            # Writers take until a take finds nothing: that take comes as often as
            # the one before it, and costs the least here.
            if control is None:
                return []
            self._control = None
            return control
        if sum(map(len, frames)) <= TAKE_BYTES:  # all of them, the usual case: one C pass
            taken = frames
            self._frames = self._is_reply = None
            self._deliveries = self._replies = 0
        else:
            count, size = 0, 0
            for frame in frames:
                size += len(frame)
                if count and size > TAKE_BYTES:
                    break
                count += 1
            is_reply = self._is_reply
            assert is_reply is not None  # made and let go with _frames
            taken, replies = frames[:count], sum(is_reply[:count])
            del frames[:count], is_reply[:count]
            if not frames:  # it was one frame over TAKE_BYTES alone
                self._frames = self._is_reply = None
            self._deliveries -= count - replies
            self._replies -= replies
        if control is not None:
            taken = control + taken
            self._control = None
        return taken

    def has_frames(self) -> bool:
        """True if frames (control frames included) wait for the writer."""
        return bool(self._frames or self._control)

    @property
    def settled(self) -> bool:
        """True once closed with nothing waiting and no reply still to come: the writer is done."""
        return self._closed and not self._reserved and not self.has_frames()

    # -- the owner's ---------------------------------------------------------------

    def close(self) -> None:
        """Take no more deliveries; replies already reserved still come."""
        self._closed = True

    def discard(self) -> None:
        """Close, and drop every frame, now and from now on, counting the messages."""
        if self._discarded:
            # Nothing has been queued since (offer, reply and control refuse
            # once discarded): a closing connection calls this up to three times.
            return
        self._closed = self._discarded = True
        self.dropped += len(self)
        self._frames = self._is_reply = self._control = None
        self._deliveries = self._replies = 0

    @property
    def closed(self) -> bool:
        """True once :meth:`close` (or :meth:`discard`) was called."""
        return self._closed

    def __len__(self) -> int:
        """Message frames waiting (control frames not counted)."""
        frames = self._frames
        return 0 if frames is None else len(frames)

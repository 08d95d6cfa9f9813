"""One connection's writer: its outbox to its socket, and the two waits on the outbox.

The outbox (:class:`~relayd.routing.outbox.Outbox`) is pure; this is its trio
side. :class:`Writer` owns

* the **writer task**, started when frames arrive and no writer waits for
  them, gone after :data:`WRITER_IDLE_S` without any (an idle connection does
  without a task of its own); it takes everything waiting and writes it with
  one ``send_all``;
* the **write without a task**: when frames arrive for an open connection
  whose writer is not running, they are written at once, from the task that
  queued them (the routing task, or while traffic is sparse the sender's
  reader routing its batch at once), with :meth:`Transport.try_send
  <relayd.daemon.transport.Transport.try_send>`, which never waits. Chat
  traffic is mostly that: a lone message for a connection with nothing else
  to write, which then costs no task, no scheduling round and no timeout.
  Frames the router hands out within one batch
  (:func:`~relayd.routing.batch.routing_batch`) go out together as the batch
  ends: a hundred senders' messages to one receiver in one write (sooner if
  the outbox fills first, :meth:`Writer.make_room`, so that a burst to a
  receiver that reads is not refused ``recipient_busy``; so too while a writer
  task waits between its writes). What the socket does not take at once is
  written by a writer task, before anything else;
* the **reader's wait for reply slots** (:meth:`Writer.wait_for_room`), which
  frames taken, and replies that turn out to be none, end.

What it writes follows the connection's :class:`~relayd.wire.lifecycle.Lifecycle`:
everything while the connection is open or flushing (a drain, a policy close),
nothing once it is dropping its outbox; a flushing writer stays until the
outbox is settled (closed, empty, no reply still to come).

Resource handling: the connection calls :meth:`Writer.attach` with the nursery
the writer task runs in (the one its own task runs in: a nursery of its own
would cost an idle connection a cancel scope, some 1.1 KB), bounds the task
(:meth:`Writer.finish_by`, :meth:`Writer.stop`), calls :meth:`Writer.detach`
once it stops writing (from then on nothing starts a writer, whatever the
router still answers), and waits in :meth:`Writer.join` for the task to end
before it returns. The transport is the connection's owner's. Nothing here
raises into a caller but :meth:`Writer.write` and :meth:`Writer.raise_crash`: a
bug in the writer task is kept in :attr:`Writer.crash` for the connection to
raise in its own task, so that it never reaches the shared nursery.
Cancellation in the middle of a write breaks the transport
(:class:`~relayd.daemon.transport.Transport` records it), and what was taken is
counted as undelivered.
"""

from __future__ import annotations

import contextlib
import math
from typing import Final, Protocol

import trio

from relayd.daemon.transport import Transport
from relayd.policy.timers import Timers
from relayd.routing.batch import at_batch_end
from relayd.routing.outbox import Outbox
from relayd.telemetry import clock
from relayd.wire.frames import OP_CLOSE
from relayd.wire.lifecycle import Lifecycle

__all__ = ["WRITER_IDLE_S", "Writer", "WriterOwner"]

#: How long a writer with nothing to write waits for more before its task
#: ends. Under traffic it stays; an idle connection does without one (its
#: task and frames are a good part of an idle connection's memory).
WRITER_IDLE_S: Final = 1.0


class WriterOwner(Protocol):
    """What a writer tells its connection."""

    def client_gone(self) -> None:
        """A write found the client gone: nothing more is to be read or written."""


class Writer:
    """Writes one connection's outbox; see the module docstring.

    Args:
        transport: the client's stream.
        outbox: the connection's outbox.
        lifecycle: the connection's lifecycle, read to know whether to write.
        timers: told of progress (a take) and activity (a message written).
        owner: told when a write finds the client gone (the owner itself,
            not a callback bound to it: an idle connection holds no bound
            method for it).

    Attributes:
        messages_out: message frames written.
        bytes_out: bytes written by this writer (the connection adds its close frame),
            counted once the write that holds them is whole: a write cut short (the
            client gone, a slow consumer closed) counts none of its bytes, whichever
            path wrote them, as docs/logging.md says of ``bytes_out``.
        dropped: message frames taken but never written.
    """

    __slots__ = (
        "_deadline",
        "_deferred",
        "_ended",
        "_lifecycle",
        "_nursery",
        "_outbox",
        "_owner",
        "_pending",
        "_pending_messages",
        "_pending_sent",
        "_room",
        "_running",
        "_scope",
        "_sending",
        "_timers",
        "_transport",
        "_wake",
        "bytes_out",
        "crash",
        "dropped",
        "messages_out",
    )

    def __init__(
        self,
        transport: Transport,
        outbox: Outbox,
        lifecycle: Lifecycle,
        timers: Timers,
        owner: WriterOwner,
    ) -> None:
        self._transport = transport
        self._outbox = outbox
        self._lifecycle = lifecycle
        self._timers = timers
        self._owner = owner
        self._nursery: trio.Nursery | None = None
        self._running = False
        self._sending = False  # the writer task is in a write of its own
        self._deferred = False  # a write is due as the router's batch ends
        # The writer task, waiting for frames: made by each writer task, so that
        # an idle connection (no writer) holds none.
        self._wake: trio.lowlevel.ParkingLot | None = None
        # The reader, waiting for reply slots: rare, so made when first needed.
        self._room: trio.lowlevel.ParkingLot | None = None
        # What a write without a task left unwritten: the rest of its frames, how
        # many messages they hold, and how many bytes of theirs went (counted with
        # the rest). Written first by the next writer task.
        self._pending = b""
        self._pending_messages = self._pending_sent = 0
        # When a writer task, running or to come, must be done by (a close's
        # bound), and the running one's scope that enforces it.
        self._deadline = math.inf
        self._scope: trio.CancelScope | None = None
        # The connection, waiting for the writer task to end: made when first needed.
        self._ended: trio.lowlevel.ParkingLot | None = None
        #: The bug a writer task raised, for the connection to raise in its own task.
        self.crash: Exception | None = None
        self.messages_out = self.bytes_out = self.dropped = 0

    def attach(self, nursery: trio.Nursery) -> None:
        """Run writer tasks in ``nursery`` from now on, starting one if frames wait."""
        self._nursery = nursery
        if self._outbox.has_frames() or self._lifecycle.flushing:
            self.wake()

    @property
    def running(self) -> bool:
        """True while a writer task runs (or is about to)."""
        return self._running

    def detach(self) -> None:
        """Start no more writer tasks; a running one goes on (see :meth:`join`)."""
        self._nursery = None

    def finish_by(self, deadline: float) -> None:
        """Cancel the writer task, running or to come, if it still runs at ``deadline``.

        The earliest deadline given holds: a later one never extends it.
        """
        if deadline < self._deadline:
            self._deadline = deadline
            if self._scope is not None:
                self._scope.deadline = deadline

    def stop(self) -> None:
        """Cancel the writer task now, if one runs: what it took is counted as dropped."""
        self._deadline = -math.inf
        if self._scope is not None:
            self._scope.cancel()  # at once, not at the next round's deadline check

    def forget_owner(self) -> None:
        """Drop the link back to the connection, once it has ended and joined this."""
        self._owner = _NO_OWNER

    def raise_crash(self, failure: BaseException | None = None) -> None:
        """Raise the bug a writer task raised, if one did (in the connection's own task).

        Args:
            failure: what the connection is ending with already, if anything
                (a bug of its own, a cancellation): both are raised then, in
                one group, so that neither is lost.
        """
        crash = self.crash
        if crash is None:
            return
        if failure is None:
            raise crash
        raise BaseExceptionGroup("the connection and its writer task both failed", [failure, crash])

    async def join(self) -> None:
        """Wait until no writer task runs.

        The caller bounds the wait (:meth:`finish_by`, :meth:`stop`), or is
        cancelled with the writer: both run in the same nursery.
        """
        while self._running:
            if self._ended is None:
                self._ended = trio.lowlevel.ParkingLot()
            await self._ended.park()

    def wake(self) -> None:
        """Frames were queued, or the lifecycle moved on: write them, wake the writer, or start one.

        Never raises and never waits.
        """
        if self._wake:  # a writer task waits
            self._wake.unpark()
        elif not (self._running or self._deferred) and self._nursery is not None:
            if not (self._lifecycle.reading and self._transport.direct):
                self._start(self._nursery)
            elif at_batch_end(self._flush):
                # The router is handing out a batch: everything it gives this
                # connection goes out in one write, as the batch ends.
                self._deferred = True
            elif not self._write_now():  # (what _flush does, its checks made just now)
                self._start(self._nursery)

    def _flush(self) -> None:
        """Write what waits at once if the socket takes it, else start a writer task."""
        self._deferred = False
        if self._running or self._nursery is None:
            return
        if not (self._lifecycle.reading and self._transport.direct and self._write_now()):
            self._start(self._nursery)

    def _start(self, nursery: trio.Nursery) -> None:
        """Start a writer task in ``nursery`` if anything is left for one to write."""
        if self._pending or self._outbox.has_frames() or self._flushes_still():
            self._running = True
            nursery.start_soon(self._run)

    def _flushes_still(self) -> bool:
        """True while a flushing connection's outbox may still get frames to write."""
        return self._lifecycle.flushing and not self._outbox.settled

    def _write_now(self) -> bool:
        """Write what waits without a task; True unless a writer task must finish it.

        Takes until the outbox is empty: one take holds at most
        :data:`~relayd.routing.outbox.TAKE_BYTES`, and whatever a write without
        a task leaves in the outbox has no writer to write it. Bounded by what
        the outbox holds, and ends early when the socket's send buffer is full.
        """
        outbox, transport = self._outbox, self._transport
        while frames := outbox.take():
            self._timers.progress()  # taking is progress
            if self._room is not None or self._wake is not None:  # else nobody to wake
                self.slots_freed()
            if len(frames) == 1:  # a lone message, nearly always, with nothing else to write
                data = frames[0]
                messages = 0 if data[0] & OP_CLOSE else 1  # (_messages_in, written out)
            else:
                data, messages = b"".join(frames), _messages_in(frames)
            try:
                sent = transport.try_send(data) or 0
            except trio.BrokenResourceError:
                self.dropped += messages
                self._owner.client_gone()
                return True
            if sent != len(data):
                self._pending, self._pending_messages = data[sent:], messages
                self._pending_sent = sent
                return False
            self._written(messages, sent)
        return True

    def make_room(self) -> bool:
        """The outbox refused a delivery, though the socket may take what waits: write now.

        Within a routing batch a connection's frames wait for the batch's end, to go
        out in one write, and a writer task woken for them runs only once the router
        yields; a recipient that reads as fast as it can would otherwise see every
        delivery past the outbox's capacity in one batch refused
        (``recipient_busy``), though its socket would take them. Only then is the
        write made early, from the caller's task: what the socket takes at once, the
        rest (and the writes after it) left to a writer task, the running one or a new
        one, which writes that rest before anything else. Not while a writer task is
        in a write of its own, or has the rest of an early write still to write (the
        socket is full: the refusal is right), nor for a stream that cannot be written
        without waiting (relayd's own TLS). Never waits.

        Returns:
            True if the outbox was written from (it may have room now).
        """
        nursery = self._nursery
        if nursery is None or not (self._lifecycle.reading and self._transport.direct):
            return False  # closing, or TLS: the batch's end or the writer task sees to it
        if self._running:
            # Parked, or woken and not yet run: between two of its writes.
            if self._sending or self._pending or not self._outbox.has_frames():
                return False
            if not self._write_now() and self._wake is not None:
                self._wake.unpark()  # it writes the rest first
            return True
        if not self._deferred:
            return False
        if not self._write_now():
            self._start(nursery)
        return True

    def slots_freed(self) -> None:
        """Reply slots came free, or none will be filled: wake whoever waits for that."""
        if self._room:
            self._room.unpark_all()
        # A writer task first: every reply a connection's router answers with none
        # comes here, nearly always with no writer task to wake.
        if self._wake and self._outbox.settled:
            self._wake.unpark_all()  # a flushing writer is done

    async def wait_for_room(self, n: int) -> None:
        """Wait until the outbox can reserve ``n`` reply slots, and reserve them.

        The caller bounds the wait: a client that never reads its replies
        never makes room. Cancellation leaves nothing reserved.
        """
        if self._room is None:
            self._room = trio.lowlevel.ParkingLot()
        while not self._outbox.reserve(n):
            await self._room.park()

    async def write(self, frames: list[bytes]) -> None:
        """Write ``frames`` with one ``send_all``, counting them.

        Raises:
            trio.BrokenResourceError, trio.ClosedResourceError: the client is gone.
        """
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        await self._send(data, _messages_in(frames))

    async def _send(self, data: bytes, messages: int) -> None:
        self._sending = True  # nothing may be written around this write (make_room)
        try:
            await self._transport.send_all(data)
        except BaseException:
            # Not known to have reached the client: counted as undelivered.
            self.dropped += messages
            raise
        finally:
            self._sending = False
        self._written(messages, len(data))

    def count_written(self, frame: bytes) -> None:
        """Count ``frame`` as one message written, by the gate (the welcome, with the ``101``)."""
        self._written(1, len(frame))

    def _written(self, messages: int, size: int) -> None:
        if messages:
            self._timers.active(clock.now())
            self.messages_out += messages
        self.bytes_out += size

    async def _run(self) -> None:
        """The writer task, in its connection's owner's nursery: it raises only Cancelled there.

        A bug is kept in :attr:`crash` and reported like a client gone; the
        connection raises it once the task has ended. Cancelled at
        :meth:`finish_by`'s deadline, or with the nursery.
        """
        try:
            with trio.CancelScope(deadline=self._deadline) as self._scope:
                await self._write_out()
        except Exception as exc:
            self.crash = exc
            # The connection stops reading and raises it; if stopping meets
            # a bug too (the same one, met again), that must not escape
            # either: the connection then raises the first once its reader
            # ends anyway, at the latest at one of its timers.
            with contextlib.suppress(Exception):
                self._owner.client_gone()
        finally:
            if self._pending:
                # Cancelled (or crashed) before it wrote the rest of a frame an early
                # write began (make_room): the frame is cut short on the wire.
                self.dropped += self._pending_messages
                self._pending = b""
                self._transport.broken = True
            self._running = False
            self._wake = self._scope = None
            if self._ended:
                self._ended.unpark_all()

    async def _write_out(self) -> None:
        outbox, lifecycle = self._outbox, self._lifecycle
        self._wake = wake = trio.lowlevel.ParkingLot()
        while True:
            if self._pending:
                # Part of a frame is on the wire already (a write without a task,
                # before this task ran or while it waited): the rest goes first,
                # whatever happens next (a write cut short breaks the transport).
                pending, self._pending = self._pending, b""
                try:
                    await self._send(pending, self._pending_messages)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._owner.client_gone()
                    return
                self.bytes_out += self._pending_sent
            frames = outbox.take()
            if frames:
                self._timers.progress()  # taking is progress
                self.slots_freed()
                if not (lifecycle.reading or lifecycle.flushing):
                    self.dropped += _messages_in(frames)
                    return
                try:
                    await self.write(frames)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._owner.client_gone()
                    return
            elif outbox.settled or not (lifecycle.reading or lifecycle.flushing):
                return
            elif lifecycle.flushing:
                await wake.park()  # until frames come or the outbox settles
            else:
                # The idle wait has a scope of its own, so that frames it
                # wakes for are never taken under a deadline that could cut
                # their write short.
                with trio.move_on_after(WRITER_IDLE_S):
                    await wake.park()
                if not (self._pending or outbox.has_frames()) and lifecycle.reading:
                    return  # idle: the next frame starts a writer again


class _NoOwner:
    """The owner of a writer whose connection has ended: told nothing."""

    __slots__ = ()

    def client_gone(self) -> None:
        pass


_NO_OWNER: Final = _NoOwner()


def _messages_in(frames: list[bytes]) -> int:
    """How many of ``frames`` are messages, not control frames."""
    messages = len(frames)
    for frame in frames:  # control frames only ever lead the list
        if not frame[0] & OP_CLOSE:  # the opcode bit every control frame has
            break
        messages -= 1
    return messages

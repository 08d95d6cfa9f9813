"""One task that waits for every plain TCP connection's socket and reads it for its reader.

Without it, each connection's reader waits for its own socket with trio's
``wait_readable``: every read is then a task step of its own, with trio's
scheduling around it, and a change of trio's epoll registration (an
``epoll_ctl``) before the next wait. Under load, when a scheduling round finds
many sockets readable, that is most of a message's cost (fan-in: a hundred
senders, about one message per read).

The poller keeps the sockets of the readers waiting for them in an epoll of its
own (level-triggered), and waits on that epoll's descriptor. When it is
readable, the poller takes every socket ready and has its reader handle the
read at once, in the poller's task (:meth:`Reader.readable
<relayd.daemon.reader.Reader.readable>`): parsed, judged and routed, the usual
case, the read woke no task and the reader waits on. A read that needs a wait
(no reply slots, the router's inbox full), or that ends the reading (a close,
a violation, the client gone), or that a timer came due with, is handed to the
reader's own task, which is woken to finish it as it finishes a read of its own.

Ownership: the server runs :meth:`run` in its root nursery for as long as it
serves connections; a reader parks in :meth:`wait` only while it waits for its
socket, and is registered in the epoll exactly as long as it is parked. A
reader waits for its socket itself while the poller does not run
(:attr:`running`): before it starts, and after it ended, cancelled with the
root nursery before the connections, or by a bug. When it ends it wakes every
reader parked in it (with nothing: they wait again, themselves).

Cancellation: a parked reader's wait is cancelled as trio's own would be (its
cancel scope: a timer, a stop, the server's end), and its socket leaves the
epoll. If that happens while the poller is handling a read for it, the read is
finished first, and the wait then ends with what it brought.

Errors: :meth:`Reader.readable` raising (a bug) is raised in that reader's
task, which ends its connection (1011), never in the poller's: one connection's
bug does not stop every other connection's reads.
"""

from __future__ import annotations

import select
from typing import TYPE_CHECKING, Final, Protocol

import outcome
import trio

if TYPE_CHECKING:
    from relayd.daemon.reader import Handover

__all__ = ["POLLER_TASK", "ReadPoller", "Readable"]

#: The poller task's name (in trio's instruments, profiles and crash reports).
POLLER_TASK: Final = "relayd.poller"

#: Ready sockets taken from the epoll per scheduling round: the rest (the epoll is
#: level-triggered) in the next, so that the routing task and the writers get their
#: turn between. A read is at most 64 KiB: this bounds a round's reads at 16 MiB.
MAX_READY: Final = 256


class Readable(Protocol):
    """What waits in the poller: a connection's reader (:class:`~relayd.daemon.reader.Reader`)."""

    def readable(self) -> Handover:
        """Its socket is readable: handle what it brings; None to wait on, else wake with it."""


class ReadPoller:
    """Waits for the sockets of parked readers; see the module docstring."""

    __slots__ = ("_abort_after", "_epoll", "_handling", "_parked", "running")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        #: Whether :meth:`run` runs: readers may park in :meth:`wait` only then.
        self.running = False
        # fd -> the reader parked on it and its task.
        self._parked: dict[int, tuple[Readable, trio.lowlevel.Task]] = {}
        # The fd whose read the poller is handling now (-1: none), and whether its
        # reader's wait was cancelled meanwhile (it ends once the read is handled).
        self._handling = -1
        self._abort_after = False

    @property
    def parked(self) -> int:
        """How many readers wait for their socket here now."""
        return len(self._parked)

    async def wait(self, fd: int, reader: Readable) -> Handover:
        """Park ``reader`` until its socket ``fd`` brings a read it cannot handle at once.

        Call it only while the poller is :attr:`running`.

        Returns:
            What :meth:`Reader.readable` handed over for the reader's task to finish;
            None if the poller ended meanwhile.

        Raises:
            trio.Cancelled: the wait was cancelled (the socket is out of the epoll).
            Exception: what :meth:`Reader.readable` raised (a bug).
        """
        self._epoll.register(fd, select.EPOLLIN)
        self._parked[fd] = (reader, trio.lowlevel.current_task())

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            if self._handling == fd:
                # Mid-read, in the poller's task: it wakes the reader once the read is
                # handled, with what it brought (trio's protocol for a failed abort).
                self._abort_after = True
                return trio.lowlevel.Abort.FAILED
            self._unpark(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        handover: Handover = await trio.lowlevel.wait_task_rescheduled(abort)
        return handover

    def _unpark(self, fd: int) -> trio.lowlevel.Task:
        _, task = self._parked.pop(fd)
        self._epoll.unregister(fd)
        return task

    async def run(self) -> None:
        """Handle the reads of ready sockets, round after round; until cancelled.

        Resource handling: when it ends (cancelled, or a bug), the readers still
        parked are woken to wait for their sockets themselves, and the epoll is
        closed. Run it once.
        """
        epoll, parked = self._epoll, self._parked
        poll, fileno = epoll.poll, epoll.fileno()
        self.running = True
        try:
            while True:
                await trio.lowlevel.wait_readable(fileno)
                for fd, _ in poll(0, MAX_READY):
                    entry = parked.get(fd)
                    if entry is None:
                        continue  # its wait ended earlier in this round
                    self._handling = fd
                    try:
                        handover = entry[0].readable()
                    except Exception as exc:  # a bug: raised in that reader's task
                        wake: outcome.Outcome[Handover] | None = outcome.Error(exc)
                    else:
                        wake = None if handover is None else outcome.Value(handover)
                    self._handling = -1
                    if wake is None and self._abort_after:
                        wake = outcome.Value(None)
                    self._abort_after = False
                    if wake is not None:
                        trio.lowlevel.reschedule(self._unpark(fd), wake)
        finally:
            self.running = False
            for fd in list(parked):
                trio.lowlevel.reschedule(self._unpark(fd), outcome.Value(None))
            epoll.close()

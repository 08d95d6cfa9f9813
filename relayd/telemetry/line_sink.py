"""Where rendered log lines go: written to stdout, or held in a batch and written together.

:func:`relayd.telemetry.log.configure` installs one :class:`LineSink` per
process (structlog's logger for relayd); code that logs many events at once
(the router, for one batch of messages) wraps them in :func:`batched`. A
batch's lines are written at its end when no batch's lines were written in
the last :data:`FLUSH_DELAY_S` (sparse traffic: a lone message's line costs
one ``write`` and no task wakes up for it); otherwise they are held, and go
out with the lines of the first batch to end :data:`FLUSH_DELAY_S` or more
after the last write, or with the next line logged outside a batch, or when
:data:`MAX_HELD_BYTES` are held, or :data:`FLUSH_DELAY_S` after the first of
them was held when :func:`flush_held_lines` runs (the server runs it),
whichever comes first: under load, one ``write`` per :data:`FLUSH_DELAY_S`,
and under steady traffic a batch writes them before the flusher has to wake
(a wake-up is a task step, a scheduling round and a ``Cancelled`` raised and
caught). Without the flusher running, every batch is written at its end.
Lines keep their order and are never held longer than :data:`FLUSH_DELAY_S`.

**When nobody reads the lines** (stdout is a pipe whose reader exited, as in
``relayd serve | head -1``, or a journal stream that was closed), writing
fails with ``EPIPE``. relayd then keeps serving: its clients' connections
matter more than its log. The sink says so once on stderr, writes no line
again to that stream, and counts each line it drops in
:func:`dropped_lines` (``relayd_log_lines_dropped_total``), so the loss is
visible on ``/metrics`` and an operator can alert on it. The stream's file
descriptor is pointed at ``/dev/null``, so that Python's own flush of stdout
at exit does not print a ``BrokenPipeError`` either.

**When the reader is slow or stalls** (``relayd serve | less`` left at a
page, a container's log driver or journald falling behind), a blocking
``write`` on a full pipe would stop the event loop, and with it every
connection and ``/healthz``. So while :func:`flush_held_lines` runs (the
server's whole life), a stdout that is a pipe or a socket is made
non-blocking, and put back as it was when the process exits, after its last
line (the flag belongs to the open pipe or socket, which stderr and a parent
shell may share; a tty or a regular file is left alone). What such a write
does not take stays in the sink, pending, in order; later lines queue behind
it, and the flusher writes them as the descriptor becomes writable. Pending bytes are bounded by
:data:`MAX_PENDING_BYTES`: a flush that would pass it drops its lines whole,
counted in :func:`dropped_lines`, and stderr says so once per streak. When the
flusher ends, it makes one last non-blocking attempt and counts what is still
pending as dropped, so a stalled reader never holds up relayd's exit; the
run's last lines are written if the reader takes them, else counted as a
failed write. Notices on stderr are left out while stdout is mid-line, when
stderr is the same pipe or socket, so that none lands inside a line.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import math
import os
import stat
import sys
from typing import Final, TextIO

import trio

from relayd.telemetry import clock

__all__ = [
    "FLUSH_DELAY_S",
    "MAX_HELD_BYTES",
    "MAX_PENDING_BYTES",
    "LineSink",
    "batched",
    "current",
    "dropped_lines",
    "flush_held_lines",
    "install",
]

#: The longest a batch's lines are held before they are written, and the
#: shortest time between two writes of batches' lines. Under load a write per
#: batch is a system call per few messages; this makes it one per 10 ms, and a
#: person tailing the log does not notice.
FLUSH_DELAY_S: Final = 0.01
#: Held lines are written at once when they reach this size.
MAX_HELD_BYTES: Final = 65536
#: The most bytes kept for a reader that has fallen behind (a full pipe or socket
#: under the flusher); a flush that would pass it drops its lines, counted.
MAX_PENDING_BYTES: Final = 4 * 1024 * 1024

#: What stderr says, once, when the reader of the log has gone.
_GONE_NOTICE: Final = (
    "relayd: the log's reader has gone (stdout is closed); relayd keeps serving, "
    "and counts the log lines it drops in relayd_log_lines_dropped_total\n"
)
#: What stderr says when a write of the log fails otherwise (once until one succeeds).
_FAILED_NOTICE: Final = (
    "relayd: writing the log failed ({reason}); relayd keeps serving, and counts the "
    "log lines it cannot write in relayd_log_lines_dropped_total\n"
)
#: What stderr says, once per streak, when lines are dropped for a reader that is behind.
_BEHIND_NOTICE: Final = (
    "relayd: the log's reader is behind (stdout full); relayd keeps serving, and drops "
    "log lines past 4 MiB held, counted in relayd_log_lines_dropped_total\n"
)


class LineSink:
    """structlog's logger for relayd: writes each rendered line, or holds it in a batch.

    Args:
        stream: where lines go: written to the file descriptor under its
            binary buffer when it has both (stdout does), else to the buffer,
            else as text.
        gone: whether the stream's reader is already known to be gone (a sink
            installed again on the same stream), so that nothing is written.

    Error handling: no write raises. One that finds the reader gone (``EPIPE``,
    ``ECONNRESET``) drops the lines and every later one, counted, see the module
    docstring. Any other ``OSError`` (a full disk, ``EIO``, ``EAGAIN`` on a
    non-blocking stdout), or a stream closed under the sink, drops the lines
    that write did not write whole, counted in :func:`dropped_lines`, says so
    once on stderr (again only after a write succeeds), and the next lines are
    written as they come, after ending a line a write cut short: whoever
    logged (a routing task, the flusher, a connection's) serves on. A stream
    with a file descriptor is written with ``os.write``, not through Python's
    buffer, which would keep a failed write's bytes and write them later, after
    they were counted as dropped.
    """

    def __init__(self, stream: TextIO, *, gone: bool = False) -> None:
        self.stream = stream
        self._binary = getattr(stream, "buffer", None)
        self._fd = _descriptor(stream, self._binary)
        #: Whether the last write failed (the reader not gone): said once on stderr.
        self.failing = False
        # A write that failed part-way left a line unended: the next write ends it first.
        self._unended = False
        # How many bytes of a write an error cut short had been written.
        self._sent = 0
        self._lines: list[bytes] = []
        self._bytes = 0
        self.held = False
        #: The time stamp of the batch being held (line_writer's lines carry it), made
        #: at its first such line; None outside a batch and before that line.
        self.batch_stamp: bytes | None = None
        #: Whether the stream's reader has gone: lines are then dropped, counted.
        self.gone = gone
        #: Until when (trio's clock) a batch's lines are held rather than
        #: written at its end: :data:`FLUSH_DELAY_S` after the last such write.
        self.quiet_until = -math.inf
        # Bytes a full pipe or socket did not take (only while the flusher holds the
        # descriptor non-blocking): later lines queue behind them, see the module docstring.
        self._pending = bytearray()
        # Whether _pending starts with the newline that ends a line a failed write cut.
        self._pending_lead = 0
        # Whether lines were dropped since bytes were last pending: said once on stderr.
        self._behind = False

    def msg(self, line: str | bytes) -> None:
        """Write one rendered event (held while in a :func:`batched` block)."""
        self.line(line.encode() if isinstance(line, str) else line)

    def line(self, data: bytes) -> None:
        """Write one line already in bytes, as :meth:`msg` does."""
        if self.gone and not self._lines:
            _count_dropped(1)  # nobody reads: dropped now, not held to be dropped later
            return
        self._lines.append(data)
        self._bytes += len(data)
        if not self.held or self._bytes >= MAX_HELD_BYTES:
            self.flush()

    def line_batched(self, data: bytes) -> None:
        """Write one line as ``with batched(): sink.line(data)`` would; line_writer's come here.

        In a batch, it is held with the batch's lines; else it is a batch of its
        own: written now, or soon (see the module docstring). One call, as a lone
        message's line needs: the ``with`` block would cost it a third of its
        logging. Errors as :meth:`line`'s; none leaves the sink holding lines.
        """
        if self.gone and not self._lines:
            _count_dropped(1)
            return
        self._lines.append(data)
        self._bytes += len(data)
        if self._bytes >= MAX_HELD_BYTES:
            self.flush()
        elif not self.held:
            self.release()

    def release(self) -> None:
        """End a batch: its lines go out now, or soon (see the module docstring)."""
        self.held = False
        self.batch_stamp = None
        if not self._lines:
            return
        flusher = _flusher
        if flusher is None:
            self.flush()
            return
        global _due  # the one flusher's, which batches set and call off
        # The flusher runs, so this runs in trio (batches never await).
        now = clock.now()
        if now >= self.quiet_until:
            # Sparse: written now, which costs one write and no task's wake-up; so do
            # the lines held since the last write, and the flusher need not wake for them.
            self.quiet_until = now + FLUSH_DELAY_S
            self.flush()
            if _due != math.inf:
                _due = flusher.deadline = math.inf
        elif _due == math.inf:
            # The first line held since the last write: the flusher wakes when it is
            # due, unless a batch that ends after the quiet time writes it first (under
            # steady traffic one does, and the flusher never wakes).
            _due = flusher.deadline = now + FLUSH_DELAY_S

    # structlog calls the method named like the level; they all write a line.
    debug = info = warning = warn = error = critical = exception = log = msg

    def flush(self) -> bool:
        """Write the lines held so far; False if there were none (True though the write failed)."""
        if not self._lines:
            return False
        lines, self._lines = self._lines, []
        self._bytes = 0
        if self.gone:
            _count_dropped(len(lines))
            return True
        data = b"\n".join(lines) + b"\n"
        if self._pending:  # the reader is behind: queued after what it has not taken
            self._hold(data, len(lines))
            return True
        unended = self._unended
        if unended:
            data = b"\n" + data  # ends the line a failed write cut short
        try:
            self._write(data)
        except (BrokenPipeError, ConnectionResetError):
            self._reader_gone(len(lines))
        except BlockingIOError as error:
            if self._fd is None or self._fd != _holding or len(data) > MAX_PENDING_BYTES:
                self._write_failed(len(lines), data, unended, error)
            else:  # the flusher holds the descriptor non-blocking: keep the rest
                sent = self._sent
                self._pending += memoryview(data)[sent:]
                self._pending_lead = int(unended and not sent)
                if sent:
                    self._unended = data[sent - 1] != ord("\n")
                if _flusher is not None:
                    _flusher.cancel()  # wakes it, to wait until the reader takes more
        except (OSError, ValueError) as error:  # ValueError: the stream was closed
            self._write_failed(len(lines), data, unended, error)
        else:
            self.failing = self._unended = False
        return True

    def _hold(self, data: bytes, lines: int) -> None:
        """Queue ``data`` behind the pending bytes, or drop its lines past the bound."""
        if len(self._pending) + len(data) <= MAX_PENDING_BYTES:
            self._pending += data
            return
        _count_dropped(lines)
        if not self._behind:
            self._behind = True
            self._say(_BEHIND_NOTICE)

    def _say(self, notice: str) -> None:
        """Write ``notice`` on stderr; never raises, never cuts a line of the log in two.

        Under systemd (and ``2>&1``) stderr is the same pipe or socket as stdout: while
        stdout is mid-line (a write cut short, bytes pending) a notice would land inside
        that line, so it is left out then; the lines it would tell of are counted anyway.
        """
        if (self._pending or self._unended) and _shares_stderr(self._fd):
            return
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(notice)
            sys.stderr.flush()

    def pending_bytes(self) -> int:
        """How many bytes of lines wait for the reader to take them (see the module docstring)."""
        return len(self._pending)

    def write_pending(self) -> None:
        """Write what the descriptor takes of the pending bytes, without blocking."""
        pending, fd, binary = self._pending, self._fd, self._binary
        if not pending or fd is None or binary is None:
            return
        if binary.closed:  # its descriptor may be another file's by now
            self._sent = 0
            closed = ValueError("the log's stream was closed")
            self._write_failed(self._drop_pending(), b"", False, closed)
            return
        try:
            while pending:
                sent = os.write(fd, pending)
                if not sent:
                    return
                self._unended = pending[sent - 1] != ord("\n")
                self._pending_lead = 0
                del pending[:sent]
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError):
            self._reader_gone(self._drop_pending())
        except (OSError, ValueError) as error:
            self._sent = 0
            self._write_failed(self._drop_pending(), b"", False, error)
        else:
            self.failing = self._behind = False

    def _drop_pending(self) -> int:
        """Forget the pending bytes; how many lines they held (not written whole)."""
        lines = self._pending.count(b"\n") - self._pending_lead
        self._pending.clear()
        self._pending_lead = 0
        self._behind = False
        return lines

    def _write(self, data: bytes) -> None:
        """Write ``data``; if an error cuts it short, :attr:`_sent` says how far it got."""
        self._sent = 0
        fd, binary = self._fd, self._binary
        if fd is None or binary is None:
            if binary is not None:
                binary.write(data)
                binary.flush()
            else:
                self.stream.write(data.decode())
                self.stream.flush()
            return
        if binary.closed:  # its descriptor may be another file's by now
            raise ValueError("the log's stream was closed")
        sent = os.write(fd, data)
        if sent < len(data):  # a pipe may take part of a write
            self._sent = sent
            view = memoryview(data)[sent:]
            while view:
                sent = os.write(fd, view)
                self._sent += sent
                view = view[sent:]

    def _write_failed(
        self, lines: int, data: bytes, unended: bool, error: OSError | ValueError
    ) -> None:
        """Count the lines a failed write of ``data`` did not write; say so once on stderr."""
        sent = self._sent
        if sent:
            # Lines written whole before the cut are in the log; the one it cut is not.
            lines -= data.count(b"\n", 0, sent) - unended
            self._unended = data[sent - 1] != ord("\n")
        _count_dropped(lines)
        if not self.failing:
            self.failing = True
            reason = getattr(error, "strerror", None) or error
            self._say(_FAILED_NOTICE.format(reason=reason))

    def _reader_gone(self, lines: int) -> None:
        self.gone = True
        _count_dropped(lines)
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            # What the stream's buffer still holds would be flushed again at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        with contextlib.suppress(OSError, ValueError):  # stderr may have gone with it
            sys.stderr.write(_GONE_NOTICE)
            sys.stderr.flush()


#: The sink :func:`install` put in place last; None before.
_sink: LineSink | None = None
#: The lines dropped for want of a reader since the process started (every sink's).
_dropped = 0
#: The flusher's wait, while :func:`flush_held_lines` runs: a batch that holds
#: the first line since the last write sets its deadline to when that is due.
_flusher: trio.CancelScope | None = None
#: The deadline of the flusher's wait, kept apart because reading a cancel scope's
#: deadline is a Python call; inf when it waits for no line.
_due = math.inf
#: The descriptor the flusher holds non-blocking while it runs (a pipe or socket), or None.
_holding: int | None = None


def _descriptor(stream: TextIO, binary: object) -> int | None:
    """The descriptor under ``stream``'s binary buffer, after flushing what it holds; or None."""
    if binary is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        stream.flush()  # what was written before the sink: ahead of its lines
    try:
        return stream.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        return None


def _count_dropped(lines: int) -> None:
    global _dropped  # process-wide, like the sink: a counter never goes down
    _dropped += lines


def dropped_lines() -> int:
    """How many log lines were dropped since the process started, their reader gone."""
    return _dropped


def install(stream: TextIO) -> LineSink:
    """Put a new sink on ``stream`` in place of the last one, whose lines are written first.

    A stream whose reader the last sink found gone stays gone (its file
    descriptor now leads to ``/dev/null``): its lines are still counted, not written.
    """
    global _sink  # one sink per process, like structlog's one configuration
    old = _sink
    if old is not None:
        old.flush()
    same = old is not None and old.stream is stream
    _sink = LineSink(stream, gone=same and old is not None and old.gone)
    if same and old is not None:  # a reload: what the stream's writes left stays
        _sink.failing, _sink._unended = old.failing, old._unended
        _sink._pending, _sink._pending_lead = old._pending, old._pending_lead
        _sink._behind = old._behind
    elif old is not None and old._pending:
        _count_dropped(old._drop_pending())
    return _sink


def current() -> LineSink | None:
    """The sink in place, or None before :func:`install`."""
    return _sink


async def flush_held_lines() -> None:
    """Write the lines batches hold, :data:`FLUSH_DELAY_S` after the first was held; forever.

    It wakes only when held lines are due: the batch that holds the first of
    them sets the deadline of its wait, and a batch that writes them first
    calls it off (one task step per write it makes, however many lines). While
    it runs, a stdout that is a pipe or socket is non-blocking, and it writes
    the bytes a full one did not take as it becomes writable (see the module
    docstring).

    Resource handling: run it in a nursery that lives as long as the logging
    does; when cancelled, it writes what is held and what the descriptor takes
    without blocking, counts the rest as dropped, and batches flush at once
    again; the descriptor stays non-blocking until the process exits (a full
    pipe must not hold the run's last lines, which are written or counted as
    failed writes). No write that fails raises (see :class:`LineSink`).
    """
    global _flusher, _due  # the module's one flusher, like its one sink
    held = _hold_descriptor(_sink)
    try:
        while True:
            _due = math.inf
            sink = _sink
            with trio.CancelScope() as _flusher:
                binary = None if sink is None else sink._binary
                if (
                    sink is not None
                    and sink._pending
                    and sink._fd is not None
                    and binary is not None
                    and not binary.closed  # else write_pending drops and counts them
                ):
                    await trio.lowlevel.wait_writable(sink._fd)
                else:
                    await trio.sleep_forever()
            sink = _sink
            if sink is None:
                continue
            sink.write_pending()
            if sink.flush():
                sink.quiet_until = trio.current_time() + FLUSH_DELAY_S
    finally:
        _flusher = None
        _due = math.inf
        sink = _sink
        if sink is not None:
            sink.flush()
            sink.write_pending()  # one last try; a stalled reader does not hold up the exit
            if sink._pending:
                _count_dropped(sink._drop_pending())
        # The descriptor stays non-blocking: a full pipe with nothing pending would
        # otherwise hold the run's last lines (server.stop) and the exit; they are
        # written if the reader takes them, else counted. Put back at exit.
        _release_descriptor(held)


def _hold_descriptor(sink: LineSink | None) -> tuple[int, bool] | None:
    """Make ``sink``'s descriptor non-blocking if it is a pipe or socket; what to put back."""
    global _holding  # the flusher's, while it runs
    fd = None if sink is None or sink.gone else sink._fd
    if fd is None:
        return None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return None
        was_blocking = os.get_blocking(fd)
        os.set_blocking(fd, False)
    except OSError:
        return None
    if was_blocking and fd not in _to_restore:
        # The flag is the open pipe's or socket's, shared with whoever else writes to
        # it (stderr, a parent shell): put back when relayd exits, after its last line.
        _to_restore.add(fd)
        atexit.register(_restore_blocking, fd)
    _holding = fd
    return fd, was_blocking


def _release_descriptor(held: tuple[int, bool] | None) -> None:
    """The flusher has ended: a full pipe is no longer waited for (see flush_held_lines)."""
    global _holding  # the flusher's, while it runs
    if held is not None:
        _holding = None


#: Descriptors made non-blocking that were blocking: put back at exit.
_to_restore: set[int] = set()


def _restore_blocking(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.set_blocking(fd, True)
    _to_restore.discard(fd)


def _shares_stderr(fd: int | None) -> bool:
    """Whether stderr is the very pipe, socket or file that ``fd`` writes to."""
    if fd is None:
        return False
    try:
        ours, theirs = os.fstat(fd), os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)


class _Batched:
    """The context manager :func:`batched` returns (a class: it is entered per batch)."""

    __slots__ = ("_sink",)

    def __enter__(self) -> None:
        sink = _sink
        if sink is None or sink.held:  # not configured, or already in a batch
            self._sink = None
            return
        self._sink = sink
        sink.held = True

    def __exit__(self, *_: object) -> None:
        if self._sink is not None:
            self._sink.release()


def batched() -> _Batched:
    """Hold the lines logged in the ``with`` block, to write them with others soon after.

    The block must not await (another task's line would be held with them).
    """
    return _Batched()

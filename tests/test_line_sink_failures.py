"""A log write that fails leaves the sink writing later lines as before, and never raises.

``info_line`` writes a connection's line in a ``batched`` block of its own, a batch
of one line. The sink raises an OSError other than EPIPE/ECONNRESET (a full disk,
EAGAIN on a non-blocking stdout, EIO) to the code that logged, and the gate catches
it and serves on; the batch must still end then. Before the fix (review of d88fc9d)
it did not: the sink stayed ``held``, and every later line, the gate's own ``error``
line included, was kept in memory until 64 KiB had piled up.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Final

import pytest
import structlog
import trio
import trio.testing

from relayd.config import LogSettings
from relayd.routing.local import LocalRouter
from relayd.telemetry import line_sink
from relayd.telemetry.line_sink import FLUSH_DELAY_S, batched, flush_held_lines
from relayd.telemetry.log import configure, get_logger, info_line
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from relayd.wire.dialects import Dialect
from tests.test_local_router import Conn, relay
from tests.wire import text_of


class _FailingOnce(io.StringIO):
    """A log stream whose next write fails with ENOSPC once ``fail`` is set."""

    fail = False

    def write(self, s: str) -> int:
        if self.fail:
            self.fail = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(s)


@pytest.fixture
def stream() -> Iterator[_FailingOnce]:
    structlog.reset_defaults()
    try:
        yield _FailingOnce()
    finally:
        structlog.reset_defaults()


def test_a_log_write_that_failed_once_does_not_hold_every_later_line(
    stream: _FailingOnce,
) -> None:
    configure(LogSettings(format="json"), stream=stream)
    log = get_logger()
    # A line that fills the sink's hold (MAX_HELD_BYTES) is written as it comes;
    # that write fails: the line is dropped and counted, and nothing is raised.
    stream.fail = True
    dropped = line_sink.dropped_lines()
    info_line(log, "connection.open", conn=1, user_agent="x" * line_sink.MAX_HELD_BYTES)
    assert line_sink.dropped_lines() == dropped + 1
    # The disk has room again: the next lines are written at once, as before.
    info_line(log, "connection.open", conn=2, user_agent="ua")
    log.error("error", conn=2, summary="OSError: No space left on device")
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["connection.open", "error"]


def _churn(log: structlog.typing.FilteringBoundLogger) -> None:
    """Log connections' lines until the write of the held ones fails (some 300 fill the hold)."""
    dropped = line_sink.dropped_lines()
    for conn in range(1, 10_000):
        info_line(log, "connection.open", conn=conn, user_agent="u" * 200)
        if line_sink.dropped_lines() != dropped:
            return
    raise AssertionError("no write failed")


async def test_under_the_flusher_a_failed_write_leaves_later_lines_written_within_the_delay(
    stream: _FailingOnce, autojump_clock: trio.testing.MockClock
) -> None:
    """The same with lines of every day's size, held by a busy server: later lines never go out."""
    configure(LogSettings(format="json"), stream=stream)
    log = get_logger()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush_held_lines)
        await trio.testing.wait_all_tasks_blocked()
        info_line(log, "connection.open", conn=0, user_agent="ua")  # sparse: written at once
        # Connection churn within FLUSH_DELAY_S: lines are held, to be written
        # together; the one that fills the hold writes them, and that write fails.
        stream.fail = True
        _churn(log)
        await trio.sleep(10 * FLUSH_DELAY_S)  # whatever the flusher was due to do, done
        info_line(log, "connection.close", conn=1, code=1000)
        await trio.sleep(10 * FLUSH_DELAY_S)
        events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
        assert events == ["connection.open", "connection.close"]
        nursery.cancel_scope.cancel()


async def test_a_lone_messages_failed_log_write_does_not_cost_its_ack(
    stream: _FailingOnce,
) -> None:
    # A lone message is routed at once, its line written as it is recorded; the write
    # failed before the ack was queued, so the recipient had the message and the
    # sender never heard (a client that resends what is not acked sends it twice).
    configure(LogSettings(format="json"), stream=stream)
    stats = Stats()
    router = LocalRouter(MessageEvents(get_logger(), stats), stats)
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.V1)
    await router.register(alice.peer)
    await router.register(bob.peer)
    router._idle = router._sparse = True  # as after a pass of one batch, the task idle
    assert alice.outbox.reserve(1)
    stream.fail = True
    assert router.try_route([relay(alice, '{"to": "bob", "message": "hi", "ref": 7}')])
    assert [json.loads(text_of(f)) for f in bob.outbox.take()] == [
        {"type": "message", "from": "alice", "message": "hi"}
    ]
    assert [json.loads(text_of(f)) for f in alice.outbox.take()] == [{"type": "ack", "ref": 7}]


async def test_a_write_the_flusher_makes_that_fails_leaves_the_server_serving_and_is_counted(
    stream: _FailingOnce, autojump_clock: trio.testing.MockClock
) -> None:
    # The flusher writes held lines in a task of the server's root nursery, where no
    # code that logged is there to hear of a failed write: a full disk raised out of
    # it and ended the server (found while reading the sink for the deferred lines).
    configure(LogSettings(format="json"), stream=stream)
    log = get_logger()
    dropped = line_sink.dropped_lines()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush_held_lines)
        await trio.testing.wait_all_tasks_blocked()
        info_line(log, "connection.open", conn=0, user_agent="ua")  # sparse: written at once
        info_line(log, "connection.open", conn=1, user_agent="ua")  # held for the flusher
        stream.fail = True
        await trio.sleep(10 * FLUSH_DELAY_S)  # the flusher's write failed
        assert line_sink.dropped_lines() == dropped + 1
        info_line(log, "connection.close", conn=0, code=1000)
        await trio.sleep(10 * FLUSH_DELAY_S)
        events = [json.loads(line)["conn"] for line in stream.getvalue().splitlines()]
        assert events == [0, 0]
        nursery.cancel_scope.cancel()


async def test_a_failed_write_in_the_routing_tasks_batch_leaves_it_routing(
    stream: _FailingOnce, capsys: pytest.CaptureFixture[str]
) -> None:
    # The routing task writes a batch's lines itself when the log was quiet; a full
    # disk raised out of it into the server's root nursery and ended relayd, every
    # client dropped (a reviewer's find, after the flusher's own was fixed).
    configure(LogSettings(format="json"), stream=stream)
    stats = Stats()
    router = LocalRouter(MessageEvents(get_logger(), stats), stats)
    alice, bob = Conn("alice", Dialect.V1), Conn("bob", Dialect.V1)
    dropped = line_sink.dropped_lines()
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        await router.register(alice.peer)
        await router.register(bob.peer)
        stream.fail = True
        await router.route([relay(alice, '{"to": "bob", "message": "one"}')])
        await trio.testing.wait_all_tasks_blocked()
        assert line_sink.dropped_lines() == dropped + 1
        await router.route([relay(alice, '{"to": "bob", "message": "two"}')])
        await trio.testing.wait_all_tasks_blocked()
        router.close()
    assert [json.loads(text_of(f))["message"] for f in bob.outbox.take()] == ["one", "two"]
    assert [json.loads(line)["to"] for line in stream.getvalue().splitlines()] == ["bob"]
    assert capsys.readouterr().err.count("writing the log failed (No space left on device)") == 1


@pytest.fixture
def pipe() -> Iterator[tuple[int, io.TextIOWrapper]]:
    """A non-blocking pipe: its read end, and its write end as a text stream.

    A full one fails a write with EAGAIN, as a full disk would. Logging is put back
    afterwards: a sink left on a closed descriptor must not reach whatever file reuses
    its number.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    try:
        with os.fdopen(write_end, "w") as stdout:
            yield read_end, stdout
    finally:
        os.close(read_end)
        structlog.reset_defaults()
        line_sink.install(io.StringIO())


def _fill(fd: int, leave_pages: int = 0) -> None:
    """Fill the pipe ``fd`` writes to, but for ``leave_pages`` of its 16 pages."""
    for _ in range(16 - leave_pages):
        os.write(fd, b"." * 4096)


def _drain(fd: int) -> bytes:
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    return data


def test_a_failed_writes_lines_never_appear_later_nor_does_one_notice_repeat(
    pipe: tuple[int, io.TextIOWrapper], capsys: pytest.CaptureFixture[str]
) -> None:
    # stdout was written under Python's buffer, which kept a failed write's bytes and
    # wrote them with the next line: lines counted as dropped were in the log after all.
    read_end, stdout = pipe
    configure(LogSettings(format="json"), stream=stdout)
    log = get_logger()
    _fill(stdout.fileno())
    dropped = line_sink.dropped_lines()
    log.info("dropped.first")
    log.info("dropped.second")
    assert line_sink.dropped_lines() == dropped + 2
    _drain(read_end)
    log.info("written")
    written = _drain(read_end)
    assert [json.loads(line)["event"] for line in written.splitlines()] == ["written"]
    assert capsys.readouterr().err.count("writing the log failed") == 1


def test_a_write_cut_short_counts_only_the_lines_it_did_not_write_and_ends_the_cut_one(
    pipe: tuple[int, io.TextIOWrapper],
) -> None:
    # A full pipe (or disk) may take part of a write: the lines written whole are in the
    # log and are not counted as dropped; the line it cut is ended before the next one.
    read_end, stdout = pipe
    configure(LogSettings(format="json"), stream=stdout)
    log = get_logger()
    _fill(stdout.fileno(), leave_pages=1)  # room for 4,096 bytes
    dropped = line_sink.dropped_lines()
    with batched():
        for n in range(6):
            log.info("padded", n=n, pad="p" * 1000)  # about 1,070 bytes a line
    cut = line_sink.dropped_lines() - dropped
    first = _drain(read_end)[15 * 4096 :]  # after the filler: what the batch's write took
    log.info("after")
    lines = (first + _drain(read_end)).split(b"\n")
    whole = [json.loads(line)["n"] for line in lines[: 6 - cut]]
    assert 0 < cut < 6
    assert whole == list(range(6 - cut))
    assert not lines[6 - cut].endswith(b"}")  # the line the write cut, ended
    assert json.loads(lines[6 - cut + 1])["event"] == "after"


#: The longest a test waits for the flusher to write what a drained pipe takes.
WAIT_S: Final = 10.0


def _log_to(
    stdout: io.TextIOWrapper,
) -> tuple[structlog.typing.FilteringBoundLogger, line_sink.LineSink]:
    """Configure logging on ``stdout`` as relayd does; its logger and its sink."""
    configure(LogSettings(format="json"), stream=stdout)
    sink = line_sink.current()
    assert sink is not None
    return get_logger(), sink


@contextlib.asynccontextmanager
async def _flushing() -> AsyncIterator[None]:
    """Run the flusher, as the server does, for the block."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush_held_lines)
        await trio.testing.wait_all_tasks_blocked()
        yield
        nursery.cancel_scope.cancel()


async def _read_lines(fd: int, count: int) -> list[bytes]:
    """Read the pipe ``fd`` until ``count`` lines came after _fill's dots; those lines."""
    data = b""
    with trio.fail_after(WAIT_S):
        while data.count(b"\n") < count:
            await trio.lowlevel.wait_readable(fd)
            data += _drain(fd)
    return data.lstrip(b".").splitlines()


async def test_under_the_flusher_a_full_pipe_keeps_the_lines_and_writes_them_in_order_later(
    pipe: tuple[int, io.TextIOWrapper], capsys: pytest.CaptureFixture[str]
) -> None:
    # A reader that falls behind (`relayd serve | less`, a container's log driver) is no
    # failure: the lines wait for it, in order. A blocking write froze relayd instead.
    read_end, stdout = pipe
    log, sink = _log_to(stdout)
    dropped = line_sink.dropped_lines()
    async with _flushing():
        _fill(stdout.fileno(), leave_pages=1)  # room for 4,096 bytes
        for n in range(20):
            log.info("kept", n=n, pad="p" * 1000)  # about 1,070 bytes a line
        await trio.testing.wait_all_tasks_blocked()
        assert sink.pending_bytes() > 10_000
        lines = await _read_lines(read_end, 20)
    assert [json.loads(line)["n"] for line in lines] == list(range(20))
    assert line_sink.dropped_lines() == dropped
    assert sink.pending_bytes() == 0
    assert capsys.readouterr().err == ""


async def test_past_max_pending_bytes_whole_lines_are_dropped_counted_and_said_once(
    pipe: tuple[int, io.TextIOWrapper], capsys: pytest.CaptureFixture[str]
) -> None:
    read_end, stdout = pipe
    log, sink = _log_to(stdout)
    dropped = line_sink.dropped_lines()
    logged = line_sink.MAX_PENDING_BYTES // 1000 + 500  # more than the bound holds
    async with _flushing():
        _fill(stdout.fileno())
        for n in range(logged):
            log.info("padded", n=n, pad="p" * 1000)
        assert 0 < sink.pending_bytes() <= line_sink.MAX_PENDING_BYTES
        lost = line_sink.dropped_lines() - dropped
        assert lost > 0
        kept = await _read_lines(read_end, logged - lost)
        log.info("after")  # the streak is over: written, and no second notice
        after = await _read_lines(read_end, 1)
    # Whole lines, the first ones in order; the dropped ones are the last, none cut.
    assert [json.loads(line)["n"] for line in kept] == list(range(logged - lost))
    assert [json.loads(line)["event"] for line in after] == ["after"]
    assert line_sink.dropped_lines() - dropped == lost
    assert capsys.readouterr().err == (
        "relayd: the log's reader is behind (stdout full); relayd keeps serving, and drops "
        "log lines past 4 MiB held, counted in relayd_log_lines_dropped_total\n"
    )


async def test_a_stalled_reader_does_not_hold_up_the_flushers_end_and_its_lines_are_counted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    read_end, write_end = os.pipe()  # blocking, as stdout is
    try:
        with os.fdopen(write_end, "w") as stdout:
            log, _ = _log_to(stdout)
            async with _flushing():
                assert not os.get_blocking(write_end)  # else a full pipe's write would block
            # Nothing was pending, yet the pipe may be full when the flusher ends: the
            # run's last line must not block on it (a reviewer's case), so the descriptor
            # stays non-blocking, and is put back as it was when the process exits.
            assert not os.get_blocking(write_end)
            assert write_end in line_sink._to_restore
            dropped = line_sink.dropped_lines()
            _fill(write_end)
            log.info("server.stop")
            assert line_sink.dropped_lines() == dropped + 1
            os.set_blocking(read_end, False)
            _drain(read_end)
            dropped = line_sink.dropped_lines()
            async with _flushing():
                _fill(write_end)
                for n in range(5):
                    log.info("stalled", n=n)
                await trio.testing.wait_all_tasks_blocked()
            assert line_sink.dropped_lines() == dropped + 5
            log.info("server.stop")  # after the flusher, as relayd's last line: no hang
            assert line_sink.dropped_lines() == dropped + 6
            assert _drain(read_end).strip(b".") == b""
            line_sink._restore_blocking(write_end)  # what exit does
            assert os.get_blocking(write_end)
            assert write_end not in line_sink._to_restore
    finally:
        os.close(read_end)
        structlog.reset_defaults()
        line_sink.install(io.StringIO())
    assert capsys.readouterr().err.count("relayd: writing the log failed") == 1

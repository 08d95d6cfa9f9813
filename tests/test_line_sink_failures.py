"""A log write that fails leaves the sink writing later lines as before.

``info_line`` writes a connection's line in a ``batched`` block of its own, a batch
of one line. The sink raises an OSError other than EPIPE/ECONNRESET (a full disk,
EAGAIN on a non-blocking stdout, EIO) to the code that logged, and the gate catches
it and serves on; the batch must still end then. Before the fix (review of d88fc9d)
it did not: the sink stayed ``held``, and every later line, the gate's own ``error``
line included, was kept in memory until 64 KiB had piled up.
"""

from __future__ import annotations

import errno
import io
import json
from collections.abc import Iterator

import pytest
import structlog
import trio
import trio.testing

from relayd.config import LogSettings
from relayd.routing.local import LocalRouter
from relayd.telemetry import line_sink
from relayd.telemetry.line_sink import FLUSH_DELAY_S, flush_held_lines
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
    # that write fails, and the failure reaches the caller, as documented.
    stream.fail = True
    with pytest.raises(OSError, match="No space left"):
        info_line(log, "connection.open", conn=1, user_agent="x" * line_sink.MAX_HELD_BYTES)
    # The disk has room again: the next lines are written at once, as before.
    info_line(log, "connection.open", conn=2, user_agent="ua")
    log.error("error", conn=2, summary="OSError: No space left on device")
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["connection.open", "error"]


def _churn(log: structlog.typing.FilteringBoundLogger) -> None:
    for conn in range(1, 10_000):  # some 300 lines fill the hold
        info_line(log, "connection.open", conn=conn, user_agent="u" * 200)


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
        with pytest.raises(OSError, match="No space left"):
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
    with pytest.raises(OSError, match="No space left"):
        router.try_route([relay(alice, '{"to": "bob", "message": "hi", "ref": 7}')])
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

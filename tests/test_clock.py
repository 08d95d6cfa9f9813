"""Tests for relayd.telemetry.clock: trio's clock read straight, never a clock whose run ended."""

from __future__ import annotations

import trio
import trio.testing

from relayd.telemetry import clock
from relayd.telemetry.clock import reading_clock


async def test_within_the_block_now_reads_this_runs_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with reading_clock():
        await trio.sleep(5.0)
        assert clock.now() == trio.current_time() == autojump_clock.current_time()
    assert clock.now is trio.current_time


async def test_blocks_that_overlap_leave_trio_current_time_whichever_ends_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first, second = reading_clock(), reading_clock()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert clock.now() == trio.current_time()  # the later block is still in force
    second.__exit__(None, None, None)
    assert clock.now is trio.current_time
    with reading_clock():
        with reading_clock():
            pass
        assert clock.now is trio.current_time  # the inner one ended last: it decides
    assert clock.now is trio.current_time


def test_a_run_that_ended_leaves_no_clock_behind() -> None:
    async def serve() -> None:
        with reading_clock():
            await trio.lowlevel.checkpoint()

    trio.run(serve)
    assert clock.now is trio.current_time

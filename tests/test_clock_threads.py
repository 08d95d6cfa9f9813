"""Review of ca1697c: relayd.telemetry.clock is process-wide, trio's runs are per thread.

``clock.now`` says "the value is the same either way" as ``trio.current_time()``.
That holds for one trio run at a time (nested or sequential servers are fine), but
not for two runs at once in two threads (two servers embedded in one process, each
with its own ``trio.run``): whichever entered ``reading_clock()`` last decides the
clock every other run's readers, router, writers and log sink read. trio's clocks
differ between runs (SystemClock has a random offset of up to 10,000 s; here two
MockClocks), so timers, rate limits and latencies of one server would be judged
by the other's time.
"""

from __future__ import annotations

import threading

import trio
import trio.testing

from relayd.telemetry import clock
from relayd.telemetry.clock import reading_clock


def test_a_run_in_another_thread_does_not_change_the_time_this_run_reads() -> None:
    entered, done = threading.Event(), threading.Event()

    async def other_server() -> None:  # a second server, in a thread of its own
        with reading_clock():
            entered.set()
            done.wait()  # blocks this thread's run only

    async def this_server() -> tuple[float, float]:
        with reading_clock():
            other = threading.Thread(
                target=trio.run,
                args=(other_server,),
                kwargs={"clock": trio.testing.MockClock()},  # starts at 0
            )
            other.start()
            try:
                await trio.to_thread.run_sync(entered.wait)
                return clock.now(), trio.current_time()
            finally:
                done.set()
                await trio.to_thread.run_sync(other.join)

    mine = trio.testing.MockClock()
    mine.jump(1000.0)
    read, actual = trio.run(this_server, clock=mine)
    assert read == actual == 1000.0

"""relayd.telemetry.clock with servers in two threads at once (two trio runs).

``clock.now`` must read the same time as ``trio.current_time()`` in each run. One
process-wide fast path cannot serve two runs whose clocks differ (trio's
SystemClock has a random offset per run; here two MockClocks), so while runs in two
threads overlap, ``now`` is ``trio.current_time`` for both (review of d88fc9d found
the later run's clock read by the other).
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

"""trio's clock for code that reads it for every message: the same value, in fewer calls.

``trio.current_time()`` reaches the run's clock through two Python functions
of trio's; a lone chat message reads the clock three times (its read, its
routing, its write). While :func:`reading_clock` is in force (the server keeps
it so for its whole run) :func:`now` is the run's clock's own method; outside
it, ``trio.current_time`` itself (a reader, writer or router driven by a test
without a server). The value is the same either way: only the calls differ.
While servers run in two threads at once (each its own trio run, embedded in
one process), :func:`now` is ``trio.current_time`` for all of them: each run's
own clock, through trio's calls.

In telemetry, below routing and the daemon, which read it, and beside the log
sink, which reads it too. Process-wide, like the trio run it stands for; read
as ``clock.now()`` (the module's attribute, at each call), never imported by name.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import trio

__all__ = ["now", "reading_clock"]

#: trio's time now: the clock's own method within :func:`reading_clock`, else trio.current_time.
now: Callable[[], float] = trio.current_time


#: Blocks of :func:`reading_clock` in force, by thread (one trio run per thread).
_blocks: dict[int, int] = {}
_blocks_lock = threading.Lock()


@contextlib.contextmanager
def reading_clock() -> Iterator[None]:
    """Within the block (in a trio run), :func:`now` reads this run's clock without trio's calls.

    Blocks may overlap (servers of one run, in tests): the one that ends last
    leaves ``trio.current_time`` in place, never a clock whose run has ended.
    Blocks in two threads at once (two runs) leave ``trio.current_time`` in
    place until every block has ended: neither run may read the other's clock.
    """
    global now  # the one clock of the process's trio run
    me = threading.get_ident()
    mine = trio.lowlevel.current_clock().current_time
    with _blocks_lock:
        _blocks[me] = _blocks.get(me, 0) + 1
        now = mine if len(_blocks) == 1 else trio.current_time
    try:
        yield
    finally:
        with _blocks_lock:
            left = _blocks.pop(me) - 1
            if left:
                _blocks[me] = left
            # A later block is in force (or ended first) in this run: it decides.
            if now is mine or not _blocks:
                now = trio.current_time

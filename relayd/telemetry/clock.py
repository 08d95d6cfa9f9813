"""trio's clock for code that reads it for every message: the same value, in fewer calls.

``trio.current_time()`` reaches the run's clock through two Python functions
of trio's; a lone chat message reads the clock three times (its read, its
routing, its write). While :func:`reading_clock` is in force (the server keeps
it so for its whole run) :func:`now` is the run's clock's own method; outside
it, ``trio.current_time`` itself (a reader, writer or router driven by a test
without a server). The value is the same either way: only the calls differ.

In telemetry, below routing and the daemon, which read it, and beside the log
sink, which reads it too. Process-wide, like the trio run it stands for; read
as ``clock.now()`` (the module's attribute, at each call), never imported by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import trio

__all__ = ["now", "reading_clock"]

#: trio's time now: the clock's own method within :func:`reading_clock`, else trio.current_time.
now: Callable[[], float] = trio.current_time


@contextlib.contextmanager
def reading_clock() -> Iterator[None]:
    """Within the block (in a trio run), :func:`now` reads this run's clock without trio's calls.

    Blocks may overlap (servers of one run, in tests): the one that ends last
    leaves ``trio.current_time`` in place, never a clock whose run has ended.
    """
    global now  # the one clock of the process's trio run
    mine = now = trio.lowlevel.current_clock().current_time
    try:
        yield
    finally:
        if now is mine:  # else a later block is in force (or ended first): it decides
            now = trio.current_time

"""relayd with counters: trio's scheduling, its tasks, garbage collection, Python calls.

Usage: ``python bench/counted_relayd.py [relayd's arguments]``; ``bench/profile_relayd.py counts``
runs it. It is the ``relayd`` command, with a :class:`trio.abc.Instrument` passed to
``trio.run`` and a garbage-collector callback. Nothing is counted until SIGUSR1; SIGUSR2
stops counting and writes the counts, as JSON, to the file named by the environment
variable ``BENCH_COUNTS_OUT``. With ``BENCH_COUNTS_CALLS=1`` every Python function call
(and call into C) between the two signals is counted instead, with :mod:`cProfile`, which
makes relayd several times slower: use its counts, never its times. With
``BENCH_COUNTS_OPCODES=1`` every bytecode the interpreter executes is counted instead, by
place (:func:`sys.settrace` with opcode events: relayd runs some 100 times slower): where
the interpreter's work goes, exactly, whatever else runs on the machine. Either leaves
the trio instrument out, whose own calls would be counted with relayd's.

What is counted, each a figure per message once divided by the messages of the window:

* ``rounds``: trio scheduling rounds (one wait for I/O each), ``blocking_rounds`` those
  that could sleep (no task was runnable);
* ``task_steps``: task switches (a task resumed until its next checkpoint), per task
  function; ``tasks_spawned``, per task function;
* ``gc``: collections per generation, their total and longest pause (s), and the objects
  they freed (garbage in reference cycles, which reference counting alone cannot free);
  ``gc_tracked_objects``: the objects a full collection walks, at the window's end;
* ``cpu_s``: this process's user + system time (inflated by the counting itself);
* ``busy_stretches``: how long trio ran tasks between two waits for I/O (wall time, so
  time the process was descheduled counts too): their percentiles, and the share of the
  busy time spent in stretches of at least 0.5, 1, 2 and 4 ms. A message that arrives
  while relayd is busy waits for the rest of that stretch, then for its place in the
  next one: these bound what relayd's own run loop adds to a message's latency.
* ``long_steps``: the task steps of at least 1 ms, longest first (20 at most): wall time,
  the thread's CPU time in it, its task, and the context switches within it. A step far
  longer than its CPU with an involuntary switch is one in which relayd was runnable and
  another process ran on its core (the kernel's scheduler, or the hypervisor's, took the
  core away); ``bench/profile_relayd.py sched`` says which process. Timing each step
  costs a ``getrusage`` call and two clock reads, which lengthen the busy stretches
  a little against runs before these were recorded.

Resource handling: the signal handlers run in the main thread, between two bytecodes of
whatever trio is running; they only flip flags and write one file.
"""

from __future__ import annotations

import cProfile
import functools
import gc
import json
import os
import pstats
import resource
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from types import CodeType, FrameType
from typing import Any, Final

import trio

#: Package directories a call's file is attributed to, outermost name first; in those of
#: _BY_MODULE, to the module.
_PACKAGES: Final = (
    "relayd",
    "trio",
    "structlog",
    "msgspec",
    "httptools",
    "h11",
    "outcome",
    "sniffio",
)
_BY_MODULE: Final = frozenset({"relayd", "trio"})
#: A busy stretch this long is listed, with its task steps and GC pause.
_LONG_STRETCH_S: Final = 0.002
#: A task step this long is listed, with its CPU time and context switches.
_LONG_STEP_S: Final = 0.001


class Counts(trio.abc.Instrument):
    """The counters; counting only between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self.on = False
        self._gc_began = 0.0
        self._zero()

    def _zero(self) -> None:
        self.opcodes: Counter[CodeType] = Counter()
        self.rounds = 0
        self.blocking_rounds = 0
        self.task_steps: Counter[str] = Counter()
        self.tasks_spawned: Counter[str] = Counter()
        self.gc: dict[int, dict[str, float]] = {}
        self.stretches: list[float] = []
        self.longest: list[tuple[float, int, float]] = []  # (stretch, task steps, GC pause)
        # (wall, CPU, task, involuntary switches, voluntary switches) of each long step
        self.long_steps: list[tuple[float, float, str, int, int]] = []
        self._step_began: tuple[float, float, int, int] | None = None
        self._busy_since: float | None = None
        self._stretch_steps = 0
        self._stretch_gc = 0.0
        self._cpu0 = _cpu_s()
        self._profiler: cProfile.Profile | None = None

    def start(self, calls: bool, opcodes: bool) -> None:
        """Zero every counter and start counting."""
        self._zero()
        if calls:
            self._profiler = cProfile.Profile()
            self._profiler.enable()
        if opcodes:
            sys.settrace(self._trace_call)
        self.on = True

    def stop(self) -> dict[str, Any]:
        """Stop counting; the counts."""
        self.on = False
        found: dict[str, Any] = {
            "cpu_s": _cpu_s() - self._cpu0,
            "rounds": self.rounds,
            "blocking_rounds": self.blocking_rounds,
            "task_steps": dict(self.task_steps.most_common()),
            "tasks_spawned": dict(self.tasks_spawned.most_common()),
            "gc": {str(g): v for g, v in sorted(self.gc.items())},
            "gc_tracked_objects": len(gc.get_objects()),
            "busy_stretches": _stretches(self.stretches),
            "long_stretches": [
                {"ms": round(s * 1e3, 3), "task_steps": n, "gc_ms": round(g * 1e3, 3)}
                for s, n, g in sorted(self.longest, reverse=True)[:20]
            ],
            "long_steps": [
                {
                    "ms": round(wall * 1e3, 3),
                    "cpu_ms": round(cpu * 1e3, 3),
                    "task": task,
                    "involuntary_switches": involuntary,
                    "voluntary_switches": voluntary,
                }
                for wall, cpu, task, involuntary, voluntary in sorted(
                    self.long_steps, reverse=True
                )[:20]
            ],
        }
        if self._profiler is not None:
            self._profiler.disable()
            found["calls"] = _calls(self._profiler)
        if self.opcodes:
            sys.settrace(None)
            found["opcodes"] = _opcodes(self.opcodes)
        return found

    # -- sys.settrace's hooks: every bytecode, by code object ------------------------------------

    def _trace_call(self, frame: FrameType, event: str, arg: object) -> Any:
        # "call" also comes when a coroutine resumes: every task's frames are traced.
        frame.f_trace_opcodes = True
        return self._trace_opcode

    def _trace_opcode(self, frame: FrameType, event: str, arg: object) -> Any:
        if event == "opcode":
            self.opcodes[frame.f_code] += 1
        return self._trace_opcode

    # -- trio's hooks ----------------------------------------------------------------------

    def before_io_wait(self, timeout: float) -> None:  # noqa: D102
        if self.on:
            self.rounds += 1
            self.blocking_rounds += timeout > 0
            if self._busy_since is not None:
                stretch = time.perf_counter() - self._busy_since
                self.stretches.append(stretch)
                if stretch >= _LONG_STRETCH_S:
                    self.longest.append((stretch, self._stretch_steps, self._stretch_gc))

    def after_io_wait(self, timeout: float) -> None:  # noqa: D102
        self._busy_since = time.perf_counter() if self.on else None
        self._stretch_steps, self._stretch_gc = 0, 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:  # noqa: D102
        if self.on:
            self.task_steps[task.name] += 1
            self._stretch_steps += 1
            usage = resource.getrusage(resource.RUSAGE_THREAD)
            self._step_began = (
                time.perf_counter(),
                time.thread_time(),
                usage.ru_nivcsw,
                usage.ru_nvcsw,
            )

    def after_task_step(self, task: trio.lowlevel.Task) -> None:  # noqa: D102
        began, self._step_began = self._step_began, None
        if began is None or not self.on:
            return
        wall = time.perf_counter() - began[0]
        if wall >= _LONG_STEP_S:
            usage = resource.getrusage(resource.RUSAGE_THREAD)
            self.long_steps.append(
                (
                    wall,
                    time.thread_time() - began[1],
                    task.name,
                    usage.ru_nivcsw - began[2],
                    usage.ru_nvcsw - began[3],
                )
            )

    def task_spawned(self, task: trio.lowlevel.Task) -> None:  # noqa: D102
        if self.on:
            self.tasks_spawned[task.name] += 1

    # -- the garbage collector's -------------------------------------------------------------

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        """gc.callbacks: time each collection, per generation."""
        if phase == "start":
            self._gc_began = time.perf_counter()
            return
        if not self.on:
            return
        pause = time.perf_counter() - self._gc_began
        mine = self.gc.setdefault(
            info["generation"], {"count": 0, "total_s": 0.0, "max_s": 0.0, "collected": 0}
        )
        mine["count"] += 1
        mine["total_s"] += pause
        mine["max_s"] = max(mine["max_s"], pause)
        mine["collected"] += info["collected"]
        self._stretch_gc += pause


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stretches(stretches: list[float]) -> dict[str, float]:
    """Percentiles of the busy stretches (µs), and the busy time's share in long ones."""
    if not stretches:
        return {"count": 0}
    ordered = sorted(stretches)
    busy = sum(ordered)
    found: dict[str, float] = {"count": len(ordered), "busy_s": busy}
    for name, q in (("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)):
        found[name] = ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6
    found["max_us"] = ordered[-1] * 1e6
    for ms in (0.5, 1, 2, 4):
        found[f"busy_share_in_stretches_over_{ms}ms"] = (
            sum(s for s in ordered if s >= ms / 1000) / busy if busy else 0.0
        )
    return found


def _where(filename: str, function: str) -> str:
    """The package (in relayd, the module) a profiled function belongs to.

    C functions are named by themselves; code that attrs generates (trio's cancel scopes,
    for one) by the class it was generated for; the standard library by its module; this
    file's own hooks as the measurement's.
    """
    if filename == "~":  # a builtin or a C method: named by itself
        return function
    if filename.startswith("<"):  # "<attrs generated init trio._core._run.CancelScope>"
        return f"{filename.split()[-1].rstrip('>')} (generated)"
    path = Path(filename)
    if path.name == Path(__file__).name:
        return "the counting itself (not relayd)"
    parts = path.with_suffix("").parts
    for package in _PACKAGES:
        if package in parts:
            if package not in _BY_MODULE:
                return package
            return ".".join(parts[parts.index(package) :])
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    return f"stdlib {path.parent.name if path.stem == '__init__' else path.stem}"


def _opcodes(counted: Counter[CodeType]) -> dict[str, Any]:
    """Bytecodes executed per place (as :func:`_calls`) and per function."""
    by_place: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    for code, count in counted.items():
        place = _where(code.co_filename, code.co_name)
        by_place[place] += count
        by_function[f"{place}:{code.co_qualname}"] += count
    return {
        "total": sum(by_place.values()),
        "by_place": dict(by_place.most_common()),
        "top_functions": dict(by_function.most_common(40)),
    }


def _calls(profiler: cProfile.Profile) -> dict[str, Any]:
    """Calls per place: relayd's modules, the other packages, each C function by name."""
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    by_place: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    for (filename, line, function), (_, calls, *_rest) in stats.items():
        place = _where(filename, function)
        by_place[place] += calls
        by_function[f"{place}:{function}" if filename != "~" else function] += calls
        del line
    return {
        "total": sum(by_place.values()),
        "by_place": dict(by_place.most_common()),
        "top_functions": dict(by_function.most_common(40)),
    }


def main() -> int:
    """Run the relayd command line, counted."""
    from relayd import cli

    out = Path(os.environ["BENCH_COUNTS_OUT"])
    calls = os.environ.get("BENCH_COUNTS_CALLS") == "1"
    opcodes = os.environ.get("BENCH_COUNTS_OPCODES") == "1"
    counts = Counts()
    gc.callbacks.append(counts.on_gc)

    def start(_signum: int, _frame: FrameType | None) -> None:
        counts.start(calls, opcodes)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        out.write_text(json.dumps(counts.stop(), indent=1) + "\n")

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    run = trio.run
    if not (calls or opcodes):
        trio.run = functools.partial(run, instruments=[counts])  # type: ignore[assignment]
    try:
        return cli.main(sys.argv[1:])
    finally:
        trio.run = run


if __name__ == "__main__":
    raise SystemExit(main())

"""Where relayd's time goes: one kind of operation at a time, under one profiling tool.

Usage (from the repository root)::

    .venv/bin/python bench/profile_relayd.py TOOL [--op message|handshake|fanin|throughput]
                                      [--size BYTES]
                                      [--pairs N] [--rate PER_S] [--duration S] [--no-log]
                                      [--pings] [--server relayd|node-ws|trio-floor]

It starts relayd (or, with ``--server node-ws`` or ``trio-floor``, that peer, for the
``cpu``, ``strace`` and ``callgrind`` tools, so that relayd's figures can be set beside
a peer's from one session) as ``bench/run.py`` does (``bench/relayd-bench.toml``, message events
logged unless ``--no-log``; pinned to ``--server-cpu``), under or beside the tool, drives it
with ``bench/loadgen.mjs`` (the generator pinned to ``--gen-cpu``), has the tool look only
at the generator's measured window, and prints figures per operation: per message for
``--op message`` (the chat mode: ``--pairs`` pairs, ``--rate`` messages/s in all, evenly
spaced, so each arrives alone while relayd keeps up), per connection for ``--op handshake``
(connrate, ``--concurrency`` at a time: handshake, welcome, close), per message delivered for
``--op fanin`` (the bench's fan-in: 100 senders keep 128 messages in flight to one
receiver, closed loop, as fast as relayd goes) and ``--op throughput`` (the bench's
throughput: ``--pairs`` pairs, default 10, each sender keeping 128 in flight). Everything
also goes to
``OUT/profile.json`` (``--out``, default ``bench/results/profile-<tool>-<UTC time>/``).

**Keepalive is kept out of the window** unless ``--pings``: relayd runs with pings off
(``ping_interval_s = 0``), as the bench's chat cells see it, whose windows end before a
connection's first ping (30 s after it opened). With the defaults, a profile whose window
begins near 30 s after the connections opened would count every connection's ping, its
pong and the two moves of its reader's deadline among the messages' work: at 20
messages/s over 100 connections, 12.6% of a lone message's bytecodes. ``--pings`` keeps
the configured defaults, to measure that.

Tools, and what they hold to on a busy machine:

* ``cpu``: relayd's CPU time per operation (``perf stat``'s task-clock, nanoseconds) and
  its context switches. Time depends on what else runs: say so when quoting it.
* ``counts``: trio scheduling rounds, task switches and tasks spawned per operation, per
  task function; garbage collections and their pauses (``bench/counted_relayd.py``);
  and the busy stretches, how long trio ran tasks between two waits for I/O (wall
  time: like ``cpu``'s, they depend on what else runs), and the task steps of 1 ms or
  more, with their CPU time and context switches (one far longer than its CPU was
  preempted: ``sched`` says by whom).
  ``--calls`` counts every Python function call and call into C instead, by place
  (cProfile); ``--opcodes`` every bytecode executed, by place and function. The counts
  are exact and do not depend on load.
* ``strace``: system calls per operation, by name (``strace -c -f``). Counts are exact;
  strace slows relayd several times, so keep ``--rate`` low enough that relayd still
  keeps up (every message alone): the default does.
* ``pyspy``: the share of relayd's CPU samples in each part of relayd and its libraries
  (``py-spy record``, sampling; each sample pauses relayd for a moment), and that share
  of this run's CPU per operation. Shares hold under load; the microseconds do not.
* ``sched``: who else ran on the server's core while the server was runnable, and for
  how long (``perf record -e sched:sched_switch`` on that core): each time the server
  was preempted, until it ran again, by process. A long step of ``counts``' (its wall
  time far over its CPU time, with an involuntary switch) or a latency tail is told
  apart here from relayd's own work: the kernel's threads, another process of the
  machine's. What the kernel saw, from a moment after the window opens (perf starting)
  to its end; time a hypervisor takes from the whole virtual CPU shows as the server
  running.
* ``callgrind``: instructions executed per operation (``valgrind --tool=callgrind``),
  in all and by C function and object file: repeatable to a fraction of a percent whatever
  the load (user space only: the kernel's side of system calls is not in them). relayd
  runs some 50 times slower under valgrind: the defaults shrink the load to match.
  node-ws's count includes V8 compiling its code for as long as it does: 208,831
  instructions per lone message after the default 5 s of load, 82,887 after
  ``--warmup 150`` (docs/benchmarks.md); give a JIT a long warm-up.

Needs ``strace``, ``valgrind`` and ``perf`` (Debian packages ``strace``, ``valgrind``,
``linux-perf``; ``sched`` reads the kernel's tracepoints: run it as root) and py-spy
(``.venv/bin/pip install py-spy``) for the tools that use them;
``docs/benchmarks.md`` ("Where the time goes per message") has the figures and commands.

Resource handling: relayd, the generator and the tool are this script's children, each
stopped by its pid (SIGINT for the samplers, which then write their output; SIGTERM, then
SIGKILL, for relayd); every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from report import Cell, Scenario
from run import (
    BENCH,
    RELAYD_CONFIG,
    Plan,
    ServerProcess,
    ServerSpec,
    machine,
    raise_fd_limit,
    run_cell,
    server_specs,
)

#: Seconds a tool gets to write its output after SIGINT, and relayd to start under valgrind.
TOOL_STOP_S: Final = 60.0
VALGRIND_READY_S: Final = 600.0
#: relayd's keepalive, off for the run (see the module docstring).
NO_KEEPALIVE_ENV: Final = {"RELAYD_LIMITS__PING_INTERVAL_S": "0"}
#: Samples per second py-spy takes.
PYSPY_RATE: Final = 250
#: The tools whose overhead makes relayd far slower: their default load is smaller.
SLOW_TOOLS: Final = frozenset({"callgrind", "strace", "counts"})


# -- the load ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What the generator does, and what one operation is."""

    op: str  # "message", "handshake", "fanin" or "throughput"
    params: dict[str, Any]

    @property
    def scenario(self) -> Scenario:
        """The load as a bench scenario (the generator's mode is its kind)."""
        kind = {"message": "chat", "handshake": "connrate"}.get(self.op, self.op)
        return Scenario(f"profile/{self.op}", kind, self.params)

    def operations(self, cell: Cell) -> int:
        """How many operations the measured window held."""
        result = cell.result or {}
        counted = {"message": "sent", "handshake": "opened"}.get(self.op, "received")
        return int(result.get(counted, 0))


def load_of(args: argparse.Namespace) -> Load:
    """The load the command line asks for, with defaults that suit its tool."""
    slow = args.tool in SLOW_TOOLS
    very_slow = args.tool == "callgrind" or args.opcodes
    timing = {"warmup_s": args.warmup or (2.0 if not very_slow else 5.0)}
    timing["duration_s"] = args.duration or (30.0 if very_slow else 10.0)
    if args.op == "handshake":
        return Load("handshake", {"concurrency": args.concurrency, **timing})
    if args.op == "fanin":
        return Load("fanin", {"senders": 100, "size": args.size, "window": 128, **timing})
    if args.op == "throughput":
        closed = {"pairs": args.pairs or 10, "size": args.size, "window": 128, **timing}
        return Load("throughput", closed)
    rate = args.rate or (20 if very_slow else 200 if slow else 500)
    pairs = args.pairs or (50 if very_slow else 500)
    params = {"pairs": pairs, "rate": rate, "size": args.size, "concurrency": 50, **timing}
    params |= {"settle_s": 5.0 if very_slow else 2.0, "drain_s": 60.0, "close_s": 60.0}
    return Load("message", params)


# -- the tools -----------------------------------------------------------------------------------


@dataclass
class Tool:
    """A profiler: how relayd is started under it, and what it does around the window.

    Subclasses override :meth:`wrap`, :meth:`started`, :meth:`ended` and :meth:`figures`.
    """

    out: Path
    cpu: int  # the core the tool's own processes run on (the generator's)
    server: ServerProcess | None = None
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def wrap(self, argv: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
        """The argv that starts relayd (``argv``) under the tool, and extra environment."""
        return argv, {}

    def started(self) -> None:
        """The measured window opened."""

    def ended(self) -> None:
        """The measured window closed."""

    def figures(self, operations: int) -> dict[str, Any]:
        """The tool's figures, per operation where they are counts."""
        return {}

    def spawn(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start a helper (strace, perf, py-spy) on the tool's core."""
        proc = subprocess.Popen(
            ["taskset", "-c", str(self.cpu), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.out / f"{Path(argv[0]).name}.err").open("wb"),
        )
        self.children.append(proc)
        return proc

    def stop_children(self) -> None:
        """SIGINT each helper (they write their output then), wait, SIGKILL if need be."""
        for proc in self.children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=TOOL_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.children.clear()

    @property
    def pid(self) -> int:
        """The pid of the relayd process (valgrind's guest is the same pid)."""
        assert self.server is not None
        return self.server.proc.pid


class CpuTool(Tool):
    """perf stat with software counters: CPU time and context switches; user and system."""

    _times: tuple[float, float] = (0.0, 0.0)

    def started(self) -> None:  # noqa: D102
        assert self.server is not None
        events = "task-clock,context-switches,cpu-migrations,page-faults"
        out = str(self.out / "perf-stat.csv")
        self.spawn(["perf", "stat", "-x", ",", "-e", events, "-o", out, "-p", str(self.pid)])
        self._times = self.server.cpu_times()

    def ended(self) -> None:  # noqa: D102
        assert self.server is not None
        user, system = self.server.cpu_times()
        self._times = (user - self._times[0], system - self._times[1])
        self.stop_children()

    def figures(self, operations: int) -> dict[str, Any]:  # noqa: D102
        found = parse_perf_stat((self.out / "perf-stat.csv").read_text())
        return {
            "cpu_us_per_op": found.get("task-clock", 0.0) * 1000 / operations,
            "user_us_per_op": self._times[0] * 1e6 / operations,
            "system_us_per_op": self._times[1] * 1e6 / operations,
            "context_switches_per_op": found.get("context-switches", 0.0) / operations,
            "page_faults_per_op": found.get("page-faults", 0.0) / operations,
            "perf_stat": found,
        }


class CountsTool(Tool):
    """bench/counted_relayd.py: trio rounds, task steps, spawns, GC; Python calls."""

    calls = False
    opcodes = False

    def wrap(self, argv: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:  # noqa: D102
        # argv is (python, "-m", "relayd", ...): run the counted command instead.
        env = {"BENCH_COUNTS_OUT": str(self.out / "counts.json")}
        if self.calls:
            env["BENCH_COUNTS_CALLS"] = "1"
        if self.opcodes:
            env["BENCH_COUNTS_OPCODES"] = "1"
        return (argv[0], str(BENCH / "counted_relayd.py"), *argv[3:]), env

    def started(self) -> None:  # noqa: D102
        os.kill(self.pid, signal.SIGUSR1)

    def ended(self) -> None:  # noqa: D102
        os.kill(self.pid, signal.SIGUSR2)

    def figures(self, operations: int) -> dict[str, Any]:  # noqa: D102
        path = self.out / "counts.json"
        deadline = time.monotonic() + TOOL_STOP_S
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # written by relayd's signal handler, at its next bytecode
        counts = json.loads(path.read_text())
        per = _per(operations)
        found: dict[str, Any] = {
            "gc": counts["gc"],
            "gc_pause_us_per_op": per(sum(g["total_s"] for g in counts["gc"].values()) * 1e6),
            "gc_collected_per_op": per(sum(g["collected"] for g in counts["gc"].values())),
            "gc_tracked_objects": counts["gc_tracked_objects"],
            "counted_cpu_us_per_op": per(counts["cpu_s"] * 1e6),
        }
        if not (self.calls or self.opcodes):  # the trio instrument ran
            steps, spawned = counts["task_steps"], counts["tasks_spawned"]
            found |= {
                "rounds_per_op": per(counts["rounds"]),
                "blocking_rounds_per_op": per(counts["blocking_rounds"]),
                "task_steps_per_op": per(sum(steps.values())),
                "task_steps_per_op_by_task": {k: per(v) for k, v in steps.items()},
                "tasks_spawned_per_op": per(sum(spawned.values())),
                "tasks_spawned_per_op_by_task": {k: per(v) for k, v in spawned.items()},
                "busy_stretches": counts["busy_stretches"],
                "long_stretches": counts["long_stretches"],
                "long_steps": counts["long_steps"],
            }
        if "calls" in counts:
            calls = counts["calls"]
            found["calls_per_op"] = per(calls["total"])
            found["calls_per_op_by_place"] = {k: per(v) for k, v in calls["by_place"].items()}
            found["top_calls_per_op"] = {k: per(v) for k, v in calls["top_functions"].items()}
        if "opcodes" in counts:
            opcodes = counts["opcodes"]
            found["opcodes_per_op"] = per(opcodes["total"])
            found["opcodes_per_op_by_place"] = {k: per(v) for k, v in opcodes["by_place"].items()}
            found["top_opcodes_per_op"] = {k: per(v) for k, v in opcodes["top_functions"].items()}
        return found


class StraceTool(Tool):
    """strace -c -f attached for the window: system calls by name."""

    def started(self) -> None:  # noqa: D102
        out = str(self.out / "strace.txt")
        self.spawn(
            ["strace", "-f", "-c", "-U", "name,calls,errors", "-o", out, "-p", str(self.pid)]
        )

    def ended(self) -> None:  # noqa: D102
        self.stop_children()

    def figures(self, operations: int) -> dict[str, Any]:  # noqa: D102
        calls, errors = parse_strace_summary((self.out / "strace.txt").read_text())
        return {
            "syscalls_per_op": sum(calls.values()) / operations,
            "syscalls_per_op_by_name": {
                k: v / operations for k, v in sorted(calls.items(), key=lambda kv: -kv[1])
            },
            "failed_syscalls_per_op_by_name": {k: v / operations for k, v in errors.items()},
        }


class SchedTool(Tool):
    """perf record of the scheduler's switches on the server's core: who preempted it."""

    server_cpu = 1
    #: The server's threads seen at the window's edges (its other threads are named apart).
    threads: frozenset[int] = frozenset()
    #: The measured window, on CLOCK_MONOTONIC (perf's clock here: ``-k``).
    window: tuple[float, float] = (0.0, math.inf)

    def started(self) -> None:  # noqa: D102
        self.window = (time.monotonic(), math.inf)
        self.threads = self._threads()
        core, out = str(self.server_cpu), str(self.out / "sched.data")
        events = ["-k", "CLOCK_MONOTONIC", "-e", "sched:sched_switch", "-C", core]
        self.spawn(["perf", "record", "-q", *events, "-o", out])

    def ended(self) -> None:  # noqa: D102
        self.window = (self.window[0], time.monotonic())
        self.threads |= self._threads()
        self.stop_children()

    def _threads(self) -> frozenset[int]:
        # The server's other threads (node's helpers, for one) run on its core too.
        return frozenset(int(tid) for tid in os.listdir(f"/proc/{self.pid}/task"))

    def figures(self, operations: int) -> dict[str, Any]:  # noqa: D102
        script = _check_run(
            ["perf", "script", "-i", str(self.out / "sched.data"), "-F", "time,trace"]
        )
        found = parse_preemptions(script, self.pid, self.threads, self.window)
        found["preempted_us_per_op"] = found["preempted_ms"] * 1e3 / operations
        # perf says so when it could not keep up: spells may then be missing.
        said = (self.out / "perf.err").read_text(errors="replace")
        found["perf_lost"] = [line for line in said.splitlines() if "lost" in line.lower()]
        return found


#: One sched_switch event as ``perf script -F time,trace`` prints it.
_SWITCH: Final = re.compile(
    r"\s*(?P<time>[\d.]+):\s+prev_comm=(?P<prev_comm>.*?) prev_pid=(?P<prev_pid>\d+)"
    r" prev_prio=-?\d+ prev_state=(?P<state>\S+) ==> next_comm=(?P<next_comm>.*?)"
    r" next_pid=(?P<next_pid>\d+) "
)


def parse_preemptions(
    script: str,
    pid: int,
    threads: frozenset[int] = frozenset(),
    window: tuple[float, float] = (-math.inf, math.inf),
    longest: int = 10,
) -> dict[str, Any]:
    """Who ran on a core while ``pid`` was runnable there, from its sched_switch events.

    A preemption starts when ``pid`` is switched out still runnable (``prev_state`` R,
    or R+) and ends when it is switched in again; the time between is charged to
    whatever ran, each for its own part (``swapper``, the idle task, where the core
    idled meanwhile). A switch out in any other state (waiting for I/O, as between
    messages) is no preemption. What ran as one of ``threads`` (the server's own, bar
    ``pid``) is named "COMM (the server's)".

    Only events within ``window`` count: a preemption still going at its end is cut
    there, and one going at its start (perf starts a moment after the window opens),
    whose beginning is not seen, is not counted. One that ``pid`` is switched out of
    again before it is seen switched in (perf lost the switch in) is dropped, and
    counted in ``unclosed``.

    Returns:
        ``preemptions`` (count), ``preempted_ms`` (their time in all), ``by_process``
        (ms, most first), ``longest`` (the longest ones: ms, and who ran, in ms), and
        ``unclosed``.

    Raises:
        ValueError: ``script`` has lines and none is a sched_switch event as expected
            (perf printed another format).
    """
    start, end = window
    by_process: dict[str, float] = {}
    spells: list[tuple[float, dict[str, float]]] = []
    began: float | None = None
    running = ""
    since = 0.0
    ran: dict[str, float] = {}
    unclosed = 0
    matched = False

    def close(at: float) -> None:
        spells.append((at - (began or at), ran))
        for name, spent in ran.items():
            by_process[name] = by_process.get(name, 0.0) + spent

    for line in script.splitlines():
        switch = _SWITCH.match(line)
        if switch is None:
            continue
        matched = True
        at = float(switch["time"])
        if at < start:
            continue
        if at > end:
            break
        if began is not None:
            ran[running] = ran.get(running, 0.0) + at - since
            if int(switch["next_pid"]) == pid:
                close(at)
                began = None
                continue
            if int(switch["prev_pid"]) == pid:  # ran again unseen: its switch in was lost
                unclosed += 1
                began = None
        if int(switch["prev_pid"]) == pid and switch["state"].startswith("R"):
            began, ran = at, {}
        if began is not None:
            running, since = switch["next_comm"], at
            if int(switch["next_pid"]) in threads:
                running += " (the server's)"
    if began is not None and end != math.inf:
        ran[running] = ran.get(running, 0.0) + end - since
        close(end)
    if not matched and script.strip():
        raise ValueError("no sched_switch event in perf script's output (another format?)")
    spells.sort(key=lambda spell: -spell[0])
    return {
        "preemptions": len(spells),
        "preempted_ms": round(sum(spell for spell, _ in spells) * 1e3, 3),
        "by_process": {
            name: round(spent * 1e3, 3)
            for name, spent in sorted(by_process.items(), key=lambda kv: -kv[1])
        },
        "longest": [
            {
                "ms": round(spell * 1e3, 3),
                "ran": {
                    name: round(spent * 1e3, 3)
                    for name, spent in sorted(who.items(), key=lambda kv: -kv[1])
                },
            }
            for spell, who in spells[:longest]
        ],
        "unclosed": unclosed,
    }


#: py-spy's frames, by the file they are in, to the part of the work they are (first match
#: from the innermost frame outwards wins).
PLACES: Final = (
    ("trio/_core/_io_epoll.py", "trio: waiting for and dispatching I/O (epoll)"),
    ("trio/_socket.py", "socket reads and writes (the system calls)"),
    ("trio/_highlevel_socket.py", "socket reads and writes (the system calls)"),
    ("relayd/telemetry/", "logging"),
    ("structlog/", "logging"),
    ("relayd/wire/frames.py", "framing: parse, unmask, check UTF-8, encode"),
    ("relayd/wire/masking.py", "framing: parse, unmask, check UTF-8, encode"),
    ("relayd/wire/server_frames.py", "framing: parse, unmask, check UTF-8, encode"),
    ("relayd/wire/dialects.py", "envelope JSON and payloads (msgspec)"),
    ("relayd/wire/handshake.py", "handshake: HTTP request (httptools) and response"),
    ("httptools/", "handshake: HTTP request (httptools) and response"),
    ("h11/", "admin server (h11)"),
    ("relayd/policy/", "policy: admission, auth, rate limit"),
    ("relayd/routing/", "routing: router task, table, outbox"),
    ("relayd/daemon/connection.py", "connection: reader, writer, timers"),
    ("relayd/daemon/transport.py", "connection: reader, writer, timers"),
    ("relayd/daemon/closing.py", "connection: reader, writer, timers"),
    ("relayd/daemon/gate.py", "gate: accept, handshake steps, connection boundary"),
    ("relayd/daemon/request_head.py", "gate: accept, handshake steps, connection boundary"),
    ("relayd/daemon/authentication.py", "gate: accept, handshake steps, connection boundary"),
    ("relayd/daemon/", "daemon: other"),
    ("trio/", "trio: scheduling, checkpoints, cancel scopes, channels"),
    ("outcome/", "trio: scheduling, checkpoints, cancel scopes, channels"),
    ("secrets.py", "ids: secrets.token_urlsafe"),
    ("base64.py", "ids: secrets.token_urlsafe"),
)
_FRAME: Final = re.compile(r"\(([^():]+):\d+\)")


def place_of(stack: str) -> str:
    """The part of the work a py-spy raw stack (outermost frame first) is in."""
    files = _FRAME.findall(stack)
    for path in reversed(files):
        for fragment, place in PLACES:
            if fragment in path:
                return place
    return "other"


class PySpyTool(Tool):
    """py-spy record for the window: CPU samples by place."""

    def started(self) -> None:  # noqa: D102
        out = str(self.out / "pyspy.txt")
        # Not --nonblocking: without pausing relayd for a sample py-spy cannot tell a
        # thread asleep in epoll_wait from a running one, and idle time would count.
        argv = ["py-spy", "record", "-r", str(PYSPY_RATE), "-f", "raw"]
        self.spawn([_venv_tool("py-spy"), *argv[1:], "-o", out, "-p", str(self.pid)])

    def ended(self) -> None:  # noqa: D102
        self.stop_children()

    def figures(self, operations: int) -> dict[str, Any]:  # noqa: D102
        places, functions = parse_pyspy_raw((self.out / "pyspy.txt").read_text())
        total = sum(places.values())
        return {
            "samples": total,
            "samples_per_op": total / operations,
            "share_by_place": {k: v / total for k, v in places.most_common()} if total else {},
            "share_by_function": (
                {k: v / total for k, v in functions.most_common(30)} if total else {}
            ),
        }


class CallgrindTool(Tool):
    """valgrind --tool=callgrind, instrumenting only the window: instructions."""

    def wrap(self, argv: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:  # noqa: D102
        out = self.out / "callgrind.out"
        tool = ("valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no")
        return (*tool, f"--callgrind-out-file={out}", *argv), {}

    def started(self) -> None:  # noqa: D102
        _check_run(["callgrind_control", "--instr=on", str(self.pid)])

    def ended(self) -> None:  # noqa: D102
        _check_run(["callgrind_control", "--instr=off", str(self.pid)])

    def figures(self, operations: int) -> dict[str, Any]:  # noqa: D102
        # The data is written when the server exits (instrumentation is off by then).
        dumps = sorted(self.out.glob("callgrind.out*"))
        text = _check_run(["callgrind_annotate", "--threshold=100", *map(str, dumps)])
        total, by_function, by_object = parse_callgrind_annotate(text)
        per = _per(operations)
        return {
            "instructions_per_op": per(total),
            "instructions_per_op_by_object": {k: per(v) for k, v in by_object.most_common(15)},
            "instructions_per_op_by_function": {k: per(v) for k, v in by_function.most_common(100)},
        }


def _object_of_header(path: str) -> str:
    return "libpython (inlined)" if re.search(r"Python-3\.\d+", path) else "?"


# -- the tools' output ---------------------------------------------------------------------------


def parse_perf_stat(text: str) -> dict[str, float]:
    """``perf stat -x ,`` output: each event's count (task-clock in milliseconds)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0][:1].isdigit():
            found[parts[2]] = float(parts[0])
    return found


def parse_strace_summary(text: str) -> tuple[dict[str, int], dict[str, int]]:
    """``strace -c -U name,calls,errors`` output: calls, and failed calls, by name."""
    calls: dict[str, int] = {}
    errors: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit() and parts[0] != "total":
            calls[parts[0]] = int(parts[1])
            if len(parts) >= 3 and parts[2].isdigit():
                errors[parts[0]] = int(parts[2])
    return calls, errors


def parse_pyspy_raw(text: str) -> tuple[Counter[str], Counter[str]]:
    """``py-spy record -f raw`` output: samples by place (:func:`place_of`) and by leaf."""
    places: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            places[place_of(stack)] += int(count)
            functions[stack.rsplit(";", 1)[-1]] += int(count)
    return places, functions


def parse_callgrind_annotate(text: str) -> tuple[int, Counter[str], Counter[str]]:
    """``callgrind_annotate`` output: total instructions, by function and by object file.

    Code inlined from a header is listed without its object file: it is the interpreter's
    when the header is CPython's. ``'2`` (a recursion level) is folded into the function.
    """
    total = 0
    by_function: Counter[str] = Counter()
    by_object: Counter[str] = Counter()
    for line in text.splitlines():
        match = re.match(r"\s*([\d,]+) +(?:\([^)]*\) +)?(\S.*)$", line)
        if not match:
            continue
        ir = int(match[1].replace(",", ""))
        name = match[2]
        if name.startswith("PROGRAM TOTALS"):
            total = ir
            continue
        where = re.match(r"(.*?):(\S+)(?: \[(.*)\])?$", name)
        if where is None:
            continue
        function = re.sub(r"'\d+$", "", where[2])
        objfile = Path(where[3]).name if where[3] else _object_of_header(where[1])
        by_function[f"{function} [{objfile}]"] += ir
        by_object[objfile] += ir
    return total, by_function, by_object


TOOLS: Final[dict[str, type[Tool]]] = {
    "cpu": CpuTool,
    "counts": CountsTool,
    "strace": StraceTool,
    "pyspy": PySpyTool,
    "callgrind": CallgrindTool,
    "sched": SchedTool,
}
#: The executable each tool needs, and where it comes from.
NEEDS: Final = {
    "cpu": ("perf", "apt-get install linux-perf"),
    "strace": ("strace", "apt-get install strace"),
    "pyspy": ("py-spy", ".venv/bin/pip install py-spy"),
    "callgrind": ("valgrind", "apt-get install valgrind"),
    "sched": ("perf", "apt-get install linux-perf"),
}


def _per(operations: int) -> Any:
    return lambda value: value / operations if operations else None


def _venv_tool(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def _check_run(argv: Sequence[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


#: The bench's peers this script can profile in relayd's place (``--server``): the chat
#: scenarios' servers, whose figures beside relayd's explain a ratio of a full run; and
#: the tools that need nothing of relayd's inside the process (counts and pyspy do).
PROFILED_PEERS: Final = ("node-ws", "trio-floor")
PEER_TOOLS: Final = ("callgrind", "cpu", "sched", "strace")


def peer_spec(name: str) -> ServerSpec:
    """How ``bench/run.py`` starts the peer ``name``; raise if it cannot run here."""
    spec = next((s for s in server_specs() if s.name == name), None)
    if spec is None:
        raise ValueError(f"no such peer: {name}")
    if spec.missing is not None:
        raise RuntimeError(f"{name} cannot run here: {spec.missing}")
    return spec


# -- one profile run -----------------------------------------------------------------------------


@contextlib.contextmanager
def relayd_under(
    tool: Tool,
    plan: Plan,
    log_messages: bool,
    ready_s: float,
    *,
    pings: bool = False,
    name: str = "relayd",
) -> Iterator[ServerProcess]:
    """Start relayd (or the bench's peer ``name``) under ``tool``; stop it (SIGTERM) after.

    Without ``pings``, relayd's keepalive is kept out of the run (see the module
    docstring); ``log_messages`` and ``pings`` are relayd's settings, and a peer
    runs as ``bench/run.py`` runs it.
    """
    argv: tuple[str, ...] = (sys.executable, "-m", "relayd", "--config", str(RELAYD_CONFIG))
    argv += ("--host", "127.0.0.1", "--port", "0")
    peer_env: tuple[tuple[str, str], ...] = ()
    if name != "relayd":
        peer = peer_spec(name)
        argv, peer_env = peer.argv, peer.env
    wrapped, env = tool.wrap(argv)
    env.update(peer_env)
    if name == "relayd" and not log_messages:
        env["RELAYD_LOG__MESSAGES"] = "off"
    if name == "relayd" and not pings:
        env.update(NO_KEEPALIVE_ENV)
    spec = ServerSpec(name, wrapped, tuple(env.items()))
    logs = plan.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(spec, plan.server_cpu, logs / f"{name}.log", plan.pin(plan.server_cpu))
    tool.server = server
    try:
        server.wait_ready(ready_s)
        yield server
    finally:
        tool.stop_children()
        server.stop()


def profile(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run one profile; everything it found, as written to profile.json."""
    load = load_of(args)
    tool = TOOLS[args.tool](out, args.gen_cpu)
    if isinstance(tool, CountsTool):
        tool.calls, tool.opcodes = args.calls, args.opcodes
    if isinstance(tool, SchedTool):
        tool.server_cpu = args.server_cpu
    plan = Plan(
        [load.scenario],
        1,
        0,
        [],
        args.server_cpu,
        args.gen_cpu,
        out,
        keep_logs=True,
        quick=True,
        realtime=False,
    )
    ready_s = VALGRIND_READY_S if args.tool == "callgrind" else 30.0
    with relayd_under(
        tool, plan, not args.no_log, ready_s, pings=args.pings, name=args.server
    ) as server:
        cell = run_cell(plan, server, load.scenario, 0, hooks=tool)
    if cell.error is not None:
        raise RuntimeError(f"the load failed: {cell.error}")
    operations = load.operations(cell)
    if operations <= 0:
        raise RuntimeError(f"no {load.op} in the measured window: {cell.result}")
    result = cell.result or {}
    shown = ("achieved_rate", "opens_per_s", "p50_us", "p99_us", "lost", "gen_cpu")
    return {
        "tool": args.tool,
        "server": args.server,
        "op": load.op,
        # relayd's settings; a peer has neither.
        "log_messages": not args.no_log if args.server == "relayd" else None,
        "pings": args.pings if args.server == "relayd" else None,
        "load": load.params,
        "operations": operations,
        "generator": {k: result[k] for k in shown if k in result},
        "server_cpu_share": cell.server_cpu,
        "others_on_server_core": cell.others_on_server_core,
        "proc_cpu_us_per_op": result.get("server_us_per_msg", result.get("server_us_per_conn")),
        **tool.figures(operations),
    }


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="bench/profile_relayd.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (or docs/benchmarks.md) for what each tool measures.",
    )
    p.add_argument("tool", choices=sorted(TOOLS))
    p.add_argument(
        "--op", choices=("message", "handshake", "fanin", "throughput"), default="message"
    )
    p.add_argument("--size", type=int, default=32, help="message body bytes (default 32)")
    p.add_argument(
        "--pairs",
        type=int,
        help="connection pairs (default 500; callgrind and --opcodes 50; --op throughput 10)",
    )
    p.add_argument(
        "--rate",
        type=int,
        help="messages/s in all (default 500; 200 for strace and counts; 20 for callgrind and"
        " --opcodes)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="handshakes in progress at once, for --op handshake (default 1: each alone)",
    )
    p.add_argument("--duration", type=float, help="seconds measured (default 10; callgrind 30)")
    p.add_argument(
        "--warmup",
        type=float,
        help="seconds of load before the window (default 2; callgrind and --opcodes 5):"
        " longer for node-ws under callgrind, whose compiler is still at work after 5 s",
    )
    p.add_argument("--calls", action="store_true", help="counts: also count Python calls")
    p.add_argument(
        "--opcodes",
        action="store_true",
        help="counts: also count the bytecodes executed, by place (relayd ~100 times slower)",
    )
    p.add_argument("--no-log", action="store_true", help="message logging off (log.messages = off)")
    p.add_argument(
        "--pings",
        action="store_true",
        help="keep the default keepalive (a ping every 30 s), which may fall in the window",
    )
    p.add_argument(
        "--server",
        choices=("relayd", *PROFILED_PEERS),
        default="relayd",
        help="what to profile: relayd (default), or a peer as bench/run.py runs it, with the"
        " cpu, strace or callgrind tool",
    )
    p.add_argument(
        "--server-cpu", type=int, default=1, help="the profiled server's core (default 1)"
    )
    p.add_argument("--gen-cpu", type=int, default=0, help="the generator's core (default 0)")
    p.add_argument("--out", type=Path, metavar="DIR", help="where profile.json goes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one profile and print its figures."""
    p = parser()
    args = p.parse_args(argv)
    if args.server != "relayd" and args.tool not in PEER_TOOLS:
        p.error(f"{args.tool} profiles relayd only; a peer takes {', '.join(PEER_TOOLS)}")
    if args.server != "relayd" and (args.no_log or args.pings):
        p.error("--no-log and --pings are relayd's settings; a peer has neither")
    need = NEEDS.get(args.tool)
    if (
        need is not None
        and shutil.which(need[0]) is None
        and shutil.which(_venv_tool(need[0])) is None
    ):
        p.error(f"{args.tool} needs {need[0]}: {need[1]}")
    began = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or BENCH / "results" / f"profile-{args.tool}-{began}"
    out.mkdir(parents=True, exist_ok=True)
    raise_fd_limit(2 * (args.pairs or 500) + 200)
    os.sched_setaffinity(0, {args.gen_cpu})
    measured_on = machine()  # relayd's commit and tree, versions, the load average
    found = profile(args, out)
    report(found, out, "bench/profile_relayd.py", argv, measured_on)
    return 0


def report(
    found: dict[str, Any],
    out: Path,
    script: str,
    argv: Sequence[str] | None,
    measured_on: dict[str, Any],
) -> None:
    """Add the command and the machine to ``found``; write it to OUT/profile.json and print it."""
    typed = sys.argv[1:] if argv is None else list(argv)
    found["command"] = shlex.join([".venv/bin/python", script, *typed])
    found["machine"] = measured_on | {"loadavg_end": machine()["loadavg_start"]}
    (out / "profile.json").write_text(json.dumps(found, indent=1) + "\n")
    print(json.dumps(found, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())

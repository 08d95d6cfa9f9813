"""Where a cross-node message's work goes: two relayd nodes and one Redis, counted.

Usage (from the repository root)::

    .venv/bin/python bench/profile_cluster.py TOOL [--mode latency|throughput] [--rate N]
                                      [--pairs N] [--duration S] [--calls] [--opcodes]

It starts a ``redis-server`` (free loopback port) and two relayd nodes with ``[cluster]``
on, as ``bench/cluster.py`` does, runs ``bench/loadgen.mjs`` across them (``port2``), and
prints figures per message, for each node and for both together:

* ``--mode latency`` (the default): open loop, ``--pairs`` pairs (10), ``--rate``
  messages/s in all (100: each message crosses alone), every pair split across the nodes,
  alternating direction, so each node is the sender's node for half the messages and the
  holder's for the other half;
* ``--mode throughput``: closed loop, 10 pairs x 32 B, senders on node 1, receivers on
  node 2 (``bench/cluster.py``'s ``cross/throughput``).

Tools (each load-independent but ``cpu``):

* ``counts``: both nodes run as ``bench/counted_relayd.py``: trio scheduling rounds, task
  steps by task, tasks spawned, garbage collections and their pauses; ``--calls`` Python
  calls by place instead, ``--opcodes`` bytecodes by place;
* ``strace``: system calls by name (``strace -c -f`` attached to each node for the
  window);
* ``cpu``: each node's and Redis's CPU time per message (``/proc``): say how busy the
  machine was when quoting it.

Everything also goes to ``OUT/profile.json`` (``--out``, default
``bench/results/profile-cluster-<tool>-<UTC time>/``).

Resource handling: Redis, the nodes, the generator and strace are this script's children,
each stopped by its pid (SIGINT for strace, which then writes its summary; SIGTERM then
SIGKILL for the others); every wait has a deadline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

from cluster import BENCH, Cell, measure, relayd_node
from profile_relayd import parse_strace_summary, report
from run import machine

from tests.redis_server import RedisServer  # on sys.path: cluster.py put the repository there

#: Seconds a tool gets to write its output after SIGINT, relayd to write its counts.
TOOL_STOP_S: Final = 60.0


def cell(args: argparse.Namespace) -> Cell:
    """The generator's load, as a cell of bench/cluster.py (across the nodes)."""
    timing = {"warmup_s": args.warmup, "duration_s": args.duration}
    sizes = {"pairs": args.pairs, "size": args.size}
    if args.mode == "throughput":
        return Cell("profile/throughput", "throughput", {**sizes, "window": 128, **timing}, True)
    paced = {"rate": args.rate, "concurrency": 10, "settle_s": 2.0, "drain_s": 30.0}
    return Cell("profile/latency", "latency", {**sizes, **paced, "close_s": 30.0, **timing}, True)


class Hooks:
    """What the tool does at the edges of the measured window, to both nodes.

    Resource handling: strace runs as a child per node, from :meth:`started` to
    :meth:`ended` (SIGINT, then SIGKILL after :data:`TOOL_STOP_S`).
    """

    def __init__(self, tool: str, pids: dict[str, int], out: Path) -> None:
        self.tool = tool
        self.nodes = {name: pid for name, pid in pids.items() if name.startswith("node")}
        self.out = out
        self.tracers: list[subprocess.Popen[bytes]] = []

    def started(self) -> None:
        """Start counting (SIGUSR1 to the counted nodes), or attach strace."""
        for name, pid in self.nodes.items():
            if self.tool == "counts":
                os.kill(pid, signal.SIGUSR1)
            elif self.tool == "strace":
                argv = ["strace", "-f", "-c", "-U", "name,calls,errors"]
                argv += ["-o", str(self.out / f"strace-{name}.txt"), "-p", str(pid)]
                self.tracers.append(subprocess.Popen(argv, stderr=subprocess.DEVNULL))

    def ended(self) -> None:
        """Stop counting (SIGUSR2: each node writes its counts), or detach strace."""
        if self.tool == "counts":
            for pid in self.nodes.values():
                os.kill(pid, signal.SIGUSR2)
        for tracer in self.tracers:
            tracer.send_signal(signal.SIGINT)
        for tracer in self.tracers:
            try:
                tracer.wait(TOOL_STOP_S)
            except subprocess.TimeoutExpired:
                tracer.kill()
                tracer.wait()


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One profile; what it found."""
    counted = args.tool == "counts"
    env: dict[str, str] = {}
    if args.no_log:
        env["RELAYD_LOG__MESSAGES"] = "off"
    if args.calls:
        env["BENCH_COUNTS_CALLS"] = "1"
    if args.opcodes:
        env["BENCH_COUNTS_OPCODES"] = "1"
    load = cell(args)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="relayd-redis-") as directory:
        redis = RedisServer(Path(directory))
        redis.start()
        stack.callback(redis.stop)
        pids = {"redis": redis.pid}
        ports = []
        for number in (1, 2):
            name = f"node{number}"
            command: list[str] = []
            node_env = dict(env)
            if counted:
                command = [sys.executable, str(BENCH / "counted_relayd.py")]
                node_env["BENCH_COUNTS_OUT"] = str(out / f"counts-{name}.json")
            pid, port = relayd_node(
                stack, redis, f"n{number}", out / f"{name}.log", command=command, extra_env=node_env
            )
            pids[name] = pid
            ports.append(port)
        result = measure(load, (ports[0], ports[1]), pids, Hooks(args.tool, pids, out))
    messages = int(result.get("sent") or result.get("received") or 0)
    if messages <= 0:
        raise RuntimeError(f"no message in the measured window: {result}")
    shown: tuple[str, ...] = ("msgs_per_s", "achieved_rate", "p50_us", "p99_us", "p999_us")
    shown += ("max_us", "lost")
    shown += ("errors", "error_kinds", "gen_cpu", "send_lag_p99_us")
    found: dict[str, Any] = {
        "tool": args.tool,
        "load": load.config,
        "messages": messages,
        "generator": {k: result[k] for k in shown if k in result},
        "cpu_share": result["cpu"],
        "cpu_us_per_message": {
            k: round(share * result["wall_s"] * 1e6 / messages, 1)
            for k, share in result["cpu"].items()
        },
    }
    if counted:
        found |= counts(out, messages)
    if args.tool == "strace":
        found |= syscalls(out, messages)
    return found


def _per(value: float, messages: int) -> float:
    return round(value / messages, 3)


def counts(out: Path, messages: int) -> dict[str, Any]:
    """Per message: rounds, task steps (by task), spawns, collections; for each node and both."""
    per_node: dict[str, Any] = {}
    total_steps = total_rounds = 0.0
    for name in ("node1", "node2"):
        path = out / f"counts-{name}.json"
        deadline = time.monotonic() + TOOL_STOP_S
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # written by the node's signal handler, at its next bytecode
        found = json.loads(path.read_text())
        node: dict[str, Any] = {
            "gc": found["gc"],
            "gc_tracked_objects": found["gc_tracked_objects"],
        }
        if found["task_steps"]:
            steps = found["task_steps"]
            node |= {
                "rounds": _per(found["rounds"], messages),
                "blocking_rounds": _per(found["blocking_rounds"], messages),
                "task_steps": _per(sum(steps.values()), messages),
                "task_steps_by_task": {k: _per(v, messages) for k, v in steps.items()},
                "tasks_spawned_by_task": {
                    k: _per(v, messages) for k, v in found["tasks_spawned"].items()
                },
            }
            total_steps += sum(steps.values())
            total_rounds += found["rounds"]
        for key in ("calls", "opcodes"):
            if key in found:
                node[f"{key}_per_message"] = _per(found[key]["total"], messages)
                node[f"{key}_by_place"] = {
                    k: _per(v, messages) for k, v in found[key]["by_place"].items()
                }
                node[f"{key}_top_functions"] = {
                    k: _per(v, messages) for k, v in found[key]["top_functions"].items()
                }
        per_node[name] = node
    both = {"task_steps": _per(total_steps, messages), "rounds": _per(total_rounds, messages)}
    return {"nodes": per_node, "both_nodes": both}


def syscalls(out: Path, messages: int) -> dict[str, Any]:
    """Per message: system calls by name, for each node and both."""
    per_node: dict[str, Any] = {}
    total = 0
    for name in ("node1", "node2"):
        calls, errors = parse_strace_summary((out / f"strace-{name}.txt").read_text())
        total += sum(calls.values())
        per_node[name] = {
            "syscalls": _per(sum(calls.values()), messages),
            "by_name": {
                k: _per(v, messages) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])
            },
            "failed_by_name": {k: _per(v, messages) for k, v in errors.items()},
        }
    return {"nodes": per_node, "both_nodes": {"syscalls": _per(total, messages)}}


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="bench/profile_cluster.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("tool", choices=("counts", "strace", "cpu"))
    p.add_argument("--mode", choices=("latency", "throughput"), default="latency")
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--rate", type=int, default=100, help="latency mode: messages/s in all")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--calls", action="store_true", help="counts: Python calls by place")
    p.add_argument("--opcodes", action="store_true", help="counts: bytecodes by place")
    p.add_argument("--no-log", action="store_true", help="log.messages = off")
    p.add_argument("--out", type=Path, metavar="DIR")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one profile and print its figures."""
    args = parser().parse_args(argv)
    began = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or BENCH / "results" / f"profile-cluster-{args.tool}-{began}"
    out.mkdir(parents=True, exist_ok=True)
    measured_on = machine()
    report(run(args, out), out, "bench/profile_cluster.py", argv, measured_on)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""relayd's cluster benchmark: two nodes and one Redis, beside the Node peer cluster, one run.

Usage (from the repository root, after ``./dev test`` has installed redis-server, the
cluster extra and ``bench/node_modules``)::

    .venv/bin/python bench/cluster.py              # 3 rounds of every cell, about 2 minutes
    .venv/bin/python bench/cluster.py --quick      # one short round, about 20 s

Clusters, each started afresh per cell on loopback with its own ``redis-server`` (free
port, persistence off):

* ``relayd``: two relayd nodes (``bench/relayd-bench.toml``, ``[cluster]`` on, message
  logging on as by default, stdout to a file);
* ``node-ws-redis``: two ``bench/peers/ws_redis_relay.mjs`` nodes (Node ``ws`` and ioredis,
  a channel per id: the way a Node shop scales the seed);
* for the same-node cells, ``relayd`` alone with ``[cluster]`` off, as the reference.

Cells (the issue's targets in brackets):

* ``cross/throughput``: 10 pairs x 32 B, every sender on node 1 and its receiver on node 2,
  closed loop (``bench/loadgen.mjs`` with ``port2``) [relayd >= 0.5x the Node
  cluster];
* ``cross/latency``: 10 pairs, 2,000 messages/s across the nodes, open loop [relayd's p99
  <= 2x the Node cluster's];
* ``same/throughput``: 10 pairs x 32 B on one node, cluster on and off [on >= 0.9x off];
* ``idle``: 5,000 idle connections on one node, cluster on and off: the node's RSS growth
  per connection, its id's subscription included [cluster on <= 12 KiB].

For every cell: messages/s or latency percentiles, and the CPU of each node and of Redis
over the measured window as a share of one core (``/proc/<pid>/stat``). Rounds are
interleaved (every cell of every cluster, then the next round) and the tables give medians.
Nothing is pinned: four processes share the machine's cores, as they would in production.
Output: ``OUT/result.json`` and ``OUT/report.md`` (also printed); ``OUT`` is
``bench/results/cluster-<UTC time>/`` unless ``--out`` says otherwise.

Resource handling: every process started here is a child, stopped by its pid (SIGTERM,
then SIGKILL after a grace period); every wait has a deadline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

BENCH: Final = Path(__file__).resolve().parent
ROOT: Final = BENCH.parent
sys.path.insert(0, str(ROOT))

from run import WindowHooks  # noqa: E402

from tests.redis_server import RedisServer  # noqa: E402

LOADGEN: Final = BENCH / "loadgen.mjs"
NODE_PEER: Final = BENCH / "peers" / "ws_redis_relay.mjs"
RELAYD_CONFIG: Final = BENCH / "relayd-bench.toml"
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 15.0


@dataclass(frozen=True)
class Cell:
    """One measurement: a scenario on a cluster."""

    name: str
    mode: str
    config: dict[str, Any]
    cross: bool  # receivers on node 2 (else both ends on node 1)


#: Local addresses the generator connects from (limits.max_connections_per_ip is 256).
SOURCES: Final = [f"127.0.0.{i}" for i in range(2, 252)]
#: Seconds after the generator reports its idle connections open before RSS is read.
IDLE_SETTLE_S: Final = 1.0


def cells(quick: bool) -> list[Cell]:
    """The cells of a run."""
    timing = {"warmup_s": 0.3, "duration_s": 1.0} if quick else {"warmup_s": 0.5, "duration_s": 3.0}
    throughput = {"pairs": 10, "size": 32, "window": 128, **timing}
    return [
        Cell("cross/throughput", "throughput", throughput, cross=True),
        Cell("cross/latency", "latency", {"pairs": 10, "size": 32, "rate": 2000, **timing}, True),
        Cell("same/throughput", "throughput", throughput, cross=False),
        Cell("idle", "idle", {"count": 1000 if quick else 5000, "concurrency": 100}, False),
    ]


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _ready_port(proc: subprocess.Popen[str], what: str) -> int:
    """Read stdout lines until ``server.ready``; its port."""
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "server.ready":
            return int(event["port"])
    raise RuntimeError(f"{what} exited before it was ready")


@contextmanager
def child(
    argv: list[str], what: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """A child process, stopped by its pid when the block ends."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        if proc.stdout is not None:
            proc.stdout.close()


def relayd_node(
    stack: ExitStack,
    redis: RedisServer | None,
    name: str,
    log: Path,
    *,
    command: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
) -> tuple[int, int]:
    """Start a relayd node (cluster off without ``redis``); (pid, port).

    ``command`` replaces ``.venv/bin/relayd`` (bench/profile_cluster.py runs the counted
    relayd), ``extra_env`` is added to its environment.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_") and k != "PORT"}
    env |= extra_env or {}
    if redis is not None:
        env |= {
            "RELAYD_CLUSTER__ENABLED": "true",
            "RELAYD_CLUSTER__BROKER_URL": redis.url,
            "RELAYD_CLUSTER__NODE_NAME": name,
        }
    argv = [
        *(command or [str(ROOT / ".venv" / "bin" / "relayd")]),
        "--config", str(RELAYD_CONFIG), "--host", "127.0.0.1", "--port", "0",
    ]  # fmt: skip
    drains: list[subprocess.Popen[bytes]] = []
    # Registered before the node: the stack unwinds last in, first out, so the node is
    # stopped first and its log drain then sees the end of its output.
    stack.callback(lambda: [drain.wait(STOP_TIMEOUT_S) for drain in drains])
    proc = stack.enter_context(child(argv, f"relayd {name}", env))
    # Ready once serving; with the cluster on, once its link is up too (broker.connected).
    assert proc.stdout is not None
    # A cluster node logs broker.connected before server.ready (it says it is ready once
    # its first connection to Redis is up), a node on its own only server.ready.
    port = 0
    connected = redis is None
    for line in proc.stdout:
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "server.ready":
            port = int(event["port"])
        connected = connected or event.get("event") == "broker.connected"
        if port and connected:
            break
    if not port:
        raise RuntimeError(f"relayd {name} did not become ready")
    # Its log lines from here on go nowhere but the pipe: drain it in the background.
    drains.append(subprocess.Popen(["cat"], stdin=proc.stdout, stdout=log.open("ab")))
    return proc.pid, port


def node_peer(stack: ExitStack, redis: RedisServer) -> tuple[int, int]:
    """Start a Node peer node; (pid, port)."""
    proc = stack.enter_context(
        child(["node", str(NODE_PEER), "0", "127.0.0.1", redis.url], "node peer")
    )
    return proc.pid, _ready_port(proc, "the node peer")


def rss_kib(pid: int) -> int:
    """The resident set of ``pid``, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure(
    cell: Cell, ports: tuple[int, int], pids: dict[str, int], hooks: WindowHooks | None = None
) -> dict[str, Any]:
    """Run the generator for ``cell``; its result and each process's CPU share.

    ``hooks`` (bench/profile_cluster.py's profilers) are called as the measured window
    opens and closes.
    """
    config = {
        "mode": cell.mode,
        "host": "127.0.0.1",
        "port": ports[0],
        "port2": ports[1] if cell.cross else ports[0],
        "sources": SOURCES,
        "deadline_s": 120,
        "hold_s": 60,
        **cell.config,
    }
    proc = subprocess.Popen(
        ["node", str(LOADGEN), json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    rss_before = rss_kib(pids["node1"])
    start: dict[str, float] = {}
    cpu: dict[str, float] = {}
    result: dict[str, Any] = {}
    idle: dict[str, Any] = {}
    t0 = 0.0
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "measure.start":
            start = {name: cpu_s(pid) for name, pid in pids.items()}
            t0 = _now()
            if hooks is not None:
                hooks.started()
        elif event["event"] == "measure.end":
            if hooks is not None:
                hooks.ended()
            wall = _now() - t0
            cpu = {name: round((cpu_s(pid) - start[name]) / wall, 3) for name, pid in pids.items()}
        elif event["event"] == "held":
            time.sleep(IDLE_SETTLE_S)  # let the allocator settle, as bench/run.py does
            held = int(event["open"])
            grown = rss_kib(pids["node1"]) - rss_before
            idle = {"held": held, "rss_delta_kib": grown, "bytes_per_conn": grown * 1024 / held}
            assert proc.stdin is not None
            proc.stdin.write("release\n")
            proc.stdin.flush()
        elif event["event"] == "result":
            result = event
        elif event["event"] == "error":
            raise RuntimeError(f"loadgen: {event['detail']}")
    proc.wait(60)
    result["cpu"] = cpu
    return result | idle


def _now() -> float:
    return datetime.datetime.now().timestamp()


@dataclass
class Results:
    """Every measurement, by cluster and cell."""

    runs: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    def add(self, cluster: str, cell: str, result: dict[str, Any]) -> None:
        """Keep one measurement."""
        self.runs.setdefault(cluster, {}).setdefault(cell, []).append(result)

    def median(self, cluster: str, cell: str, key: str) -> float | None:
        """The median of ``key`` over the rounds, or None if never measured."""
        values = [
            r[key] for r in self.runs.get(cluster, {}).get(cell, []) if r.get(key) is not None
        ]
        return statistics.median(values) if values else None

    def cpu(self, cluster: str, cell: str) -> dict[str, float]:
        """The median CPU share of each process."""
        runs = self.runs.get(cluster, {}).get(cell, [])
        names = {name for r in runs for name in r.get("cpu", {})}
        return {
            n: statistics.median(r["cpu"][n] for r in runs if n in r["cpu"]) for n in sorted(names)
        }


def run_round(results: Results, quick: bool, logs: Path) -> None:
    """Every cell of every cluster once."""
    for cell in cells(quick):
        clusters = ["relayd", "node-ws-redis"] + (["relayd-cluster-off"] if not cell.cross else [])
        if cell.mode == "idle":
            clusters = ["relayd", "relayd-cluster-off"]
        for cluster in clusters:
            with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="relayd-redis-") as d:
                redis = None
                pids: dict[str, int] = {}
                if cluster != "relayd-cluster-off":
                    redis = RedisServer(Path(d))
                    redis.start()
                    stack.callback(redis.stop)
                    pids["redis"] = redis.pid
                ports = []
                for number in (1, 2) if redis is not None else (1,):
                    if cluster == "node-ws-redis":
                        assert redis is not None
                        pid, port = node_peer(stack, redis)
                    else:
                        pid, port = relayd_node(stack, redis, f"n{number}", logs / f"{cluster}.log")
                    pids[f"node{number}"] = pid
                    ports.append(port)
                if len(ports) == 1:
                    ports.append(ports[0])
                result = measure(cell, (ports[0], ports[1]), pids)
                results.add(cluster, cell.name, result)
                print(f"{cell.name:18} {cluster:20} {_summary(result)}", flush=True)


def _summary(result: dict[str, Any]) -> str:
    if "bytes_per_conn" in result:
        return f"{result['held']} held, {result['bytes_per_conn'] / 1024:.1f} KiB each"
    if "p99_us" in result:
        text = (
            f"p50 {result['p50_us']:.0f} us, p99 {result['p99_us']:.0f} us, lost {result['lost']}"
        )
    else:
        text = (
            f"{result['msgs_per_s']:,.0f} msg/s, errors {result['errors']}, lost {result['lost']}"
        )
    return f"{text}; cpu {result['cpu']}"


def _figure(value: float | None, show: Callable[[float], str]) -> str:
    """``show(value)``, or "not measured" for a cell no round measured."""
    return "not measured" if value is None else show(value)


def report(results: Results) -> str:
    """The tables of docs/benchmarks.md's cluster section."""
    lines = ["| cell | cluster | result | CPU (share of a core) |", "|---|---|---|---|"]
    for cell in cells(False):
        for cluster in ("relayd", "node-ws-redis", "relayd-cluster-off"):
            if cell.name not in results.runs.get(cluster, {}):
                continue
            if cell.mode == "idle":
                per = results.median(cluster, cell.name, "bytes_per_conn")
                value = _figure(per, lambda v: f"{v / 1024:.1f} KiB per idle connection")
            elif cell.mode == "latency":
                p50 = results.median(cluster, cell.name, "p50_us")
                p99 = results.median(cluster, cell.name, "p99_us")
                value = (
                    "not measured"
                    if p50 is None or p99 is None
                    else f"p50 {p50:,.0f} µs, p99 {p99:,.0f} µs"
                )
            else:
                rate = results.median(cluster, cell.name, "msgs_per_s")
                value = _figure(rate, lambda v: f"{v:,.0f} msg/s")
            cpu = ", ".join(f"{n} {v:.2f}" for n, v in results.cpu(cluster, cell.name).items())
            lines.append(f"| {cell.name} | {cluster} | {value} | {cpu} |")
    ratios = []
    cross = results.median("relayd", "cross/throughput", "msgs_per_s")
    peer = results.median("node-ws-redis", "cross/throughput", "msgs_per_s")
    if cross and peer:
        ratios.append(
            f"cross-node throughput, relayd / Node cluster: {cross / peer:.2f} (target >= 0.5)"
        )
    p99 = results.median("relayd", "cross/latency", "p99_us")
    peer_p99 = results.median("node-ws-redis", "cross/latency", "p99_us")
    if p99 and peer_p99:
        ratios.append(
            f"cross-node p99 at 2,000/s, relayd / Node cluster: {p99 / peer_p99:.2f} (target <= 2)"
        )
    on = results.median("relayd", "same/throughput", "msgs_per_s")
    off = results.median("relayd-cluster-off", "same/throughput", "msgs_per_s")
    if on and off:
        ratios.append(f"same-node throughput, cluster on / off: {on / off:.2f} (target >= 0.9)")
    idle = results.median("relayd", "idle", "bytes_per_conn")
    if idle:
        ratios.append(f"idle connection, cluster on: {idle / 1024:.1f} KiB (target <= 12 KiB)")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {r}" for r in ratios) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every cell produced a result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or BENCH / "results" / f"cluster-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    results = Results()
    for _ in range(1 if args.quick else args.rounds):
        run_round(results, args.quick, out)
    text = report(results)
    (out / "result.json").write_text(json.dumps(results.runs, indent=2))
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""relayd's benchmark: relayd and peer relays side by side, one load generator, one command.

Usage (from the repository root, after ``npm ci --prefix bench``, which ``./dev test`` runs)::

    .venv/bin/python bench/run.py              # the full run, about 40 minutes
    .venv/bin/python bench/run.py --quick      # a smoke run of about 30 s
    .venv/bin/python bench/run.py --dry-run    # print the full run's plan, run nothing

``tests/test_bench_smoke.py`` runs ``--quick`` in the test suite so the bench cannot rot.

Every server speaks the seed dialect and serves the same load from ``bench/loadgen.mjs``.
The server under test is pinned to one core and the generator (and this script) to the
other with ``taskset``; rounds are interleaved (every scenario against every server, then
the next round, the server order rotating each round) and the tables report medians over
rounds, with each server's ratio to node-ws measured in the same run.

Scenarios (docs/benchmarks.md, "What the bench measures"): closed-loop throughput and
fan-in; open-loop "one message at a time" loads, few pairs (latency) and thousands of
connections (chat), with the server's CPU per message; connections per second, each a
whole life from handshake to welcome to close; idle connections' memory. The chat
scenarios run against relayd, relayd-nolog, node-ws and trio-floor only
(:data:`CHAT_SERVERS`).

Servers:

* ``relayd``: relayd with ``bench/relayd-bench.toml`` (its defaults except the limits that
  would throttle the load), ``log.messages`` on and stdout to a file;
* ``relayd-refusals``, ``relayd-sampled``, ``relayd-nolog``: the same with
  ``RELAYD_LOG__MESSAGES`` set to ``refusals`` (a line per message not delivered: none
  under this load), ``sampled`` (every refusal and 1% of deliveries, the default
  ``log.messages_sample``) and ``off``: what each of the operator's log volumes costs;
* ``node-ws``, ``websockets-asyncio``, ``websockets-trio``, ``trio-websocket``: the peers in
  ``bench/peers/``;
* ``trio-floor``: the least a relay on trio can do for this traffic
  (``bench/peers/trio_floor_relay.py``: no limits, logs or router), so that relayd's
  ratio to node-ws splits into trio's and CPython's floor and relayd's own part.

Idle scenarios need one file descriptor per connection in the server and in the generator.
The open-file limit (RLIMIT_NOFILE) is raised as far as this process may; an idle count it
cannot reach is not run, the report says why, and the largest count the limit allows (in
thousands) is measured instead: with a hard limit of 20,000 and no CAP_SYS_RESOURCE to
raise it, 50,000 becomes 19,000.

Output: ``OUT/result.json`` (every run of every cell, the medians, the targets), and
``OUT/report.md`` (the tables of docs/benchmarks.md), also printed. ``OUT`` is
``bench/results/<UTC time>/`` unless ``--out`` says otherwise. The exit status is 0 if
every cell produced a result, 1 if any failed, 2 for a bad command line.

Resource handling: every process this script starts is its own child, pinned with
``taskset``, and stopped by its pid (SIGTERM, then SIGKILL after a grace period); each
generator run and each wait has a deadline, so a stuck server fails its cell, not the run.
SIGTERM or SIGINT to this script stops the generator and the servers it started, then exits.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import queue
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from report import Cell, Scenario, bytes_per_connection, render, summarize

BENCH: Final = Path(__file__).resolve().parent
ROOT: Final = BENCH.parent
LOADGEN: Final = BENCH / "loadgen.mjs"
PEERS: Final = BENCH / "peers"
RELAYD_CONFIG: Final = BENCH / "relayd-bench.toml"
WS_MODULE: Final = BENCH / "node_modules" / "ws" / "package.json"

#: Seconds a server gets to print server.ready, and to exit after SIGTERM before SIGKILL.
READY_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 15.0
#: Seconds between looks at a server's log file while waiting for server.ready.
READY_POLL_S: Final = 0.02
#: Seconds after the generator reports its idle connections open before RSS is read, so
#: every connection has finished its handshake-time allocations and log lines (--quick:
#: QUICK_IDLE_SETTLE_S; its idle count is too small for a per-connection figure anyway).
IDLE_SETTLE_S: Final = 1.0
QUICK_IDLE_SETTLE_S: Final = 0.25
#: --quick's windows: open until this many messages (connection cycles) have completed in
#: them, for at most QUICK_MAX_WINDOW_S; then up to QUICK_DRAIN_S for the messages still in
#: flight (quick_scenarios says why).
QUICK_MIN_COUNT: Final = 50
QUICK_MAX_WINDOW_S: Final = 30.0
QUICK_DRAIN_S: Final = 30.0
#: File descriptors kept free beyond the connections themselves (listeners, logs, pipes).
FD_MARGIN: Final = 200
#: Loopback source addresses the generator connects from, round-robin: 250 addresses keep
#: every one under relayd's default max_connections_per_ip (256) up to 64,000 connections,
#: and give each its own range of ephemeral ports.
SOURCES: Final = [f"127.0.0.{i}" for i in range(2, 252)]
#: A cell whose server core was more than this busy with other processes during the
#: measured window is run once more (the machine is shared); the quieter run is kept.
NOISY_SHARE: Final = 0.15
#: SCHED_FIFO priority of servers and generator with --realtime.
RT_PRIORITY: Final = 10
#: Connections of the chat scenarios (in pairs): issue 13 asks for at least 5,000.
CHAT_CONNECTIONS: Final = 5000
#: The chat scenarios' rates, messages/s in all (issue 13 asks for 2,000 and 10,000).
CHAT_RATES: Final = (2000, 10000)
#: The servers the chat scenarios run against: issue 13's targets compare relayd with node-ws;
#: trio-floor shows how much of the difference trio and CPython leave to relayd.
#: The Python libraries' peers are left out: they cannot carry 10,000 lone messages a
#: second (at 10 pairs their p99 is already 0.26-1.7 s) and each cell opens thousands of
#: connections.
CHAT_SERVERS: Final = ("relayd", "relayd-nolog", "node-ws", "trio-floor")
#: Handshakes the generator keeps in progress while it opens many connections.
OPEN_CONCURRENCY: Final = 200
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
PAGE_KIB: Final = os.sysconf("SC_PAGE_SIZE") // 1024


# -- servers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server: argv after ``taskset``, extra environment, availability."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    missing: str | None = None  # why it cannot run here, or None


def server_specs() -> list[ServerSpec]:
    """Every server the bench knows, relayd first."""
    py = sys.executable
    relayd: tuple[str, ...] = (py, "-m", "relayd", "--config", str(RELAYD_CONFIG))
    relayd += ("--host", "127.0.0.1", "--port", "0")
    no_ws = None if WS_MODULE.exists() else "bench/node_modules missing: npm ci --prefix bench"
    no_node = None if shutil.which("node") else "node is not installed"
    return [
        ServerSpec("relayd", relayd),
        ServerSpec("relayd-refusals", relayd, (("RELAYD_LOG__MESSAGES", "refusals"),)),
        ServerSpec("relayd-sampled", relayd, (("RELAYD_LOG__MESSAGES", "sampled"),)),
        ServerSpec("relayd-nolog", relayd, (("RELAYD_LOG__MESSAGES", "off"),)),
        ServerSpec("node-ws", ("node", str(PEERS / "ws_relay.mjs")), missing=no_node or no_ws),
        ServerSpec("websockets-asyncio", (py, str(PEERS / "websockets_asyncio_relay.py"))),
        ServerSpec("websockets-trio", (py, str(PEERS / "websockets_trio_relay.py"))),
        ServerSpec("trio-websocket", (py, str(PEERS / "trio_websocket_relay.py"))),
        ServerSpec("trio-floor", (py, str(PEERS / "trio_floor_relay.py"), "--poller")),
    ]


def _server_env(spec: ServerSpec) -> dict[str, str]:
    # Nothing from the caller's environment may change a server's settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_") and k != "PORT"}
    env.update(spec.env)
    return env


class ServerProcess:
    """One running server, its stdout in a log file.

    Resource handling: :meth:`stop` sends SIGTERM to this pid, waits, then SIGKILLs it;
    use it as a context manager.
    """

    def __init__(self, spec: ServerSpec, cpu: int, log_path: Path, pin: Sequence[str]) -> None:
        self.spec = spec
        self.log_path = log_path
        self._log = log_path.open("wb")
        self._err_path = log_path.with_suffix(".err")
        self._err = self._err_path.open("wb")
        self.proc = subprocess.Popen(
            [*pin, *spec.argv],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._err,
            env=_server_env(spec),
            cwd=ROOT,
        )
        self.port = 0

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait for the server.ready line and learn the port; raise if it never comes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited {self.proc.returncode}: {self.tail()}")
            with self.log_path.open("rb") as f:
                for line in f:
                    if b'"server.ready"' in line:
                        self.port = int(json.loads(line)["port"])
                        return
            time.sleep(READY_POLL_S)
        raise RuntimeError(f"{self.spec.name} printed no server.ready: {self.tail()}")

    def tail(self) -> str:
        """The end of the server's stderr, for error messages."""
        return self._err_path.read_text(errors="replace")[-2000:]

    def cpu_times(self) -> tuple[float, float]:
        """CPU seconds the server has used so far, (user, system), all its threads."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server has used so far."""
        return sum(self.cpu_times())

    def rss_kib(self) -> int:
        """Resident set size in KiB."""
        fields = Path(f"/proc/{self.proc.pid}/statm").read_text().split()
        return int(fields[1]) * PAGE_KIB

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        self._log.close()
        self._err.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


# -- scenarios ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a run does: scenarios, rounds, servers, cores."""

    scenarios: list[Scenario]
    rounds: int
    idle_rounds: int
    servers: list[ServerSpec]
    server_cpu: int
    gen_cpu: int
    out: Path
    keep_logs: bool
    quick: bool
    realtime: bool
    skipped: dict[str, str] = field(default_factory=dict)
    idle_settle_s: float = IDLE_SETTLE_S

    def pin(self, cpu: int) -> list[str]:
        """The command prefix that pins a process to ``cpu`` (and gives it SCHED_FIFO)."""
        rt = ["chrt", "--fifo", str(RT_PRIORITY)] if self.realtime else []
        return ["taskset", "-c", str(cpu), *rt]


def full_scenarios(
    idle_counts: Sequence[int],
    fd_limit: int,
    fd_limit_why: str | None = None,
    chat_connections: int = CHAT_CONNECTIONS,
    chat_rates: Sequence[int] = CHAT_RATES,
) -> tuple[list[Scenario], dict[str, str]]:
    """The issue's scenarios; idle counts the fd limit cannot reach are replaced and noted.

    Args:
        idle_counts: the idle connection counts asked for.
        fd_limit: the open-file limit the servers and the generator will run with.
        fd_limit_why: why that limit cannot be raised further, for the report.
        chat_connections: connections of the chat scenarios (an even number).
        chat_rates: the chat scenarios' rates, one scenario each (``chat/RATE``).

    Returns:
        The scenarios, and for each idle count not run, its key and why. An unreachable
        count is replaced by the largest multiple of 1,000 the limit allows (the report
        names it as the stand-in).
    """
    timing = {"warmup_s": 0.5, "duration_s": 2.5}
    scenarios = [
        Scenario(
            f"throughput/{pairs}x{size}",
            "throughput",
            {"pairs": pairs, "size": size, "window": 128, **timing},
        )
        for size in (32, 4096)
        for pairs in (1, 10, 100)
    ]
    scenarios += [
        Scenario(f"latency/{rate}", "latency", {"pairs": 10, "size": 32, "rate": rate, **timing})
        for rate in (2000, 10000)
    ]
    # Long enough windows that /proc's 10 ms CPU ticks are a small error: at 2,000 msg/s a
    # server at 10 % of its core uses 100 ticks in 10 s. A server that falls behind gets up
    # to drain_s after the window to deliver its backlog (lost is what never arrives), and
    # close_s to close thousands of connections, so that it is idle when the next cell starts.
    chat: dict[str, float] = {"pairs": chat_connections // 2, "size": 32}
    chat |= {"concurrency": OPEN_CONCURRENCY, "warmup_s": 2.0}
    chat |= {"settle_s": 2.0, "drain_s": 60.0, "close_s": 30.0}
    # 10 s windows up to 2,000 msg/s, 6 s above: enough messages either way.
    scenarios += [
        Scenario(f"chat/{rate}", "chat",
                 {**chat, "rate": rate, "duration_s": 10.0 if rate <= 2000 else 6.0},
                 CHAT_SERVERS)
        for rate in chat_rates
    ]  # fmt: skip
    scenarios.append(
        Scenario("fanin/100x32", "fanin", {"senders": 100, "size": 32, "window": 128, **timing})
    )
    skipped: dict[str, str] = {}
    reachable = (fd_limit - FD_MARGIN) // 1000 * 1000
    for count in idle_counts:
        if count + FD_MARGIN > fd_limit:
            limit = f"the open-file limit (RLIMIT_NOFILE) here is {fd_limit:,}"
            skipped[f"idle/{count}"] = (
                f"needs {count:,} sockets in one server process (and as many in the"
                f" generator); {limit}{f' and {fd_limit_why}' if fd_limit_why else ''}"
            )
            count = reachable
        if count <= 0:
            continue
        scenario = Scenario(f"idle/{count}", "idle", {"count": count, "concurrency": 200})
        if scenario not in scenarios:
            scenarios.append(scenario)
    scenarios.append(Scenario("connrate", "connrate", {"concurrency": 32, **timing}))
    return scenarios, skipped


def quick_scenarios() -> list[Scenario]:
    """A run of seconds that still goes through every mode of the generator.

    It checks that every server answers every scenario, never how fast: on a busy machine
    (the test suite runs it beside other work) a server, or the generator, may not run at
    all for a window of 0.3 s. So each window stays open until :data:`QUICK_MIN_COUNT`
    operations have completed in it (:data:`QUICK_MAX_WINDOW_S` at most), and a message
    still in flight after it counts as lost only :data:`QUICK_DRAIN_S` later.
    """
    timing = {"warmup_s": 0.1, "duration_s": 0.3}
    counted = {**timing, "min_count": QUICK_MIN_COUNT, "max_duration_s": QUICK_MAX_WINDOW_S}
    closed = {"size": 32, "window": 16, "drain_s": QUICK_DRAIN_S, **counted}
    big = {**closed, "size": 4096, "window": 32}
    # Paced: drain_s bounds the wait for late deliveries, settle_s a gap without any.
    paced = {"size": 32, "drain_s": QUICK_DRAIN_S, "settle_s": QUICK_DRAIN_S, **counted}
    chat = {"pairs": 50, "rate": 500, "concurrency": 50, **paced}
    return [
        Scenario("throughput/1x32", "throughput", {"pairs": 1, **closed}),
        # More than one take of the writer (64 KiB) in flight to one receiver at a
        # time: what a write without a task must finish in more than one write.
        Scenario("throughput/1x4096", "throughput", {**big, "pairs": 1}),
        Scenario("latency/1000", "latency", {"pairs": 2, "rate": 1000, **paced}),
        Scenario("chat/500", "chat", chat, CHAT_SERVERS),
        Scenario("fanin/5x32", "fanin", {"senders": 5, **closed}),
        Scenario("idle/100", "idle", {"count": 100, "concurrency": 20}),
        Scenario("connrate", "connrate", {"concurrency": 4, **counted}),
    ]


# -- measuring one cell -------------------------------------------------------------------------


def _core_busy(cpu: int) -> tuple[float, float]:
    """(busy, total) seconds of one core since boot, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            ticks = [int(x) for x in line.split()[1:9]]
            idle = ticks[3] + ticks[4]
            return (sum(ticks) - idle) / CLK_TCK, sum(ticks) / CLK_TCK
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")


@dataclass
class Probe:
    """Server CPU, server-core load and server memory at one instant."""

    t: float
    server_cpu_s: float
    server_system_s: float
    core_busy_s: float
    rss_kib: int

    @classmethod
    def take(cls, server: ServerProcess, cpu: int) -> Probe:
        """Read the clocks now."""
        user, system = server.cpu_times()
        return cls(time.monotonic(), user + system, system, _core_busy(cpu)[0], server.rss_kib())


def connections_of(params: dict[str, Any]) -> int:
    """How many connections a scenario's generator opens at once."""
    if "count" in params:  # idle
        return int(params["count"])
    if "senders" in params:  # fan-in: the senders and one receiver
        return int(params["senders"]) + 1
    return 2 * int(params.get("pairs", 0)) or int(params.get("concurrency", 0))


def per_operation(
    kind: str, result: dict[str, Any], cpu_s: float, system_s: float
) -> dict[str, float]:
    """Server CPU per message (or per connection, for connrate) in µs, from the window's CPU.

    The messages are those sent in the window for the paced kinds (open loop: what was
    asked of the server) and those delivered in it for the closed-loop ones. The
    ``_system`` figure is the part of it spent in the kernel (system calls, and the
    loopback's TCP work they do), which a server's own code can change only by making
    fewer or cheaper calls.
    """
    count = {"chat": "sent", "latency": "sent", "connrate": "opened"}.get(kind, "received")
    done = result.get(count)
    if not isinstance(done, int | float) or done <= 0:
        return {}
    name = "server_us_per_conn" if kind == "connrate" else "server_us_per_msg"
    return {name: cpu_s / done * 1e6, f"{name}_system": system_s / done * 1e6}


class WindowHooks(Protocol):
    """What :func:`run_cell` calls at the edges of the generator's measured window."""

    def started(self) -> None:
        """The window has opened (after the server's CPU was read)."""

    def ended(self) -> None:
        """The window has closed (before the server's CPU is read)."""


def _reader(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_cell(
    plan: Plan,
    server: ServerProcess,
    scenario: Scenario,
    rnd: int,
    hooks: WindowHooks | None = None,
) -> Cell:
    """Run the generator once against ``server``; the cell's result, or its error.

    ``hooks`` (bench/profile_relayd.py's profilers) are called as the measured window opens
    and closes.
    """
    params = dict(scenario.params)
    # Handshakes of slow servers (200/s), the windows, and closing thousands of connections.
    budget = 60.0 + connections_of(params) / 200
    budget += sum(float(params.get(k, 0)) for k in ("warmup_s", "drain_s"))
    budget += max(float(params.get(k, 0)) for k in ("duration_s", "max_duration_s"))
    budget += float(params.get("close_s", 0))
    config = {
        "mode": scenario.kind,
        "host": "127.0.0.1",
        "port": server.port,
        "sources": SOURCES,
        "deadline_s": budget,
        "hold_s": 30.0,
        **params,
    }
    cell = Cell(scenario=scenario.key, server=server.spec.name, round=rnd)
    rss_before = server.rss_kib()
    start: Probe | None = None
    end: Probe | None = None
    proc = subprocess.Popen(
        [*plan.pin(plan.gen_cpu), "node", str(LOADGEN), json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + budget + 5
    result: dict[str, Any] | None = None
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                cell.error = f"generator silent past its {budget:.0f} s deadline"
                break
            if line is None:
                break
            event = json.loads(line)
            kind = event.get("event")
            if kind == "measure.start":
                start = Probe.take(server, plan.server_cpu)
                if hooks is not None:
                    hooks.started()
            elif kind == "measure.end":
                if hooks is not None:
                    hooks.ended()
                end = Probe.take(server, plan.server_cpu)
            elif kind == "held":
                time.sleep(plan.idle_settle_s)
                rss = server.rss_kib()
                opened = int(event["open"])
                cell.extra["rss_before_kib"] = rss_before
                cell.extra["rss_held_kib"] = rss
                cell.extra["rss_delta_kib"] = rss - rss_before
                # None where the growth is within RSS's own noise (report.RSS_NOISE_FLOOR_KIB).
                cell.extra["bytes_per_conn"] = bytes_per_connection(rss_before, rss, opened)
                proc.stdin.write("release\n")
                proc.stdin.flush()
            elif kind == "result":
                result = event
            elif kind == "error":
                cell.error = str(event.get("detail"))
    except BaseException:  # SIGTERM, ^C: the generator goes at once, not after a grace
        proc.kill()
        raise
    finally:
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if result is None and cell.error is None:
        assert proc.stderr is not None
        cell.error = f"generator exited {proc.returncode}: {proc.stderr.read()[-1000:]}"
    if start is not None and end is not None and end.t > start.t:
        wall = end.t - start.t
        cpu_s = end.server_cpu_s - start.server_cpu_s
        cell.server_cpu = cpu_s / wall
        cell.others_on_server_core = max(
            0.0, (end.core_busy_s - start.core_busy_s) / wall - cell.server_cpu
        )
        if result is not None:
            system_s = end.server_system_s - start.server_system_s
            cell.extra.update(per_operation(scenario.kind, result, cpu_s, system_s))
        if scenario.kind in ("chat", "latency"):
            cell.extra["rss_before_kib"] = rss_before
            cell.extra["rss_end_kib"] = end.rss_kib
    if result is not None:
        cell.result = {k: v for k, v in result.items() if k not in ("event", "mode")}
        cell.result.update(cell.extra)
    if server.proc.poll() is not None:
        cell.error = f"server exited {server.proc.returncode} during the cell: {server.tail()}"
    return cell


def run_cell_quietly(plan: Plan, server: ServerProcess, scenario: Scenario, rnd: int) -> Cell:
    """Run a cell; if other processes crowded the server's core, run it once more."""
    cell = run_cell(plan, server, scenario, rnd)
    if plan.quick or (cell.others_on_server_core or 0.0) <= NOISY_SHARE or cell.error:
        return cell
    again = run_cell(plan, server, scenario, rnd)
    again.retried = True
    if again.error is None and (again.others_on_server_core or 0.0) < (
        cell.others_on_server_core or 0.0
    ):
        return again
    cell.retried = True
    return cell


# -- the run --------------------------------------------------------------------------------------


@contextlib.contextmanager
def started(plan: Plan, specs: Sequence[ServerSpec], tag: str) -> Iterator[list[ServerProcess]]:
    """Start ``specs`` (at once: imports overlap), wait until all are ready, stop them after."""
    logs = plan.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    servers: list[ServerProcess] = []
    try:
        for spec in specs:
            log = logs / f"{spec.name}-{tag}.log"
            servers.append(ServerProcess(spec, plan.server_cpu, log, plan.pin(plan.server_cpu)))
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def rotated(items: Sequence[ServerSpec], by: int) -> list[ServerSpec]:
    """``items`` starting at position ``by``, so no server always runs first."""
    by %= max(1, len(items))
    return [*items[by:], *items[:by]]


def log_progress(cell: Cell) -> None:
    """One line per cell on stderr."""
    shown = cell.error or json.dumps(
        {k: round(v, 1) if isinstance(v, float) else v for k, v in cell.headline().items()}
    )
    print(f"  r{cell.round} {cell.scenario:<18} {cell.server:<19} {shown}", file=sys.stderr)


def execute(plan: Plan) -> list[Cell]:
    """Every round: the load scenarios on long-lived servers, idle ones on fresh servers."""
    cells: list[Cell] = []
    servers = [s for s in plan.servers if s.missing is None]
    load = [s for s in plan.scenarios if s.kind != "idle"]
    idle = [s for s in plan.scenarios if s.kind == "idle"]
    for rnd in range(plan.rounds):
        order = rotated(servers, rnd)
        print(f"round {rnd + 1}/{plan.rounds}: {', '.join(s.name for s in order)}", file=sys.stderr)
        with started(plan, order, f"r{rnd}") as running:
            for scenario in load:
                for server in running:
                    if scenario.runs_on(server.spec.name):
                        cells.append(run_cell_quietly(plan, server, scenario, rnd))
                        log_progress(cells[-1])
        if rnd >= plan.idle_rounds:
            continue
        for scenario in idle:
            # A fresh server per idle cell: memory freed by earlier load would otherwise be
            # reused and hide the cost of new connections. They start together (their
            # imports overlap) and wait with no connection; each stops right after its cell,
            # so none is closing thousands of connections while the next is measured.
            tag = f"r{rnd}-{scenario.key.replace('/', '-')}"
            with started(plan, order, tag) as fresh:
                for server in fresh:
                    cells.append(run_cell(plan, server, scenario, rnd))
                    server.stop()
                    log_progress(cells[-1])
    return cells


def scan_logs(plan: Plan) -> dict[str, Any]:
    """Size of relayd's log files, message.relay lines per file, error and warning events.

    Log files over 1 MiB are deleted afterwards unless --keep-logs.
    """
    info: dict[str, Any] = {
        "relayd_log_bytes": 0,
        "relayd_log_lines": 0,
        "error_events": [],
        "warning_events": {},
    }
    warnings: dict[str, int] = info["warning_events"]
    files: dict[str, dict[str, int]] = {}
    info["files"] = files
    for path in sorted((plan.out / "logs").glob("relayd*.log")):
        size = path.stat().st_size
        info["relayd_log_bytes"] += size
        mine = files[path.name] = {"bytes": size, "lines": 0, "message_relay_events": 0}
        with path.open("rb") as f:
            for line in f:
                info["relayd_log_lines"] += 1
                mine["lines"] += 1
                if b'"event":"message.relay"' in line:
                    mine["message_relay_events"] += 1
                if b'"level":"error"' in line and len(info["error_events"]) < 20:
                    info["error_events"].append(line.decode(errors="replace").strip()[:500])
                elif b'"level":"warning"' in line:
                    try:
                        name = str(json.loads(line).get("event"))
                    except ValueError:
                        name = "(not JSON)"
                    warnings[name] = warnings.get(name, 0) + 1
        if not plan.keep_logs and size > 1 << 20:
            path.unlink()
    return info


def _run(argv: Sequence[str], **kwargs: Any) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    except OSError as exc:
        return f"({exc})"
    return str(done.stdout).strip()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    lscpu = {
        k.strip(): v.strip()
        for k, _, v in (ln.partition(":") for ln in _run(["lscpu"]).splitlines())
    }
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    git = {"GIT_OPTIONAL_LOCKS": "0", **os.environ}  # read-only: never touch the index
    dirty = _run(["git", "status", "--porcelain", "--", "relayd"], cwd=ROOT, env=git)
    return {
        "cpu_model": lscpu.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "hypervisor": lscpu.get("Hypervisor vendor"),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        # The interpreter relayd and the Python peers ran on (a venv's python resolved to the
        # interpreter it links to): pyenv's 3.11.7 build ran relayd's lone message with 8%
        # more instructions than Debian's 3.11.2 (docs/benchmarks.md, "The interpreter").
        "python_executable": os.path.realpath(sys.executable),
        "node": _run(["node", "--version"]),
        "relayd_commit": _run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, env=git),
        "relayd_tree": "modified" if dirty else "clean",
        "packages": _versions(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for name in (
        "relayd",
        "trio",
        "trio-websocket",
        "wsproto",
        "websockets",
        "msgspec",
        "structlog",
    ):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    with contextlib.suppress(OSError, ValueError):
        found["ws (npm)"] = json.loads(WS_MODULE.read_text())["version"]
    return found


def realtime_allowed() -> bool:
    """Whether this process may start others as SCHED_FIFO (root or CAP_SYS_NICE)."""
    argv = ["chrt", "--fifo", str(RT_PRIORITY), "true"]
    try:
        return subprocess.run(argv, capture_output=True, check=False).returncode == 0
    except OSError:
        return False


#: Linux's capability number of CAP_SYS_RESOURCE, which raising a hard rlimit needs.
CAP_SYS_RESOURCE: Final = 24


def _has_capability(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def raise_fd_limit(wanted: int) -> tuple[int, str | None]:
    """Raise this process's (and so its children's) open-file limit for ``wanted`` fds.

    The soft limit goes to the hard one; the hard one is raised too where ``wanted`` needs
    it and this process may (CAP_SYS_RESOURCE, up to fs.nr_open).

    Args:
        wanted: file descriptors the largest scenario needs.

    Returns:
        The limit now in force, and why it could not be raised to ``wanted`` (None if it
        is at least ``wanted``).
    """
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = nr_open
    why: str | None = None
    if wanted > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        except (ValueError, OSError) as exc:
            if not _has_capability(CAP_SYS_RESOURCE):
                why = (
                    "cannot be raised: raising a hard limit needs CAP_SYS_RESOURCE,"
                    " which this process lacks"
                )
            elif wanted > nr_open:
                why = f"cannot be raised past fs.nr_open ({nr_open:,})"
            else:
                why = f"raising it failed ({exc})"
        else:
            return wanted, None
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(hard), why


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _idle_counts(text: str) -> list[int]:
    return [_count(c) for c in text.split(",") if c]


def _pairs_of_connections(text: str) -> int:
    value = _count(text)
    if value < 2 or value % 2:
        raise argparse.ArgumentTypeError(f"must be an even number of at least 2, not {value}")
    return value


def parser() -> argparse.ArgumentParser:
    """The command line, with every option, the servers and the scenarios in --help."""
    full, _ = full_scenarios([1000, 10000, 50000], 1 << 20)
    wrap = "\n    "
    epilog = (
        "The full run takes about 40 minutes and wants a quiet machine with two cores.\n\n"
        f"servers (--servers):{wrap}{', '.join(s.name for s in server_specs())}\n\n"
        f"scenarios of the full run (--scenarios takes keys or kinds; chat runs against"
        f" {', '.join(CHAT_SERVERS)} only):{wrap}"
        f"{wrap.join(s.key for s in full)}\n"
        f"  idle/N for each count of --idle that the open-file limit allows; a count it does"
        f" not is reported\n  as not measurable here and the largest count it allows is run"
        f" instead.\n\n"
        f"scenarios of --quick:{wrap}{wrap.join(s.key for s in quick_scenarios())}\n\n"
        "exit status: 0 if every cell produced a result, 1 if any failed, 2 for a bad command"
        " line."
    )
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description=__doc__.split("\n\n")[0],
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of about 30 s (tests/test_bench_smoke.py): small loads for 0.3 s"
        " each, 100 idle connections, one round, no SCHED_FIFO; --rounds, --idle-rounds and"
        " --idle are ignored",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (servers, scenarios, rounds, open-file limit, what cannot run"
        " here and why) and exit without starting anything",
    )
    p.add_argument(
        "--rounds",
        type=_count,
        default=3,
        help="interleaved rounds of every load scenario against every server (default 3)",
    )
    p.add_argument(
        "--idle-rounds",
        type=int,
        default=1,
        help="how many of those rounds also run the idle scenarios, each on a fresh server"
        " (default 1)",
    )
    p.add_argument(
        "--idle",
        type=_idle_counts,
        default=[1000, 10000, 50000],
        metavar="N,N,...",
        help="idle connection counts, comma-separated (default 1000,10000,50000)",
    )
    p.add_argument(
        "--chat-connections",
        type=_pairs_of_connections,
        default=CHAT_CONNECTIONS,
        metavar="N",
        help=f"connections of the chat scenarios, in pairs (default {CHAT_CONNECTIONS:,}); the"
        " server and the generator each need a file descriptor per connection",
    )
    p.add_argument(
        "--chat-rates",
        type=_idle_counts,
        default=list(CHAT_RATES),
        metavar="N,N,...",
        help="the chat scenarios' rates, messages/s, comma-separated (default"
        f" {','.join(map(str, CHAT_RATES))}): each is a scenario chat/N; issue 13's targets"
        " read chat/2000 and chat/10000",
    )
    p.add_argument(
        "--servers",
        metavar="NAME,...",
        help="comma-separated subset of the servers below (default: all)",
    )
    p.add_argument(
        "--scenarios",
        metavar="KEY|KIND,...",
        help="comma-separated scenario keys (throughput/10x32) or kinds (throughput, fanin,"
        " latency, idle, connrate) to run (default: all of the run)",
    )
    p.add_argument(
        "--server-cpu", type=int, default=1, help="core the servers are pinned to (default 1)"
    )
    p.add_argument(
        "--gen-cpu",
        type=int,
        default=0,
        help="core the generator and this script are pinned to (default 0)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where result.json, report.md and logs/ go (default bench/results/<UTC time>)",
    )
    p.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep relayd's log files over 1 MiB, which are otherwise deleted after the run",
    )
    p.add_argument(
        "--realtime",
        action="store_true",
        help="run the servers and the generator as SCHED_FIFO, where this process may (root or"
        " CAP_SYS_NICE). Off by default: all servers share one core, and under SCHED_FIFO one"
        " that stays busy after its cell starves the others (seen with node-ws); with normal"
        " scheduling that shows in the 'others' column and the cell is run again",
    )
    p.add_argument(
        "--no-realtime",
        dest="realtime",
        action="store_false",
        help="normal scheduling (the default; kept for older command lines)",
    )
    return p


def command_line(argv: Sequence[str]) -> str:
    """This run's command as typed from the repository root, for the report."""
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(ROOT)
    script = Path(__file__).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return shlex.join([str(exe), str(script), *argv])


def describe(plan: Plan, fd_limit: int, fd_why: str | None) -> str:
    """The plan, for --dry-run."""
    lines = [
        f"servers: {', '.join(s.name for s in plan.servers if s.missing is None)}",
        *(f"not run: {s.name}: {s.missing}" for s in plan.servers if s.missing is not None),
        f"rounds: {plan.rounds} (idle scenarios in {plan.idle_rounds})",
        f"cores: servers on {plan.server_cpu}, generator on {plan.gen_cpu};"
        f" SCHED_FIFO: {'yes' if plan.realtime else 'no'}",
        f"open-file limit: {fd_limit:,}{f' ({fd_why})' if fd_why else ''}",
        "scenarios:",
        *(
            f"  {s.key:<20} {json.dumps(s.params)}"
            + (f" (only {', '.join(s.servers)})" if s.servers else "")
            for s in plan.scenarios
        ),
        *(f"not run: {key}: {why}" for key, why in plan.skipped.items()),
    ]
    return "\n".join(lines) + "\n"


def _exit_on_signal(signum: int, _frame: object) -> None:
    # An exception, so every `finally` stops what it started (generator, servers).
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; 0 if every cell produced a result."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(args_list)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    began = datetime.datetime.now(datetime.UTC)
    allowed = os.sched_getaffinity(0)
    for option, cpu in (("--server-cpu", args.server_cpu), ("--gen-cpu", args.gen_cpu)):
        if cpu not in allowed:
            p.error(f"{option} {cpu}: this process may run on cores {sorted(allowed)} only")
    specs = server_specs()
    if args.servers:
        wanted = args.servers.split(",")
        unknown = sorted(set(wanted) - {s.name for s in specs})
        if unknown:
            p.error(f"--servers: no server named {', '.join(unknown)} (see --help)")
        specs = [s for s in specs if s.name in wanted]
    if args.quick:
        scenarios = quick_scenarios()
        counts = [int(s.params["count"]) for s in scenarios if s.kind == "idle"]
        fd_limit, fd_why = raise_fd_limit(max(counts, default=0) + FD_MARGIN)
        skipped: dict[str, str] = {}
        rounds = idle_rounds = 1
    else:
        fd_limit, fd_why = raise_fd_limit(max([*args.idle, args.chat_connections]) + FD_MARGIN)
        if args.chat_connections + FD_MARGIN > fd_limit:
            p.error(
                f"--chat-connections {args.chat_connections}: the open-file limit here is"
                f" {fd_limit:,}{f' and {fd_why}' if fd_why else ''}"
            )
        scenarios, skipped = full_scenarios(
            args.idle, fd_limit, fd_why, args.chat_connections, args.chat_rates
        )
        rounds, idle_rounds = args.rounds, args.idle_rounds
    if args.scenarios:
        keys = args.scenarios.split(",")
        unknown = sorted(
            k for k in keys if k not in skipped and not any(k in (s.key, s.kind) for s in scenarios)
        )
        if unknown:
            known = ", ".join(s.key for s in scenarios)
            p.error(f"--scenarios: {', '.join(unknown)} not in this run ({known})")
        if any(k in skipped for k in keys):  # an unreachable idle count: run its stand-in
            idle = [s for s in scenarios if s.kind == "idle"]
            keys += [max(idle, key=lambda s: int(s.params["count"])).key] if idle else []
        scenarios = [s for s in scenarios if s.key in keys or s.kind in keys]
        skipped = {k: v for k, v in skipped.items() if k in keys or "idle" in keys}
    out = args.out or BENCH / "results" / began.strftime("%Y%m%dT%H%M%SZ")
    plan = Plan(
        scenarios,
        rounds,
        idle_rounds,
        specs,
        args.server_cpu,
        args.gen_cpu,
        out,
        args.keep_logs,
        args.quick,
        args.realtime and not args.quick and realtime_allowed(),
        skipped,
        QUICK_IDLE_SETTLE_S if args.quick else IDLE_SETTLE_S,
    )
    if args.dry_run:
        print(describe(plan, fd_limit, fd_why), end="")
        return 0
    os.sched_setaffinity(0, {args.gen_cpu})  # keep this script off the server's core
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "date": began.isoformat(timespec="seconds"),
        "command": command_line(args_list),
        "machine": machine(),
        "rlimit_nofile": fd_limit,
        "rlimit_nofile_why": fd_why,
        "server_cpu": plan.server_cpu,
        "gen_cpu": plan.gen_cpu,
        "realtime": plan.realtime,
        "rounds": rounds,
        "idle_rounds": idle_rounds,
        "relayd_config": RELAYD_CONFIG.read_text(),
        "servers": {s.name: s.missing or "ran" for s in specs},
        "skipped": skipped,
    }
    cells = execute(plan)
    meta["logs"] = scan_logs(plan)
    meta["duration_s"] = round((datetime.datetime.now(datetime.UTC) - began).total_seconds())
    meta["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    summary = summarize(scenarios, cells, skipped)
    document = {
        "meta": meta,
        "scenarios": [s.as_json() for s in scenarios],
        "cells": [c.as_json() for c in cells],
        **summary,
    }
    (out / "result.json").write_text(json.dumps(document, indent=1) + "\n")
    report = render(document)
    (out / "report.md").write_text(report)
    print(report)
    print(f"results: {out / 'result.json'}", file=sys.stderr)
    return 1 if any(c.error for c in cells) else 0


if __name__ == "__main__":
    raise SystemExit(main())

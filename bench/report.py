"""The bench's data model and its report: cells, medians, ratios to node-ws, targets, tables.

Pure: no processes, no clocks. ``run.py`` fills :class:`Cell` objects; :func:`summarize`
reduces them to medians per scenario and server; :func:`render` writes the Markdown that
docs/benchmarks.md quotes.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "BASELINE",
    "RSS_NOISE_FLOOR_KIB",
    "TARGETS",
    "Cell",
    "Scenario",
    "Target",
    "bytes_per_connection",
    "render",
    "summarize",
    "targets",
]

#: The server every ratio is taken against.
BASELINE: Final = "node-ws"
#: The metrics of a paced (open-loop) scenario: latency (few pairs) and chat (thousands of
#: connections) are the same generator mode at different sizes.
_PACED: Final = (
    "server_us_per_msg",
    "server_us_per_msg_system",
    "p99_us",
    "p50_us",
    "p999_us",
    "max_us",
    "achieved_rate",
    "lost",
    "rss_end_kib",
    "connections",
    "send_lag_p99_us",
    "gen_cpu",
    "gen_loop_busy",
    "server_cpu",
)
#: Per kind: the metrics summarised, the primary one first (its ratio to node-ws is the
#: row's ``ratio``; every metric's is in ``ratios``).
METRICS: Final[dict[str, tuple[str, ...]]] = {
    "throughput": ("msgs_per_s", "lost", "gen_cpu", "server_cpu"),
    "fanin": ("msgs_per_s", "lost", "gen_cpu", "server_cpu"),
    "latency": _PACED,
    "chat": _PACED,
    "idle": ("bytes_per_conn", "held", "opened", "opens_per_s", "rss_held_kib", "rss_delta_kib"),
    "connrate": (
        "opens_per_s",
        "handshake_p50_us",
        "handshake_p99_us",
        "cycle_p50_us",
        "server_us_per_conn",
        "server_us_per_conn_system",
        "gen_cpu",
        "gen_loop_busy",
        "server_cpu",
    ),
}


@dataclass(frozen=True)
class Target:
    """One of issue 13's targets: relayd's median of ``metric`` against node-ws's, same run.

    Met when relayd / node-ws is at most ``ratio`` (``at_most``) or at least ``ratio``.
    """

    name: str
    scenario: str
    metric: str
    ratio: float
    at_most: bool
    unit: str

    @property
    def wanted(self) -> str:
        """The bound as the report states it."""
        return f"{'<=' if self.at_most else '>='} {self.ratio:.1f}x node-ws"


#: Issue 13's targets for relayd with its default config (bench/relayd-bench.toml: message
#: events logged), ratios to node-ws from one run. The long-term aim is node-ws's cost in
#: every row.
TARGETS: Final = (
    Target("CPU per message, chat at 2,000 msg/s", "chat/2000", "server_us_per_msg",
           ratio=1.5, at_most=True, unit="µs"),
    Target("CPU per message, chat at 10,000 msg/s", "chat/10000", "server_us_per_msg",
           ratio=1.5, at_most=True, unit="µs"),
    Target("p99 latency, chat at 10,000 msg/s", "chat/10000", "p99_us",
           ratio=1.5, at_most=True, unit="µs"),
    Target("connections per second (handshake to welcome, then close)", "connrate",
           "opens_per_s", ratio=0.8, at_most=False, unit="connections/s"),
    Target("fan-in 100 -> 1 throughput", "fanin/100x32", "msgs_per_s",
           ratio=0.8, at_most=False, unit="msg/s"),
    Target("10 pairs x 4 KiB throughput", "throughput/10x4096", "msgs_per_s",
           ratio=1.0, at_most=False, unit="msg/s"),
    Target("10 pairs x 32 B throughput", "throughput/10x32", "msgs_per_s",
           ratio=1.0, at_most=False, unit="msg/s"),
    Target("memory per idle connection, 10,000 held", "idle/10000", "bytes_per_conn",
           ratio=1.0, at_most=True, unit="bytes"),
)  # fmt: skip
#: A server's RSS moves by a few MiB with no new connection at all: allocator arenas are
#: taken and given back, and V8's garbage collector shrinks node-ws's heap whenever it
#: runs (node-ws lost 2.9 MiB while opening 20 connections on the 2-core test machine).
#: Memory per idle connection is computed only from an RSS growth of at least this much;
#: a smaller (or negative) growth says nothing about the connections and is reported as
#: not measurable. 1,000 connections of 6.5 KB (node-ws) grow RSS by about 6 MiB.
RSS_NOISE_FLOOR_KIB: Final = 4096


def bytes_per_connection(rss_before_kib: int, rss_held_kib: int, held: int) -> float | None:
    """Server memory per held connection, or None where the RSS growth is noise.

    Args:
        rss_before_kib: the server's RSS before the connections were opened.
        rss_held_kib: its RSS while they were held.
        held: how many connections it held.

    Returns:
        Bytes per connection, or None when no connection was held or RSS grew by less
        than :data:`RSS_NOISE_FLOOR_KIB`.
    """
    delta = rss_held_kib - rss_before_kib
    if held <= 0 or delta < RSS_NOISE_FLOOR_KIB:
        return None
    return delta * 1024 / held


@dataclass(frozen=True)
class Scenario:
    """One load shape: a key such as ``throughput/10x32``, the generator mode, its params.

    ``servers`` names the servers it runs against; empty means every server of the run.
    """

    key: str
    kind: str
    params: dict[str, Any]
    servers: tuple[str, ...] = ()

    def runs_on(self, server: str) -> bool:
        """Whether this scenario is run against ``server``."""
        return not self.servers or server in self.servers

    def as_json(self) -> dict[str, Any]:
        """The scenario as written to result.json."""
        return {
            "key": self.key,
            "kind": self.kind,
            "params": self.params,
            "servers": list(self.servers),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scenario:
        """The scenario :meth:`as_json` wrote."""
        return cls(data["key"], data["kind"], data["params"], tuple(data.get("servers", ())))


@dataclass
class Cell:
    """One run of one scenario against one server in one round."""

    scenario: str
    server: str
    round: int
    result: dict[str, Any] | None = None
    error: str | None = None
    server_cpu: float | None = None
    others_on_server_core: float | None = None
    retried: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def value(self, metric: str) -> float | None:
        """A metric of this cell, or None."""
        if metric == "server_cpu":
            return self.server_cpu
        found = (self.result or {}).get(metric)
        return float(found) if isinstance(found, int | float) else None

    def headline(self) -> dict[str, Any]:
        """The few figures worth a progress line."""
        keys = (
            "msgs_per_s",
            "server_us_per_msg",
            "p50_us",
            "p99_us",
            "bytes_per_conn",
            "held",
            "opens_per_s",
            "gen_cpu",
        )
        shown = {k: v for k, v in (self.result or {}).items() if k in keys}
        if self.server_cpu is not None:
            shown["server_cpu"] = self.server_cpu
        if self.others_on_server_core is not None:
            shown["others"] = self.others_on_server_core
        return shown

    def as_json(self) -> dict[str, Any]:
        """The cell as written to result.json."""
        return {
            "scenario": self.scenario,
            "server": self.server,
            "round": self.round,
            "result": self.result,
            "error": self.error,
            "server_cpu": self.server_cpu,
            "others_on_server_core": self.others_on_server_core,
            "retried": self.retried,
        }


def summarize(
    scenarios: list[Scenario], cells: list[Cell], skipped: dict[str, str] | None = None
) -> dict[str, Any]:
    """Medians per scenario and server, ratios to node-ws, and the targets.

    Args:
        scenarios: the scenarios of the run.
        cells: every cell the run produced.
        skipped: scenario keys the machine could not run, and why.

    Returns:
        ``{"medians": {scenario: {server: row}}, "targets": [...]}``; each row has the
        median of every metric of its kind, ``ratios`` (each metric's median over
        node-ws's) and ``ratio`` (the first metric's).
    """
    medians: dict[str, dict[str, dict[str, Any]]] = {}
    for scenario in scenarios:
        metrics = METRICS[scenario.kind]
        per_server: dict[str, dict[str, Any]] = {}
        for server in dict.fromkeys(c.server for c in cells if c.scenario == scenario.key):
            mine = [c for c in cells if c.scenario == scenario.key and c.server == server]
            good = [c for c in mine if c.error is None]
            row: dict[str, Any] = {"runs": len(good), "errors": [c.error for c in mine if c.error]}
            for metric in metrics:
                values = [v for c in good if (v := c.value(metric)) is not None]
                row[metric] = statistics.median(values) if values else None
            noise = [c.others_on_server_core for c in good if c.others_on_server_core is not None]
            row["others_on_server_core_max"] = max(noise) if noise else None
            per_server[server] = row
        base = per_server.get(BASELINE, {})
        for row in per_server.values():
            row["ratios"] = {m: _ratio_of(row.get(m), base.get(m)) for m in metrics}
            row["ratio"] = row["ratios"][metrics[0]]
        medians[scenario.key] = per_server
    return {"medians": medians, "targets": targets(medians, skipped or {}, cells)}


def _ratio_of(mine: float | None, base: float | None) -> float | None:
    return mine / base if mine is not None and base is not None and base > 0 else None


def _get(medians: dict[str, Any], scenario: str, server: str, metric: str) -> float | None:
    value = medians.get(scenario, {}).get(server, {}).get(metric)
    return float(value) if isinstance(value, int | float) else None


#: What the report says for a target that has no figure.
NOT_MEASURED: Final = "not measured"
NOT_MEASURABLE: Final = "not measurable here"


def round_ratios(cells: Sequence[Cell], scenario: str, server: str, metric: str) -> list[float]:
    """``server``'s ``metric`` over node-ws's in each round that measured both, by round.

    The verdict is the ratio of the medians; these show how far single rounds stray from
    it (a machine that slows for a minute slows one round of every server).
    """

    def by_round(name: str) -> dict[int, float]:
        return {
            c.round: v
            for c in cells
            if c.scenario == scenario
            and c.server == name
            and c.error is None
            and (v := c.value(metric)) is not None
        }

    mine, base = by_round(server), by_round(BASELINE)
    ratios = (_ratio_of(mine[r], base.get(r)) for r in sorted(mine))
    return [ratio for ratio in ratios if ratio is not None]


def targets(
    medians: dict[str, Any], skipped: dict[str, str], cells: Sequence[Cell] = ()
) -> list[dict[str, Any]]:
    """Issue 13's targets (:data:`TARGETS`) for relayd, each met, missed or unmeasured.

    Every target has a row for ``relayd`` whether or not this run measured it (a quick run
    measures none); ``relayd-nolog`` gets a row, for reference, where it was measured.

    Args:
        medians: :func:`summarize`'s medians.
        skipped: scenario keys the machine could not run, and why.
        cells: the run's cells, for each row's ratios round by round (none without them).

    Returns:
        One dict per row: target, scenario, wanted, measured, ratio, met (True, False or
        None), ``rounds`` (:func:`round_ratios`) and, where met is None, ``unmeasured``:
        :data:`NOT_MEASURED` or :data:`NOT_MEASURABLE`.
    """
    out: list[dict[str, Any]] = []
    for server in ("relayd", "relayd-nolog"):
        reference = server != "relayd"
        for target in TARGETS:
            mine = _get(medians, target.scenario, server, target.metric)
            base = _get(medians, target.scenario, BASELINE, target.metric)
            ratio = _ratio_of(mine, base)
            if ratio is None and reference:
                continue
            row: dict[str, Any] = {
                "target": target.name + (" (message logging off, for reference)" * reference),
                "scenario": target.scenario,
                "wanted": target.wanted,
                "ratio": ratio,
                "met": None,
                "rounds": round_ratios(cells, target.scenario, server, target.metric),
            }
            if mine is not None and base is not None and ratio is not None:
                row["met"] = ratio <= target.ratio if target.at_most else ratio >= target.ratio
                row["measured"] = (
                    f"{ratio:.2f}x: {mine:,.0f} {target.unit} against {base:,.0f} {target.unit}"
                )
            elif (why := skipped.get(target.scenario)) is not None:
                row["unmeasured"] = NOT_MEASURABLE
                row["measured"] = f"not measurable on this machine: {why}"
            else:
                row["unmeasured"] = NOT_MEASURED
                row["measured"] = (
                    f"not measured in this run (no {target.scenario} on {server} and {BASELINE})"
                )
            out.append(row)
    return out


# -- Markdown -------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f" ({value:.2f}x)"


def _servers(document: dict[str, Any]) -> list[str]:
    return [name for name, state in document["meta"]["servers"].items() if state == "ran"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _met(target: dict[str, Any]) -> str:
    if target["met"] is None:
        return str(target.get("unmeasured", NOT_MEASURED))
    return "yes" if target["met"] else "**no**"


def _idle_per_conn(c: dict[str, Any]) -> str:
    """The per-connection cell of the idle table: KiB (ratio), or why there is no figure."""
    per = c.get("bytes_per_conn")
    if per is not None:
        return f"{per / 1024:,.1f}{_ratio(c.get('ratio'))}"
    delta = c.get("rss_delta_kib")
    if delta is None:
        return "-"
    return f"not measurable: RSS {delta / 1024:+,.1f} MiB, under the noise floor"


def _faults(cells: list[dict[str, Any]]) -> list[str]:
    """One line per cell that lost messages or got error frames or failed connections."""
    lines = []
    for c in cells:
        r = c.get("result") or {}
        found = []
        if r.get("lost"):
            found.append(f"{_plural(int(r['lost']), 'message')} lost")
        if r.get("errors"):
            found.append(f"{_plural(int(r['errors']), 'error frame')} in the measured window")
        if r.get("error_kinds"):
            found.append(f"error frames {r['error_kinds']}")
        if r.get("failures"):
            found.append(f"failed connections {r['failures']}")
        if r.get("lost_connections"):
            found.append(f"{_plural(int(r['lost_connections']), 'connection')} closed under load")
        if found:
            lines.append(f"- {c['scenario']} on {c['server']}: {'; '.join(found)}")
    return lines


def _stand_in(scenarios: list[Scenario]) -> str | None:
    """The key of the run's largest idle scenario, which stands in for unreachable ones."""
    idle = [s for s in scenarios if s.kind == "idle"]
    return max(idle, key=lambda s: int(s.params["count"])).key if idle else None


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _mib(kib: float | None) -> str:
    return _num(None if kib is None else kib / 1024, 1)


#: What a table shows for a server a scenario is not run against.
NOT_RUN: Final = "not run"


def _setup(document: dict[str, Any], scenarios: list[Scenario]) -> list[str]:
    """The run's command, machine, packages and what it did not run."""
    meta = document["meta"]
    m = meta["machine"]
    rounds = _plural(meta["rounds"], "interleaved round")
    # Reports before the interpreter's path was recorded name its version only.
    python = m["python"] + (f" ({m['python_executable']})" if "python_executable" in m else "")
    out = [
        f"Run {meta['date']}, {meta['duration_s']} s: `{meta['command']}`",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus']} cores ({m['hypervisor'] or 'bare metal'}"
        f" guest), {m['memory_gib']} GiB, Linux {m['kernel']}; Python {python},"
        f" Node {m['node']}. relayd at {m['relayd_commit']} ({m['relayd_tree']} tree)."
        f" Servers on core {meta['server_cpu']}, generator on core {meta['gen_cpu']};"
        f" {rounds} (idle scenarios: {meta['idle_rounds']}), medians shown."
        f" Open-file limit (RLIMIT_NOFILE) {meta['rlimit_nofile']:,}."
        f" Load average {' '.join(m['loadavg_start'])} at the start,"
        f" {' '.join(m['loadavg_end'])} at the end.",
        "",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + ".",
        "",
    ]
    for name, state in meta["servers"].items():
        if state != "ran":
            out.append(f"Not run: {name}: {state}.")
    for key, why in meta["skipped"].items():
        out.append(
            f"Not run: {key}: {why}{_instead(scenarios) if key.startswith('idle/') else ''}."
        )
    return out


def _instead(scenarios: list[Scenario]) -> str:
    stand_in = _stand_in(scenarios)
    return f"; {stand_in}, the largest count it allows, is measured instead" if stand_in else ""


def _targets_table(document: dict[str, Any]) -> list[str]:
    out = ["", "### Targets (relayd, default config, ratios to node-ws in this run)", ""]
    out += _table(
        ["target", "scenario", "wanted", "measured", "round by round", "met"],
        [
            [t["target"], t["scenario"], t["wanted"], t["measured"], _rounds(t), _met(t)]
            for t in document["targets"]
        ],
    )
    return out


def _rounds(target: dict[str, Any]) -> str:
    # result.json files written before the ratios round by round have none.
    return ", ".join(f"{r:.2f}x" for r in target.get("rounds", ())) or "-"


#: The closed-loop tables (and connrate's): kind, title, metric shown.
_RATE_TABLES: Final = (
    ("throughput", "Throughput, messages/s delivered (ratio to node-ws)", "msgs_per_s"),
    ("fanin", "Fan-in, messages/s delivered to one receiver (ratio to node-ws)", "msgs_per_s"),
    (
        "connrate",
        "Connections per second: handshake to welcome, then close (ratio to node-ws)"
        " · server CPU per connection, µs [in the kernel]",
        "opens_per_s",
    ),
)


def _rate_tables(
    scenarios: list[Scenario], servers: list[str], medians: dict[str, Any]
) -> list[str]:
    out: list[str] = []
    for kind, title, metric in _RATE_TABLES:
        mine = [s for s in scenarios if s.kind == kind]
        if not mine:
            continue
        out += ["", f"### {title}", ""]
        rows = []
        for s in mine:
            row = [s.key]
            for server in servers:
                cell = medians[s.key].get(server, {})
                shown = _num(cell.get(metric)) + _ratio(cell.get("ratio"))
                if kind == "connrate" and cell.get("server_us_per_conn") is not None:
                    # What a connection costs the server, and the kernel's part of it.
                    shown += f" · {_num(cell['server_us_per_conn'])} µs"
                    shown += _kernel(cell.get("server_us_per_conn_system"))
                row.append(shown if s.runs_on(server) else NOT_RUN)
            gen = [float(c["gen_cpu"]) for c in medians[s.key].values() if c.get("gen_cpu")]
            row.append(f"{max(gen):.0%}" if gen else "-")
            rows.append(row)
        out += _table(["scenario", *servers, "generator CPU (max)"], rows)
    return out


def _kernel(system_us: object) -> str:
    """`` [N]``: the server's system time per operation, µs; nothing where not measured."""
    return f" [{_num(system_us, 1)}]" if isinstance(system_us, int | float) else ""


def _paced_table(
    scenarios: list[Scenario], servers: list[str], medians: dict[str, Any]
) -> list[str]:
    paced = [s for s in scenarios if s.kind in ("chat", "latency")]
    if not paced:
        return []
    out = [
        "",
        "### One message at a time: open-loop load, messages evenly spaced (chat, latency)",
        "",
    ]
    rows = []
    for s in paced:
        for server in servers:
            if not s.runs_on(server):
                continue
            c = medians[s.key].get(server, {})
            ratios = c.get("ratios", {})
            gen = (c.get("gen_cpu"), c.get("gen_loop_busy"))
            rows.append(
                [
                    s.key,
                    server,
                    _num(c.get("connections")),
                    _num(c.get("server_us_per_msg"), 1)
                    + _ratio(ratios.get("server_us_per_msg"))
                    + _kernel(c.get("server_us_per_msg_system")),
                    _num(c.get("p50_us")),
                    _num(c.get("p99_us")) + _ratio(ratios.get("p99_us")),
                    _num(c.get("p999_us")),
                    _num(c.get("max_us")),
                    _mib(c.get("rss_end_kib")),
                    _num(c.get("achieved_rate")),
                    _num(c.get("lost")),
                    " / ".join(_share(v) for v in gen) + f" / {_num(c.get('send_lag_p99_us'))}",
                ]
            )
    out += _table(
        [
            "scenario",
            "server",
            "connections",
            "server CPU per message, µs (ratio) [in the kernel]",
            "p50 µs",
            "p99 µs (ratio)",
            "p99.9 µs",
            "max µs",
            "server RSS MiB",
            "sent/s",
            "lost",
            "generator: CPU / event loop busy / send lag p99 µs",
        ],
        rows,
    )
    out += [
        "",
        "Latency is one way, sender to receiver, both in the generator (one clock). Server CPU"
        " per message is its user + system time (/proc/PID/stat) over the measured window"
        " divided by the messages sent in it, the system time alone in brackets (system calls"
        " and the loopback TCP work they do), which the kernel samples tick by tick: it moves"
        " between runs far more than the total does, so compare totals; RSS is read at the"
        " window's end.",
    ]
    return out


def _idle_table(
    scenarios: list[Scenario], servers: list[str], medians: dict[str, Any], skipped: dict[str, str]
) -> list[str]:
    idle = [s for s in scenarios if s.kind == "idle"]
    unreachable = {k: why for k, why in skipped.items() if k.startswith("idle/")}
    if not (idle or unreachable):
        return []
    out = ["", "### Idle connections: server RSS per connection", ""]
    rows = []
    for s in idle:
        for server in servers:
            c = medians[s.key].get(server, {})
            rows.append(
                [
                    s.key,
                    server,
                    f"{_num(c.get('held'))} / {_num(c.get('opened'))}",
                    _idle_per_conn(c),
                    _mib(c.get("rss_held_kib")),
                    _num(c.get("opens_per_s")),
                ]
            )
    instead = _instead(scenarios)
    for key, why in unreachable.items():
        rows.append([key, "every server", NOT_MEASURABLE, f"not run: {why}{instead}", "-", "-"])
    out += _table(
        [
            "count",
            "server",
            "held / opened",
            "KiB per connection (ratio)",
            "RSS held (MiB)",
            "opened/s",
        ],
        rows,
    )
    out += [
        "",
        f"KiB per connection is the growth of the server's RSS while it holds the"
        f" connections, divided by their number; a growth under"
        f" {RSS_NOISE_FLOOR_KIB // 1024} MiB is within what RSS moves by on its own"
        f" and gives no figure.",
    ]
    return out


def _busy_table(
    scenarios: list[Scenario], servers: list[str], medians: dict[str, Any]
) -> list[str]:
    out = ["", "### Who was busy: CPU share of one core during the measured window", ""]
    rows = []
    for s in scenarios:
        if s.kind == "idle":
            continue
        row = [s.key]
        for server in servers:
            c = medians[s.key].get(server, {})
            parts = [c.get(k) for k in ("server_cpu", "gen_cpu", "others_on_server_core_max")]
            row.append(" / ".join(map(_share, parts)) if s.runs_on(server) else NOT_RUN)
        rows.append(row)
    out += _table(["scenario (server / generator / others on the server's core)", *servers], rows)
    return out


def _checks(document: dict[str, Any]) -> list[str]:
    meta, medians = document["meta"], document["medians"]
    out = ["", "### Checks", ""]
    faults = _faults(document["cells"])
    out.append(
        "Every message sent was delivered; no error frames, no failed or dropped connections."
        if not faults
        else "Messages lost, error frames or failed connections:"
    )
    out += faults
    logs = meta.get("logs", {})
    warnings = logs.get("warning_events", {})
    out += [
        "",
        f"relayd's log files: {logs.get('relayd_log_lines', 0):,} lines,"
        f" {logs.get('relayd_log_bytes', 0) / 2**20:,.0f} MiB;"
        f" error events: {len(logs.get('error_events', []))};"
        f" warning events: {sum(warnings.values()) if warnings else 0}"
        + (f" ({', '.join(f'{k} x{v}' for k, v in warnings.items())})" if warnings else "")
        + ".",
    ]
    for line in logs.get("error_events", []):
        out.append(f"- error event: `{line}`")
    errors = [(k, s, e) for k, row in medians.items() for s, c in row.items() for e in c["errors"]]
    for key, server, error in errors:
        out.append(f"- failed run: {key} on {server}: {error}")
    return out


def render(document: dict[str, Any]) -> str:
    """The report as Markdown: setup, targets, then one table per kind of scenario."""
    medians: dict[str, dict[str, dict[str, Any]]] = document["medians"]
    scenarios = [Scenario.from_json(s) for s in document["scenarios"]]
    servers = _servers(document)
    out = _setup(document, scenarios)
    out += _targets_table(document)
    out += _rate_tables(scenarios, servers, medians)
    out += _paced_table(scenarios, servers, medians)
    out += _idle_table(scenarios, servers, medians, document["meta"]["skipped"])
    out += _busy_table(scenarios, servers, medians)
    out += _checks(document)
    return "\n".join(out) + "\n"

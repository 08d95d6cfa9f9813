"""The bench's data model and its report: cells, medians, ratios to node-ws, targets, tables.

Pure: no processes, no clocks. ``run.py`` fills :class:`Cell` objects; :func:`summarize`
reduces them to medians per scenario and server; :func:`render` writes the Markdown that
docs/benchmarks.md quotes.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["BASELINE", "Cell", "Scenario", "render", "summarize"]

#: The server every ratio is taken against.
BASELINE: Final = "node-ws"
#: Per kind: the metrics summarised, the primary one first, and whether higher is better.
METRICS: Final[dict[str, tuple[tuple[str, ...], bool]]] = {
    "throughput": (("msgs_per_s", "gen_cpu", "server_cpu"), True),
    "fanin": (("msgs_per_s", "gen_cpu", "server_cpu"), True),
    "latency": (
        (
            "p99_us",
            "p50_us",
            "p999_us",
            "max_us",
            "achieved_rate",
            "lost",
            "send_lag_p99_us",
            "gen_cpu",
            "server_cpu",
        ),
        False,
    ),
    "idle": (("bytes_per_conn", "held", "opened", "opens_per_s", "rss_held_kib"), False),
    "connrate": (
        ("opens_per_s", "handshake_p50_us", "handshake_p99_us", "gen_cpu", "server_cpu"),
        True,
    ),
}
#: The issue's targets for relayd with its default config (bench/relayd-bench.toml).
MIN_RATIO_10X32: Final = 0.55
MAX_P99_US_10K: Final = 1000.0
MAX_BYTES_PER_IDLE_CONN: Final = 12_000  # "12 KB", read as 12,000 bytes
IDLE_TARGET: Final = 50_000


@dataclass(frozen=True)
class Scenario:
    """One load shape: a key such as ``throughput/10x32``, the generator mode, its params."""

    key: str
    kind: str
    params: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """The scenario as written to result.json."""
        return {"key": self.key, "kind": self.kind, "params": self.params}


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


def summarize(scenarios: list[Scenario], cells: list[Cell]) -> dict[str, Any]:
    """Medians per scenario and server, ratios to node-ws, and the targets."""
    medians: dict[str, dict[str, dict[str, Any]]] = {}
    for scenario in scenarios:
        metrics, _ = METRICS[scenario.kind]
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
        base = per_server.get(BASELINE, {}).get(metrics[0])
        for row in per_server.values():
            mine_value = row.get(metrics[0])
            row["ratio"] = mine_value / base if mine_value is not None and base else None
        medians[scenario.key] = per_server
    return {"medians": medians, "targets": targets(medians)}


def _get(medians: dict[str, Any], scenario: str, server: str, metric: str) -> float | None:
    value = medians.get(scenario, {}).get(server, {}).get(metric)
    return float(value) if isinstance(value, int | float) else None


def targets(medians: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's four targets for relayd (default config), each met, missed or unmeasured."""
    out: list[dict[str, Any]] = []

    def add(name: str, wanted: str, value: str, met: bool | None) -> None:
        out.append({"target": name, "wanted": wanted, "measured": value, "met": met})

    for server in ("relayd", "relayd-nolog"):
        tag = "" if server == "relayd" else " (message logging off, for reference)"
        mine = _get(medians, "throughput/10x32", server, "msgs_per_s")
        node = _get(medians, "throughput/10x32", BASELINE, "msgs_per_s")
        aio = _get(medians, "throughput/10x32", "websockets-asyncio", "msgs_per_s")
        if mine is not None and node:
            ok = mine / node >= MIN_RATIO_10X32 and (aio is None or mine >= aio)
            aio_text = f", websockets-asyncio {aio:,.0f}" if aio is not None else ""
            add(
                f"10 pairs x 32 B throughput{tag}",
                f">= {MIN_RATIO_10X32}x node-ws and >= websockets-asyncio",
                f"{mine:,.0f} msg/s = {mine / node:.2f}x node-ws ({node:,.0f}){aio_text}",
                ok,
            )
        p99 = _get(medians, "latency/10000", server, "p99_us")
        if p99 is not None:
            add(
                f"p99 latency at 10,000 msg/s{tag}",
                f"<= {MAX_P99_US_10K / 1000:.1f} ms",
                f"{p99 / 1000:.2f} ms",
                p99 <= MAX_P99_US_10K,
            )
        per_conn = _get(medians, "idle/10000", server, "bytes_per_conn")
        if per_conn is not None:
            add(
                f"memory per idle connection at 10,000{tag}",
                f"<= {MAX_BYTES_PER_IDLE_CONN:,} bytes",
                f"{per_conn:,.0f} bytes ({per_conn / 1024:.1f} KiB)",
                per_conn <= MAX_BYTES_PER_IDLE_CONN,
            )
        held = _get(medians, f"idle/{IDLE_TARGET}", server, "held")
        if held is not None:
            add(
                f"{IDLE_TARGET:,} idle connections held{tag}",
                f"{IDLE_TARGET:,}",
                f"{held:,.0f}",
                held >= IDLE_TARGET,
            )
        elif server == "relayd":
            reached = [
                (int(key.split("/")[1]), row[server].get("held"))
                for key, row in medians.items()
                if key.startswith("idle/") and server in row
            ]
            best = max(reached, default=None)
            shown = (
                f"not measurable here; largest tried: {best[1]:,.0f} of {best[0]:,}"
                if best and best[1] is not None
                else "not measured"
            )
            add(f"{IDLE_TARGET:,} idle connections held", f"{IDLE_TARGET:,}", shown, None)
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


def render(document: dict[str, Any]) -> str:
    """The report as Markdown: setup, targets, then one table per kind of scenario."""
    meta = document["meta"]
    medians: dict[str, dict[str, dict[str, Any]]] = document["medians"]
    scenarios = [Scenario(s["key"], s["kind"], s["params"]) for s in document["scenarios"]]
    servers = _servers(document)
    m = meta["machine"]
    out = [
        f"Run {meta['date']}, {meta['duration_s']} s: `{meta['command']}`",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus']} cores ({m['hypervisor'] or 'bare metal'}"
        f" guest), {m['memory_gib']} GiB, Linux {m['kernel']}; Python {m['python']},"
        f" Node {m['node']}. relayd at {m['relayd_commit']} ({m['relayd_tree']} tree)."
        f" Servers on core {meta['server_cpu']}, generator on core {meta['gen_cpu']};"
        f" {meta['rounds']} interleaved rounds (idle scenarios: {meta['idle_rounds']}),"
        f" medians shown. Load average {' '.join(m['loadavg_start'])} at the start,"
        f" {' '.join(m['loadavg_end'])} at the end.",
        "",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + ".",
        "",
    ]
    for name, state in meta["servers"].items():
        if state != "ran":
            out.append(f"Not run: {name}: {state}.")
    for key, why in meta["skipped"].items():
        out.append(f"Not run: {key}: {why}.")
    out += ["", "### Targets (relayd, default config, this run)", ""]
    out += _table(
        ["target", "wanted", "measured", "met"],
        [
            [
                t["target"],
                t["wanted"],
                t["measured"],
                {True: "yes", False: "**no**"}.get(t["met"], "not measured"),
            ]
            for t in document["targets"]
        ],
    )
    kinds = [
        ("throughput", "Throughput, messages/s delivered (ratio to node-ws)", "msgs_per_s", 0),
        (
            "fanin",
            "Fan-in, messages/s delivered to one receiver (ratio to node-ws)",
            "msgs_per_s",
            0,
        ),
        ("connrate", "Connections opened per second (ratio to node-ws)", "opens_per_s", 0),
    ]
    for kind, title, metric, digits in kinds:
        mine = [s for s in scenarios if s.kind == kind]
        if not mine:
            continue
        out += ["", f"### {title}", ""]
        rows = []
        for s in mine:
            row = [s.key]
            for server in servers:
                cell = medians[s.key].get(server, {})
                row.append(_num(cell.get(metric), digits) + _ratio(cell.get("ratio")))
            gen = [
                float(c["gen_cpu"]) for c in medians[s.key].values() if c.get("gen_cpu") is not None
            ]
            row.append(f"{max(gen):.0%}" if gen else "-")
            rows.append(row)
        out += _table(["scenario", *servers, "generator CPU (max)"], rows)
    latency = [s for s in scenarios if s.kind == "latency"]
    if latency:
        out += ["", "### Latency, one way, sender to receiver (µs)", ""]
        rows = []
        for s in latency:
            for server in servers:
                c = medians[s.key].get(server, {})
                rows.append(
                    [
                        s.key,
                        server,
                        _num(c.get("p50_us")),
                        _num(c.get("p99_us")) + _ratio(c.get("ratio")),
                        _num(c.get("p999_us")),
                        _num(c.get("max_us")),
                        _num(c.get("achieved_rate")),
                        _num(c.get("lost")),
                        _num(c.get("send_lag_p99_us")),
                    ]
                )
        out += _table(
            [
                "rate",
                "server",
                "p50",
                "p99 (ratio)",
                "p99.9",
                "max",
                "sent/s",
                "lost",
                "generator lag p99",
            ],
            rows,
        )
    idle = [s for s in scenarios if s.kind == "idle"]
    if idle:
        out += ["", "### Idle connections: server RSS per connection", ""]
        rows = []
        for s in idle:
            for server in servers:
                c = medians[s.key].get(server, {})
                per = c.get("bytes_per_conn")
                rows.append(
                    [
                        s.key,
                        server,
                        f"{_num(c.get('held'))} / {_num(c.get('opened'))}",
                        "-" if per is None else f"{per / 1024:,.1f}{_ratio(c.get('ratio'))}",
                        _num(
                            None if c.get("rss_held_kib") is None else c["rss_held_kib"] / 1024, 1
                        ),
                        _num(c.get("opens_per_s")),
                    ]
                )
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
    out += ["", "### Who was busy: CPU share of one core during the measured window", ""]
    rows = []
    for s in scenarios:
        if s.kind == "idle":
            continue
        row = [s.key]
        for server in servers:
            c = medians[s.key].get(server, {})
            parts = [c.get(k) for k in ("server_cpu", "gen_cpu", "others_on_server_core_max")]
            row.append(" / ".join("-" if v is None else f"{v:.0%}" for v in parts))
        rows.append(row)
    out += _table(["scenario (server / generator / others on the server's core)", *servers], rows)
    logs = meta.get("logs", {})
    out += [
        "",
        f"relayd's log files: {logs.get('relayd_log_lines', 0):,} lines,"
        f" {logs.get('relayd_log_bytes', 0) / 2**20:,.0f} MiB;"
        f" error events: {len(logs.get('error_events', []))}.",
    ]
    errors = [(k, s, e) for k, row in medians.items() for s, c in row.items() for e in c["errors"]]
    for key, server, error in errors:
        out.append(f"- failed run: {key} on {server}: {error}")
    return "\n".join(out) + "\n"

"""The bench's data model and its report: cells, medians, ratios to node-ws, targets, tables.

Pure: no processes, no clocks. ``run.py`` fills :class:`Cell` objects; :func:`summarize`
reduces them to medians per scenario and server; :func:`render` writes the Markdown that
docs/benchmarks.md quotes.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "BASELINE",
    "RSS_NOISE_FLOOR_KIB",
    "Cell",
    "Scenario",
    "bytes_per_connection",
    "render",
    "summarize",
]

#: The server every ratio is taken against.
BASELINE: Final = "node-ws"
#: Per kind: the metrics summarised, the primary one first, and whether higher is better.
METRICS: Final[dict[str, tuple[tuple[str, ...], bool]]] = {
    "throughput": (("msgs_per_s", "lost", "gen_cpu", "server_cpu"), True),
    "fanin": (("msgs_per_s", "lost", "gen_cpu", "server_cpu"), True),
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
    "idle": (
        ("bytes_per_conn", "held", "opened", "opens_per_s", "rss_held_kib", "rss_delta_kib"),
        False,
    ),
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


def summarize(
    scenarios: list[Scenario], cells: list[Cell], skipped: dict[str, str] | None = None
) -> dict[str, Any]:
    """Medians per scenario and server, ratios to node-ws, and the targets.

    Args:
        scenarios: the scenarios of the run.
        cells: every cell the run produced.
        skipped: scenario keys the machine could not run, and why.

    Returns:
        ``{"medians": {scenario: {server: row}}, "targets": [...]}``.
    """
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
            row["ratio"] = (
                mine_value / base
                if mine_value is not None and base is not None and base > 0
                else None
            )
        medians[scenario.key] = per_server
    return {"medians": medians, "targets": targets(medians, skipped or {})}


def _get(medians: dict[str, Any], scenario: str, server: str, metric: str) -> float | None:
    value = medians.get(scenario, {}).get(server, {}).get(metric)
    return float(value) if isinstance(value, int | float) else None


#: What the report says for a target that has no figure.
NOT_MEASURED: Final = "not measured"
NOT_MEASURABLE: Final = "not measurable here"


def targets(medians: dict[str, Any], skipped: dict[str, str]) -> list[dict[str, Any]]:
    """The issue's four targets for relayd (default config), each met, missed or unmeasured.

    Every target has a row for ``relayd`` whether or not this run measured it (a quick run
    measures none); ``relayd-nolog`` gets a row, for reference, where it was measured.

    Args:
        medians: :func:`summarize`'s medians.
        skipped: scenario keys the machine could not run, and why.

    Returns:
        One dict per row: target, wanted, measured, met (True, False or None) and, where
        met is None, ``unmeasured``: :data:`NOT_MEASURED` or :data:`NOT_MEASURABLE`.
    """
    out: list[dict[str, Any]] = []

    def add(
        name: str, wanted: str, value: str, met: bool | None, unmeasured: str = NOT_MEASURED
    ) -> None:
        row = {"target": name, "wanted": wanted, "measured": value, "met": met}
        if met is None:
            row["unmeasured"] = unmeasured
        out.append(row)

    not_in_run = "not measured in this run (no {})"
    for server in ("relayd", "relayd-nolog"):
        reference = server != "relayd"
        tag = " (message logging off, for reference)" if reference else ""

        name = f"10 pairs x 32 B throughput{tag}"
        wanted = f">= {MIN_RATIO_10X32}x node-ws and >= websockets-asyncio"
        mine = _get(medians, "throughput/10x32", server, "msgs_per_s")
        node = _get(medians, "throughput/10x32", BASELINE, "msgs_per_s")
        aio = _get(medians, "throughput/10x32", "websockets-asyncio", "msgs_per_s")
        if mine is not None and node:
            ok = mine / node >= MIN_RATIO_10X32 and (aio is None or mine >= aio)
            aio_text = f", websockets-asyncio {aio:,.0f}" if aio is not None else ""
            add(
                name,
                wanted,
                f"{mine:,.0f} msg/s = {mine / node:.2f}x node-ws ({node:,.0f}){aio_text}",
                ok,
            )
        elif not reference:
            add(name, wanted, not_in_run.format("throughput/10x32 scenario with node-ws"), None)

        name = f"p99 latency at 10,000 msg/s{tag}"
        wanted = f"<= {MAX_P99_US_10K / 1000:.1f} ms"
        p99 = _get(medians, "latency/10000", server, "p99_us")
        if p99 is not None:
            add(name, wanted, f"{p99 / 1000:.2f} ms", p99 <= MAX_P99_US_10K)
        elif not reference:
            add(name, wanted, not_in_run.format("latency/10000 scenario"), None)

        name = f"memory per idle connection at 10,000{tag}"
        wanted = f"<= {MAX_BYTES_PER_IDLE_CONN:,} bytes"
        per_conn = _get(medians, "idle/10000", server, "bytes_per_conn")
        if per_conn is not None:
            add(
                name,
                wanted,
                f"{per_conn:,.0f} bytes ({per_conn / 1024:.1f} KiB)",
                per_conn <= MAX_BYTES_PER_IDLE_CONN,
            )
        elif not reference:
            delta = _get(medians, "idle/10000", server, "rss_delta_kib")
            shown = (
                not_in_run.format("idle/10000 scenario")
                if delta is None
                else f"RSS grew {delta / 1024:,.1f} MiB: under the noise floor"
            )
            add(name, wanted, shown, None)

        name = f"{IDLE_TARGET:,} idle connections held{tag}"
        wanted = f"{IDLE_TARGET:,}"
        held = _get(medians, f"idle/{IDLE_TARGET}", server, "held")
        if held is not None:
            add(name, wanted, f"{held:,.0f}", held >= IDLE_TARGET)
        elif not reference:
            largest = _largest_idle(medians, server)
            why = skipped.get(f"idle/{IDLE_TARGET}")
            if why is not None:
                shown = f"not measurable on this machine: {why}"
                if largest is not None:
                    shown += f". relayd held {largest}, the largest count the limit allows"
                add(name, wanted, shown, None, NOT_MEASURABLE)
            else:
                shown = not_in_run.format(f"idle/{IDLE_TARGET} scenario")
                if largest is not None:
                    shown += f"; relayd held {largest}"
                add(name, wanted, shown, None)
    return out


def _largest_idle(medians: dict[str, Any], server: str) -> str | None:
    """``"H of N at idle/N"`` for the largest idle scenario ``server`` ran, or None."""
    reached = [
        (int(key.split("/")[1]), row[server].get("held"))
        for key, row in medians.items()
        if key.startswith("idle/") and server in row
    ]
    if not reached:
        return None
    count, held = max(reached)
    return f"{_num(held)} of {count:,} at idle/{count}"


def _stand_in(scenarios: list[Scenario]) -> str | None:
    """The key of the run's largest idle scenario, which stands in for unreachable ones."""
    idle = [s for s in scenarios if s.kind == "idle"]
    return max(idle, key=lambda s: int(s.params["count"])).key if idle else None


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


def render(document: dict[str, Any]) -> str:
    """The report as Markdown: setup, targets, then one table per kind of scenario."""
    meta = document["meta"]
    medians: dict[str, dict[str, dict[str, Any]]] = document["medians"]
    scenarios = [Scenario(s["key"], s["kind"], s["params"]) for s in document["scenarios"]]
    servers = _servers(document)
    m = meta["machine"]
    rounds = _plural(meta["rounds"], "interleaved round")
    out = [
        f"Run {meta['date']}, {meta['duration_s']} s: `{meta['command']}`",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus']} cores ({m['hypervisor'] or 'bare metal'}"
        f" guest), {m['memory_gib']} GiB, Linux {m['kernel']}; Python {m['python']},"
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
    stand_in = _stand_in(scenarios)
    instead = f"; {stand_in}, the largest count it allows, is measured instead" if stand_in else ""
    for key, why in meta["skipped"].items():
        out.append(f"Not run: {key}: {why}{instead if key.startswith('idle/') else ''}.")
    out += ["", "### Targets (relayd, default config, this run)", ""]
    out += _table(
        ["target", "wanted", "measured", "met"],
        [[t["target"], t["wanted"], t["measured"], _met(t)] for t in document["targets"]],
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
                        "-" if c.get("gen_cpu") is None else f"{c['gen_cpu']:.0%}",
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
                "generator CPU",
            ],
            rows,
        )
    idle = [s for s in scenarios if s.kind == "idle"]
    unreachable = {k: why for k, why in meta["skipped"].items() if k.startswith("idle/")}
    if idle or unreachable:
        out += ["", "### Idle connections: server RSS per connection", ""]
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
                        _num(
                            None if c.get("rss_held_kib") is None else c["rss_held_kib"] / 1024, 1
                        ),
                        _num(c.get("opens_per_s")),
                    ]
                )
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
    out += ["", "### Checks", ""]
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
    return "\n".join(out) + "\n"

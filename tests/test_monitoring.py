"""The observability kit in monitoring/: alerts, a dashboard, and the metrics they read.

Alert rules fire when they should, the dashboard's queries parse, and both read only
metrics relayd really exposes.

The rules are checked and unit-tested with ``promtool`` (``promtool test rules`` runs
monitoring/prometheus/relayd-alerts.test.yml, series in and alerts out). ``./dev test``
unpacks promtool from Debian's prometheus package; without it these tests fail under
``CI=true`` and are skipped otherwise (:func:`tests.e2e.harness.require_tool`).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any, Final

import trio
from prometheus_client import generate_latest

from relayd.daemon.server import Server
from tests.client import connect, running, settings
from tests.e2e.harness import REPO_ROOT, require_tool

MONITORING: Final = REPO_ROOT / "monitoring"
RULES: Final = MONITORING / "prometheus" / "relayd-alerts.yml"
RULE_TESTS: Final = MONITORING / "prometheus" / "relayd-alerts.test.yml"
DASHBOARD: Final = MONITORING / "grafana" / "relayd.json"
PROMTOOL_TIMEOUT_S: Final = 60.0
#: Metrics only a relayd with ``[cluster] enabled`` has.
CLUSTER_ONLY: Final = frozenset({"relayd_cluster_broker_up"})
#: Every alert the issue asks for, by name.
ALERTS: Final = {
    "RelaydDown",
    "RelaydNotReady",
    "RelaydRefusingMessages",
    "RelaydSlowConsumers",
    "RelaydHandshakesRefused",
    "RelaydHandshakesDropped",
    "RelaydAtCapacity",
    "RelaydFileDescriptorsNearLimit",
    "RelaydReloadFailed",
    "RelaydLogLinesDropped",
    "RelaydInternalErrors",
    "RelaydBrokerDown",
}
_METRIC: Final = re.compile(r"\b(?:relayd|process)_[a-z_]+\b")


def promtool(*args: str, cwd: Path) -> str:
    """Run promtool; it must succeed. Returns what it printed."""
    tool = require_tool("promtool")
    result = subprocess.run(
        [str(tool), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def dashboard_queries() -> list[str]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_alert_rules_are_valid_and_pass_their_unit_tests() -> None:
    checked = promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=RULES.parent)
    assert "SUCCESS" in tested
    names = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE))
    assert names == ALERTS
    # Every alert is exercised by the unit tests, firing at least once.
    tests = RULE_TESTS.read_text()
    for name in ALERTS:
        assert f"alertname: {name}\n        exp_alerts:\n          - exp_labels" in tests, name


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses PromQL in rule files: each query becomes a recording rule, with
    # Grafana's variables replaced by what they stand for.
    queries = dashboard_queries()
    assert len(queries) >= 15
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for number, query in enumerate(queries):
        expr = query.replace("$__rate_interval", "1m").replace("$instance", ".+")
        lines += [f"      - record: dashboard:query{number}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard-queries.yml"
    rules.write_text("\n".join(lines) + "\n")
    checked = promtool("check", "rules", str(rules), cwd=tmp_path)
    assert f"SUCCESS: {len(queries)} rules found" in checked


def test_the_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert (dashboard["uid"], dashboard["title"]) == ("relayd", "relayd")
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]


async def test_every_metric_the_kit_reads_is_one_relayd_exposes() -> None:
    server = Server(settings())
    async with running(server) as url, connect(url) as a, connect(url) as b:
        await a.send(b.id, "hello")
        await b.recv()
        await trio.testing.wait_all_tasks_blocked()
    exposed = set()
    for line in generate_latest(server.registry).decode().splitlines():
        if line.startswith("# TYPE "):
            _hash, _type, name, kind = line.split()
            exposed.add(name)
            if kind == "histogram":
                exposed |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    used = set(_METRIC.findall(RULES.read_text()))
    for query in dashboard_queries():
        used |= set(_METRIC.findall(query))
    assert used - CLUSTER_ONLY <= exposed, sorted(used - CLUSTER_ONLY - exposed)
    assert "relayd_build_info" in used
    assert "relayd_config_last_reload_successful" in used

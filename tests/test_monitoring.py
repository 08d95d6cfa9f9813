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
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from relayd.daemon.server import Server
from relayd.routing.cluster.link import Health
from relayd.routing.cluster.metrics import ClusterCollector
from relayd.telemetry.metrics import Stats, StatsCollector
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
    "RelaydAddressAtConnectionLimit",
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


def exposed_names(source: Collector) -> set[str]:
    """Every series name a registry or collector exposes, a histogram's three included."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(source)
    exposed = set()
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("# TYPE "):
            _hash, _type, name, kind = line.split()
            exposed.add(name)
            if kind == "histogram":
                exposed |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return exposed


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
    exposed = exposed_names(server.registry)
    used = set(_METRIC.findall(RULES.read_text()))
    for query in dashboard_queries():
        used |= set(_METRIC.findall(query))
    assert used - CLUSTER_ONLY <= exposed, sorted(used - CLUSTER_ONLY - exposed)
    assert "relayd_build_info" in used
    assert "relayd_config_last_reload_successful" in used


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    # docs/operations.md's table lists relayd's own metrics, docs/scaling.md the cluster's
    # (by their names after relayd_cluster_); a metric added, renamed or dropped in the code
    # and not in the docs fails here.
    own = exposed_names(StatsCollector(Stats(), lambda: (0, 0, 0)))
    cluster = exposed_names(ClusterCollector(Health(), lambda: 0))
    assert own
    assert cluster
    assert not own & cluster
    operations = (REPO_ROOT / "docs" / "operations.md").read_text()
    table = set(re.findall(r"^\| `(relayd_[a-z_]*[a-z])[`{]", operations, re.MULTILINE))
    histograms = {name.removesuffix("_bucket") for name in own if name.endswith("_bucket")}
    assert table == {name for name in own if not name.endswith(("_bucket", "_sum", "_count"))}
    assert histograms <= table
    scaling = (REPO_ROOT / "docs" / "scaling.md").read_text()
    listed = re.search(r"Metrics\s+\(`/metrics`, all `relayd_cluster_\*`\):(.*?);", scaling, re.S)
    assert listed is not None
    names = {f"relayd_cluster_{name}" for name in re.findall(r"`([a-z_]+)`", listed[1])}
    assert names == cluster
    # Every relayd_ name any doc or the README mentions is one relayd exposes (a prefix
    # such as relayd_cluster_ stands for the cluster's).
    for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for name in set(_METRIC.findall(path.read_text())):
            if name.startswith("relayd_") and not name.endswith("_"):
                assert name in own | cluster, f"{path.name}: {name}"

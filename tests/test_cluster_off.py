"""With ``[cluster]`` off, nothing of the cluster is imported or paid for; on, it is there.

Each check runs in a fresh interpreter, as ``relayd serve`` starts: the command line, the
daemon and a :class:`~relayd.daemon.server.Server` built from the settings (which is where
the router is chosen), then a look at ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CLUSTER_MODULES = ("coredis", "anyio", "relayd.routing.cluster")

_PROBE = """
import json, sys
import relayd.cli, relayd.daemon.server, relayd.daemon.service
from pathlib import Path
from relayd.config_sources import load
from relayd.daemon.server import Server
settings = load(environ={environ}, default_path=Path("/nonexistent")).settings
server = Server(settings)
print(json.dumps({{
    "router": type(server.router).__name__,
    "loaded": sorted(m for m in sys.modules if m.startswith({modules!r})),
}}))
"""


def serve_and_look(environ: dict[str, str]) -> dict[str, object]:
    code = _PROBE.format(environ=environ, modules=CLUSTER_MODULES)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    found: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return found


def test_cluster_off_imports_none_of_it() -> None:
    found = serve_and_look({})
    assert found == {"router": "LocalRouter", "loaded": []}


@pytest.mark.parametrize("enabled", ["true"])
def test_cluster_on_brings_the_redis_client(enabled: str) -> None:
    found = serve_and_look({"RELAYD_CLUSTER__ENABLED": enabled})
    assert found["router"] == "ClusterRouter"
    loaded = found["loaded"]
    assert isinstance(loaded, list)
    assert "coredis" in loaded
    assert "relayd.routing.cluster.redis" in loaded

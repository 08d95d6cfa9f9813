"""With ``[cluster]`` off, nothing of the cluster is imported or paid for; on, it is there.

Each check runs in a fresh interpreter, as ``relayd serve`` starts: the command line, the
daemon and a :class:`~relayd.daemon.server.Server` built from the settings (which is where
the router is chosen), then a look at ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from relayd.config import ClusterSettings, Settings
from relayd.errors import ConfigError
from relayd.routing.factory import check_router_files

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


# -- what a start (and a reload) checks of [cluster] --------------------------------------


def test_a_ca_file_that_is_none_is_a_config_error(tmp_path: Path) -> None:
    # Not checked on reload, a broken CA file passed as "applied", and the next start
    # failed with exit 1 and a message about systemd's sockets (found by a reviewer).
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    for path, reason in [
        (bad, "NO_CERTIFICATE_OR_CRL_FOUND"),
        (tmp_path / "absent.pem", "No such"),
    ]:
        cluster = ClusterSettings(
            enabled=True, broker_url="rediss://127.0.0.1:6380/0", tls_ca_file=str(path)
        )
        with pytest.raises(ConfigError, match=reason) as error:
            check_router_files(Settings(cluster=cluster))
        assert error.value.key == "cluster.tls_ca_file"


_WITHOUT_COREDIS = """
import json, sys
sys.modules["coredis"] = None  # as where relayd is installed without relayd[cluster]
from relayd.config import ClusterSettings, Settings
from relayd.errors import ConfigError
from relayd.routing.factory import check_router_files
try:
    check_router_files(Settings(cluster=ClusterSettings(enabled=True)))
except ConfigError as error:
    print(json.dumps({"key": error.key, "message": str(error)}))
"""


def test_the_cluster_without_its_redis_client_is_a_config_error() -> None:
    # The Redis client is an extra (relayd[cluster]): a reload turning the cluster on
    # where it is not installed raised ImportError out of the signal task, and relayd
    # stopped, every client cut (found by a reviewer).
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_COREDIS],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    error = json.loads(result.stdout)
    assert error["key"] == "cluster.enabled"
    assert "install relayd[cluster]" in error["message"]

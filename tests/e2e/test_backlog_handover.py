"""A relayd that stops beside another on its port (``server.reuse_port``), in a namespace.

The clients waiting in the stopping one's backlog (their upgrade request sent, not yet
accepted) go to the other and get their ``101`` where ``net.ipv4.tcp_migrate_req`` is 1,
as ``install.sh --nodes`` sets it; where it is 0 the kernel resets every one of them,
which is what relayd's ``server.reuse_port`` warning is about. Each case runs
``tests/e2e/backlog_handover.py`` in a network namespace of its own (``unshare --net``),
so the setting is changed there only, never on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Final

from tests.e2e.backlog_handover import CLIENTS
from tests.e2e.harness import REPO_ROOT, require, require_tool

MIGRATE_REQ: Final = Path("/proc/sys/net/ipv4/tcp_migrate_req")
#: Two relayd starts, 40 clients, one drain: seconds; this bounds a hang.
SCENARIO_TIMEOUT_S: Final = 120.0


def handover(migrate: int) -> dict[str, object]:
    """Run the scenario with ``tcp_migrate_req`` = ``migrate``; its report."""
    require(os.geteuid() == 0, "a network namespace of its own (unshare --net) needs root")
    require(MIGRATE_REQ.exists(), "net.ipv4.tcp_migrate_req needs Linux 5.14 or later")
    unshare = require_tool("unshare")
    require_tool("ip")
    result = subprocess.run(
        # A PID namespace too, whose first process is the scenario: if it is killed (the
        # timeout), the kernel kills both relayd processes with it.
        [
            *(unshare, "--net", "--pid", "--fork", "--kill-child", "--mount-proc"),
            *(sys.executable, "-m", "tests.e2e.backlog_handover", str(migrate)),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=SCENARIO_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    report: dict[str, object] = json.loads(result.stdout.splitlines()[-1])
    # Some must have waited, or the case shows nothing: the kernel hashes about half of
    # the 40 to the full one, whose budget is a few sockets (4 here); at most 4 of 40 go
    # to one process about once in 10 million runs.
    waiting = report["waiting"]
    assert isinstance(waiting, int), report
    assert waiting > 0, report
    assert report["answered_before"] == {"101": CLIENTS - waiting}, report
    return report


def test_with_tcp_migrate_req_the_clients_waiting_for_a_stopping_relayd_go_to_the_other() -> None:
    report = handover(1)
    assert report["outcomes"] == {"101": report["waiting"]}, report


def test_without_it_the_kernel_resets_them_as_the_warning_says() -> None:
    report = handover(0)
    assert report["outcomes"] == {"reset": report["waiting"]}, report

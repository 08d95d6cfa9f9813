"""Several real relayd processes on loopback, nodes of one cluster sharing a test Redis.

Each node is the installed ``relayd`` command with a config file of its own: the public
and admin listeners on free ports, ``[cluster]`` on, and short probe timings so that the
failure tests find a broken link in well under a second. Nodes are stopped by their PIDs
(SIGTERM, or SIGKILL where a test kills one), like every process the tests start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .harness import RelaydProcess, relayd_command, relayd_env

__all__ = ["FAST_CLUSTER", "Node", "cluster", "start_node"]

#: [cluster] timings for tests: a probe every 100 ms, late after 500 ms; a silent node
#: gone after 1 s; answers awaited 1 s; retries within 300 ms.
FAST_CLUSTER: dict[str, Any] = {
    "probe_interval_s": 0.1,
    "probe_timeout_s": 0.5,
    "node_timeout_s": 1.0,
    "reply_timeout_s": 1.0,
    "reconnect_max_s": 0.3,
    "connect_timeout_s": 2.0,
}


class Node(RelaydProcess):
    """A relayd node: the process, its name, and its admin listener's address."""

    name = ""
    admin_port = 0

    def readyz(self) -> int:
        """The HTTP status of ``GET /readyz`` on the node's admin listener."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.admin_port}/readyz", timeout=5
            ) as response:
                status: int = response.status
                return status
        except urllib.error.HTTPError as error:
            return error.code

    def metrics(self) -> str:
        """The text of ``GET /metrics``."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5
        ) as response:
            text: str = response.read().decode()
            return text

    def wait_connected(self, times: int = 1) -> None:
        """Wait until the node has logged ``broker.connected`` ``times`` times."""
        self.wait_for(
            lambda _event: sum(e.get("event") == "broker.connected" for e in self.events) >= times,
            what=f"broker.connected {times} times",
        )

    def kill(self) -> None:
        """SIGKILL by PID: the node vanishes without a word, as a crash would."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.wait_exit()


def _toml(value: Any) -> str:
    return json.dumps(value)  # strings, numbers and booleans are spelled alike


def start_node(config_dir: Path, broker_url: str, name: str, **cluster: Any) -> Node:
    """Start node ``name`` and wait until it serves (not until its link is up)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    settings = {"enabled": True, "broker_url": broker_url, "node_name": name}
    settings |= FAST_CLUSTER | cluster
    lines = ["[admin]", "port = 0", "", "[cluster]"]
    lines += [f"{key} = {_toml(value)}" for key, value in settings.items()]
    config = config_dir / f"{name}.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = [
        *relayd_command(),
        "--host", "127.0.0.1",
        "--port", "0",
        "--log-format", "json",
        "--config", str(config),
    ]  # fmt: skip
    node = Node(argv, relayd_env())
    node.name = name
    try:
        node.wait_ready()
    except BaseException:
        node.kill()
        raise
    ready = node.wait_for_event("server.ready")
    node.admin_port = int(str(ready["admin"]).rsplit(":", 1)[1])
    return node


@contextlib.contextmanager
def cluster(
    config_dir: Path, broker_url: str, count: int = 2, **settings: Any
) -> Iterator[list[Node]]:
    """``count`` nodes n1, n2, … with their links up; each stopped cleanly afterwards.

    A node a test killed is not stopped again; every other must exit 0 on SIGTERM.
    """
    nodes: list[Node] = []
    try:
        for number in range(1, count + 1):
            nodes.append(start_node(config_dir, broker_url, f"n{number}", **settings))
        for node in nodes:
            node.wait_connected()
        yield nodes
    finally:
        for node in nodes:
            node.terminate()
        codes = [node.wait_exit() for node in nodes]
    for node, code in zip(nodes, codes, strict=True):
        if code != -signal.SIGKILL:
            node.assert_clean_stop(code)

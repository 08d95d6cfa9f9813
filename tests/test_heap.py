"""The garbage collector as the daemon sets it (relayd.daemon.heap), and that the daemon does.

What an operator would notice is the benchmark (docs/benchmarks.md, "Garbage collection"):
here, that start-up's objects are out of every later collection, that cycles made while
serving are still collected, and that ``relayd`` settles the heap once, after start-up and
before it serves. The first runs in a child interpreter: settling is process-wide, and the
test process keeps CPython's defaults.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

import relayd.cli
from relayd.daemon import heap
from tests.test_cli import MODULE, Daemon

CHILD = """
import gc, json, weakref
import relayd.cli  # everything the daemon imports at start-up
from relayd.daemon import heap

walked_before = len(gc.get_objects())
heap.settle()
walked_after = len(gc.get_objects())

class Node:
    pass

a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made while serving
gone = weakref.ref(a)
del a, b
gc.collect()
print(json.dumps({
    "frozen": gc.get_freeze_count(),
    "walked_before": walked_before,
    "walked_after": walked_after,
    "threshold": gc.get_threshold(),
    "cycle_collected": gone() is None,
}))
"""


def test_settling_takes_start_up_out_of_collections_and_still_collects_cycles() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True
    )
    seen = json.loads(done.stdout)
    # Start-up's objects (tens of thousands) are frozen: no collection walks them again.
    assert seen["frozen"] > 10_000
    assert seen["walked_after"] < seen["walked_before"] / 10
    assert seen["threshold"][0] == heap.YOUNG_THRESHOLD
    assert seen["cycle_collected"]


def test_the_daemon_settles_the_heap_once_after_start_up_and_before_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("RELAYD_") or n == "PORT"]:
        monkeypatch.delenv(name)
    calls: list[str] = []
    monkeypatch.setattr(heap, "settle", lambda: calls.append("settle"))
    monkeypatch.setattr(relayd.cli, "configure", lambda _settings: None)  # logging stays as is

    def run(*_args: Any, **_kwargs: Any) -> int:
        calls.append("serve")
        return 0

    monkeypatch.setattr(trio, "run", run)
    config = tmp_path / "relayd.toml"
    config.write_text("")
    assert relayd.cli.main(["--config", str(config), "--port", "0"]) == 0
    assert calls == ["settle", "serve"]
    calls.clear()
    assert relayd.cli.main(["--config", str(config), "check-config"]) == 0
    assert calls == []  # checking the settings serves nothing and leaves the heap alone


# -- the allocator -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "ignored", "wanted"),
    [
        ({"HOME": "/root"}, False, {"HOME": "/root", "PYTHONMALLOC": "malloc"}),
        ({"PYTHONMALLOC": "pymalloc"}, False, None),  # the operator's choice stands
        ({"PYTHONMALLOC": ""}, False, None),
        ({"HOME": "/root"}, True, None),  # python -E: the variable would not be read
    ],
)
def test_the_daemon_is_executed_again_with_malloc_only_when_nothing_chose_an_allocator(
    environ: dict[str, str], ignored: bool, wanted: dict[str, str] | None
) -> None:
    assert heap.restart_environment(environ, ignored=ignored) == wanted


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode().split("\0") if "=" in entry)


def _hangup_pending() -> None:
    # In the child, before it executes relayd: a SIGHUP that comes while it starts,
    # kept pending (blocked) as relayd keeps one across executing itself again.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    os.kill(os.getpid(), signal.SIGHUP)


@pytest.mark.parametrize("command", [[str(Path(sys.executable).parent / "relayd")], MODULE])
def test_relayd_serves_with_malloc_in_the_process_it_was_started_as_and_keeps_a_sighup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.delenv("PYTHONMALLOC", raising=False)
    config = tmp_path / "relayd.toml"
    config.write_text("")
    argv = [*command, "--config", str(config), "--port", "0", "--host", "127.0.0.1"]
    daemon = Daemon(argv, _hangup_pending)
    try:
        started = daemon.wait_event("server.start")
        # The same process (systemd's MAINPID), its command line as given.
        assert started["pid"] == daemon.proc.pid
        assert _environ(daemon.proc.pid)["PYTHONMALLOC"] == "malloc"
        assert Path(f"/proc/{daemon.proc.pid}/cmdline").read_bytes().split(b"\0")[-5:-1] == [
            arg.encode() for arg in argv[-4:]
        ]
        daemon.wait_event("server.ready")
        # The SIGHUP sent before relayd took its signals is a reload once it serves.
        reloaded = daemon.wait_event("config.reload")
        assert reloaded["applied"] is True
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.close()


def test_an_allocator_the_operator_chose_is_kept(tmp_path: Path) -> None:
    config = tmp_path / "relayd.toml"
    config.write_text("")
    daemon = Daemon(
        [*MODULE, "--config", str(config), "--port", "0", "--host", "127.0.0.1"],
        PYTHONMALLOC="pymalloc",
    )
    try:
        daemon.wait_event("server.ready")
        assert _environ(daemon.proc.pid)["PYTHONMALLOC"] == "pymalloc"
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.close()

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
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

import relayd.cli
from relayd.daemon import heap

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

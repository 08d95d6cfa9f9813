"""The package layout is the architecture: these tests read the imports and hold it there.

relayd's layers, lowest first (README, "Layout")::

    errors, config,         what everything may import (config_sources: where
    config_keys,            the settings come from; config_keys: their names)
    config_sources
    wire                    the I/O-free wire protocol
    policy                  I/O-free decisions: admission, auth, rate, timers
    telemetry               logs and metrics
    routing                 the Router interface, the table, the outbox, the routers
    daemon                  the server on trio
    cli                     the command line

and ``client`` apart, beside them. A module may import its own layer and the
ones below it, never one above; the rules below add what each layer must not
know even when it is below.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "relayd"

LAYERS = [
    "errors",
    "config",
    "config_keys",
    "config_sources",
    "wire",
    "policy",
    "telemetry",
    "routing",
    "daemon",
    "cli",
]
RANK = {
    "errors": 0,
    "config": 0,
    "config_keys": 0,
    "config_sources": 0,
    "wire": 1,
    "policy": 2,
    "telemetry": 3,
}
RANK |= {"routing": 4}
RANK |= {"daemon": 5, "cli": 6, "__main__": 7, "__init__": 0}


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(parts), path


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


ALL = dict(modules())


def test_the_package_has_the_layers_the_readme_draws() -> None:
    assert {layer(name) for name in ALL} == {*LAYERS, "client", "__init__", "__main__"}


@pytest.mark.parametrize("name", sorted(ALL))
def test_nothing_imports_a_layer_above_its_own(name: str) -> None:
    if layer(name) == "client":
        return  # apart: see test_the_client_side_stands_apart
    mine = RANK[layer(name)]
    above = sorted(
        target
        for target in imports(ALL[name])
        if target.startswith("relayd.")
        and target != "relayd.__version__"
        and layer(target) != "client"
        and RANK.get(layer(target), 0) > mine
    )
    assert above == [], f"{name} imports from a layer above its own"


@pytest.mark.parametrize(
    "name",
    sorted(
        n
        for n in ALL
        if layer(n) in {"wire", "policy", "errors", "config", "config_keys", "config_sources"}
    ),
)
def test_the_wire_protocol_and_policies_import_no_trio(name: str) -> None:
    assert not {t for t in imports(ALL[name]) if t.split(".")[0] in {"trio", "trio_websocket"}}


@pytest.mark.parametrize(
    "name",
    [
        "relayd.routing.table",
        "relayd.routing.outbox",
        "relayd.routing.replies",
        "relayd.daemon.intake",
        "relayd.telemetry.messages",
    ],
)
def test_the_routing_decisions_the_outbox_and_the_intake_are_pure(name: str) -> None:
    assert not {t for t in imports(ALL[name]) if t.split(".")[0] == "trio"}


@pytest.mark.parametrize("name", sorted(n for n in ALL if not n.startswith("relayd.routing")))
def test_only_the_routing_package_knows_a_router_by_its_class(name: str) -> None:
    # Everything else sees routers through relayd.routing.interface, and the
    # daemon gets its router from relayd.routing.factory.
    assert not {
        t
        for t in imports(ALL[name])
        if t.startswith(("relayd.routing.local", "relayd.routing.cluster"))
    }


@pytest.mark.parametrize("name", sorted(n for n in ALL if layer(n) == "client"))
def test_the_client_side_stands_apart(name: str) -> None:
    allowed = ("relayd.wire", "relayd.errors", "relayd.client", "relayd.__version__")
    server_side = sorted(
        t
        for t in imports(ALL[name])
        if (t.startswith("relayd.") and not t.startswith(allowed))
        or t.split(".")[0] in {"pydantic", "pydantic_settings", "structlog", "prometheus_client"}
        or t.split(".")[0] == "jwt"
    )
    assert server_side == []


def test_serving_imports_no_client_code() -> None:
    # In a fresh interpreter, as `relayd serve` starts: the command line and the
    # daemon load, and nothing of the client side (nor its WebSocket library).
    code = (
        "import sys, relayd.cli, relayd.daemon.server, relayd.daemon.service;"
        "print(sorted(m for m in sys.modules"
        " if m.startswith(('relayd.client', 'trio_websocket', 'wsproto'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"

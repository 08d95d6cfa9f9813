"""What is mutation-tested against what, and which mutants are excluded as equivalent.

Every I/O-free module of the wire protocol, policy and routing packages is
mutated and tested against its own unit test file only: a mutant that only a
socket test (or a 30-second timeout in one) notices counts as a survivor,
because the unit tests are the ones meant to pin the module's behaviour.

A module is I/O-free when it imports no trio; :func:`pure_modules_on_disk` finds
them, so a new pure module cannot be left out of :data:`MODULES` unnoticed
(``tests/test_mutation.py``). Modules with nothing to mutate are listed in
:data:`NOT_MUTATED` with the reason.

A mutant is named by where it is and what it changes, not by mutmut's number
(which shifts when the function changes): the file, the scope (function,
``Class.method``, constant or ``Class.field``), the source lines it changes and
what they become, each with surrounding whitespace removed and lines joined
by one space.
"""

from __future__ import annotations

import ast
import dataclasses
import tomllib
from pathlib import Path
from typing import Final

__all__ = [
    "EQUIVALENTS_FILE",
    "MIN_SCORE",
    "MODULES",
    "NOT_MUTATED",
    "PURE_PACKAGES",
    "Equivalent",
    "MutantId",
    "load_equivalents",
    "pure_modules_on_disk",
]

#: The score every module must reach, equivalent mutants left out (issue 14).
MIN_SCORE: Final = 0.95

#: Packages whose trio-free modules are the I/O-free core.
PURE_PACKAGES: Final = ("relayd/wire", "relayd/policy", "relayd/routing")

#: Each mutated module, and the one test file its mutants are tested against.
MODULES: Final = {
    "relayd/wire/frames.py": "tests/test_frames.py",
    "relayd/wire/masking.py": "tests/test_frames.py",
    "relayd/wire/server_frames.py": "tests/test_frames.py",
    "relayd/wire/handshake.py": "tests/test_handshake.py",
    "relayd/wire/dialects.py": "tests/test_dialects.py",
    "relayd/wire/lifecycle.py": "tests/test_lifecycle.py",
    "relayd/policy/admission.py": "tests/test_admission.py",
    "relayd/policy/ratelimit.py": "tests/test_ratelimit.py",
    "relayd/policy/auth.py": "tests/test_auth.py",
    "relayd/policy/timers.py": "tests/test_timers.py",
    "relayd/policy/failures.py": "tests/test_failures.py",
    "relayd/policy/weakening.py": "tests/test_weakening.py",
    "relayd/routing/table.py": "tests/test_routing_table.py",
    "relayd/routing/outbox.py": "tests/test_outbox.py",
    "relayd/routing/replies.py": "tests/test_replies.py",
    "relayd/routing/batch.py": "tests/test_batch.py",
    "relayd/routing/fanout.py": "tests/test_fanout.py",
    # The cluster's pure parts share one test file (broker codec, back-off, pending answers).
    "relayd/routing/cluster/codec.py": "tests/test_cluster_codec.py",
    "relayd/routing/cluster/backoff.py": "tests/test_cluster_codec.py",
    "relayd/routing/cluster/pending.py": "tests/test_cluster_codec.py",
    "relayd/routing/cluster/holder.py": "tests/test_cluster_holder.py",
}

#: Trio-free modules in :data:`PURE_PACKAGES` that are not mutated, and why.
NOT_MUTATED: Final = {
    "relayd/routing/factory.py": "composition, not logic: it builds the LocalRouter (on trio)",
    "relayd/routing/cluster/build.py": "composition, not logic: it builds the ClusterRouter",
    "relayd/routing/cluster/metrics.py": "exposition of the link's counters, not logic",
    # No trio, but coredis: they act on live connections, so tests/test_cluster_link.py
    # tests them against a real Redis.
    "relayd/routing/cluster/redis_connection.py": "coredis connections from the settings",
    "relayd/routing/cluster/redis_publisher.py": "publishing on a coredis connection",
}

EQUIVALENTS_FILE: Final = Path(__file__).with_name("equivalents.toml")


@dataclasses.dataclass(frozen=True, slots=True)
class MutantId:
    """Where a mutant is and what it changes; stable while that code is unchanged.

    Attributes:
        path: the mutated module, relative to the repository (``relayd/wire/frames.py``).
        scope: ``function``, ``Class.method``, ``CONSTANT`` or ``Class.field``.
        original: the source lines the mutant changes, stripped, joined by one space.
        mutated: what they become, the same way.
    """

    path: str
    scope: str
    original: str
    mutated: str


@dataclasses.dataclass(frozen=True, slots=True)
class Equivalent:
    """A mutant that behaves like the original, so no test can kill it."""

    mutant: MutantId
    reason: str


def load_equivalents(path: Path = EQUIVALENTS_FILE) -> list[Equivalent]:
    """Read the equivalent mutants.

    Raises:
        ValueError: an entry lacks a field, has an unknown one, names a module
            that is not mutated, or gives no one-line reason.
    """
    data = tomllib.loads(path.read_text())
    entries = data.pop("equivalent", [])
    if data:
        raise ValueError(f"{path}: unknown tables {sorted(data)}")
    fields = {"path", "scope", "original", "mutated", "reason"}
    equivalents = []
    for number, entry in enumerate(entries, 1):
        where = f"{path}: equivalent #{number}"
        if set(entry) != fields:
            raise ValueError(f"{where}: has {sorted(entry)}, needs {sorted(fields)}")
        if not all(isinstance(entry[name], str) and entry[name] for name in fields):
            raise ValueError(f"{where}: every field is a non-empty string")
        if entry["path"] not in MODULES:
            raise ValueError(f"{where}: {entry['path']} is not a mutated module")
        if "\n" in entry["reason"]:
            raise ValueError(f"{where}: the reason is one line")
        mutant = MutantId(entry["path"], entry["scope"], entry["original"], entry["mutated"])
        equivalents.append(Equivalent(mutant, entry["reason"]))
    return equivalents


def _imports_trio(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(name == "trio" or name.startswith("trio.") for name in names):
            return True
    return False


def pure_modules_on_disk(root: Path) -> set[str]:
    """The modules of :data:`PURE_PACKAGES` under ``root`` that import no trio."""
    found = set()
    for package in PURE_PACKAGES:
        for module in sorted((root / package).rglob("*.py")):
            if module.name != "__init__.py" and not _imports_trio(module.read_text()):
                found.add(module.relative_to(root).as_posix())
    return found

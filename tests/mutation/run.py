"""``./dev mutation [MODULE ...]``: mutation testing of the I/O-free core, on one core.

For each module of :data:`~tests.mutation.plan.MODULES` (or those named:
``frames``, ``relayd/wire/frames.py`` or ``relayd.wire.frames``):

1. mutmut 3 mutates the module's functions and methods and runs, for each
   mutant, the tests of the module's own test file that call the mutated
   function (``mutmut run --max-children 1``);
2. the mutants mutmut does not make (:mod:`tests.mutation.skipped`) are run
   one by one against the same test file, in a process each;
3. the score is killed / (all - equivalent), equivalent mutants being those
   listed in ``tests/mutation/equivalents.toml``; every other survivor is printed
   with its file, line, scope and the lines it changes.

A mutant counts as killed when a test fails, errors or times out; one that no
test reaches counts as a survivor. Hypothesis runs with a fixed seed, so the
figures are the same from run to run.

The work happens in ``.mutation/<module>/`` (a copy of ``relayd/`` and
``tests/``), made afresh every time: mutmut's own cache would keep verdicts
from before a test changed. The exit status is 1 if a module scores under
95% or an equivalents entry is stale (it matches no mutant, or a killed one).

Resource handling: the one child process at a time (mutmut, or pytest for one
mutant) is waited for; a pytest run that outlives its timeout is killed by
:func:`subprocess.run`, and the mutant counts as killed by timeout.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from tests.mutation.plan import (
    MIN_SCORE,
    MODULES,
    Equivalent,
    MutantId,
    load_equivalents,
)
from tests.mutation.skipped import SkippedMutant, skipped_mutants

ROOT: Final = Path(__file__).resolve().parents[2]
WORK: Final = ROOT / ".mutation"

#: mutmut's exit codes for a mutant that a test caught: failed, errored, timed
#: out (its own marker, or SIGXCPU in any of its spellings), killed by a signal.
_CAUGHT: Final = frozenset({1, 3, 36, 24, -24, 152, 255, -9, -11})
#: mutmut's "no tests" (33) and "survived" (0): nothing failed.
_UNCAUGHT: Final = frozenset({0, 5, 33})
_PYTEST_ARGS: Final = (
    "-p",
    "no:cacheprovider",
    "-p",
    "tests.mutation.pytest_plugin",
    "--hypothesis-seed=0",
)
#: A mutant's pytest run may take this many times as long as the clean run,
#: plus the constant, before it counts as killed by timeout (mutmut's own rule).
_TIMEOUT_FACTOR: Final = 15.0
_TIMEOUT_CONSTANT_S: Final = 10.0
_SEPARATOR: Final = "ǁ"  # mutmut's, between class and method in a mutant's name


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """One mutant's fate; ``line`` is where it is in the original module."""

    mutant: MutantId
    line: int
    caught: bool
    by_mutmut: bool


@dataclasses.dataclass(slots=True)
class ModuleResult:
    """Every verdict for one module, and how the equivalents file applies to them."""

    path: str
    verdicts: list[Verdict]
    equivalent: list[Verdict] = dataclasses.field(default_factory=list)
    survivors: list[Verdict] = dataclasses.field(default_factory=list)

    @property
    def killed(self) -> int:
        """Mutants a test caught."""
        return sum(v.caught for v in self.verdicts)

    @property
    def score(self) -> float:
        """Killed over all mutants less the equivalent ones."""
        counted = len(self.verdicts) - len(self.equivalent)
        return self.killed / counted if counted else 1.0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns its exit status."""
    parser = argparse.ArgumentParser(
        prog="./dev mutation", description="Mutation testing of relayd's I/O-free core."
    )
    parser.add_argument("modules", nargs="*", metavar="MODULE", help="default: every module")
    args = parser.parse_args(argv)
    try:
        paths = select(args.modules)
    except ValueError as exc:
        parser.error(str(exc))
    equivalents = load_equivalents()
    results = []
    for path in paths:
        result = run_module(path, MODULES[path])
        judge(result, equivalents)
        print_module(result)
        results.append(result)
    stale = stale_equivalents(results, equivalents)
    print_summary(results, stale)
    return 0 if all(r.score >= MIN_SCORE for r in results) and not stale else 1


def select(names: Iterable[str]) -> list[str]:
    """The module paths named, in :data:`MODULES` order; all of them if none.

    A module is named by its path, dotted name or last part: ``relayd/wire/frames.py``,
    ``relayd.wire.frames`` or ``frames``.

    Raises:
        ValueError: a name matches no module.
    """
    wanted = list(names)
    if not wanted:
        return list(MODULES)
    chosen = set()
    for name in wanted:
        matches = [
            path
            for path in MODULES
            if name in {path, path.removesuffix(".py").replace("/", "."), Path(path).stem}
        ]
        if not matches:
            raise ValueError(f"no such module: {name} (choose from {', '.join(MODULES)})")
        chosen.update(matches)
    return [path for path in MODULES if path in chosen]


# -- running -----------------------------------------------------------------------


def run_module(path: str, test_file: str) -> ModuleResult:
    """Mutate ``path`` and run ``test_file`` against each mutant: mutmut's, then ours."""
    work = WORK / path.removesuffix(".py").replace("/", ".")
    shutil.rmtree(work, ignore_errors=True)
    print(f"==> {path} against {test_file}", flush=True)
    started = time.monotonic()
    caught, survivors = _run_mutmut(work / "mutmut", path, test_file)
    # Tests that measure memory are skipped under mutmut's trampolines (see
    # tests/mutation/pytest_plugin.py); each survivor gets a plain run too.
    plain = PlainRunner(work / "plain", path, test_file)
    verdicts = caught + plain.judge(survivors)
    _print_counts("mutmut", verdicts, time.monotonic() - started)
    started = time.monotonic()
    skipped = plain.judge(skipped_mutants(path, plain.source))
    _print_counts("skipped by mutmut", skipped, time.monotonic() - started)
    return ModuleResult(path, verdicts + skipped)


def _copy_project(into: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "node_modules", ".hypothesis")
    shutil.copytree(ROOT / "relayd", into / "relayd", ignore=ignore)
    # All of tests/, for the helpers conftest.py and the test files import.
    shutil.copytree(ROOT / "tests", into / "tests", ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", into / "pyproject.toml")


def _run_mutmut(
    work: Path, path: str, test_file: str
) -> tuple[list[Verdict], list[FunctionMutant]]:
    """Run mutmut; the mutants it saw caught, and the others, to be run plainly."""
    _copy_project(work)
    # pyproject.toml has no [tool.mutmut], so mutmut reads setup.cfg.
    lines = [
        "[mutmut]",
        "source_paths = relayd",
        f"only_mutate = {path}",
        f"pytest_add_cli_args_test_selection = {test_file}",
        "pytest_add_cli_args =",
        *(f"    {arg}" for arg in _PYTEST_ARGS),
        "use_git_change_detection = false",
    ]
    (work / "setup.cfg").write_text("\n".join(lines) + "\n")
    mutmut = Path(sys.executable).with_name("mutmut")
    log = work / "mutmut.log"
    with log.open("w") as out:
        status = subprocess.run(
            [str(mutmut), "run", "--max-children", "1"],
            cwd=work,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    if status != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"mutmut failed ({status}); the end of {log}:\n" + "\n".join(tail))
    meta = json.loads((work / "mutants" / f"{path}.meta").read_text())
    codes: dict[str, int | None] = meta["exit_code_by_key"]
    mutants = mutmut_mutants(
        path, (ROOT / path).read_text(), (work / "mutants" / path).read_text(), list(codes)
    )
    caught, survivors = [], []
    for key, code in codes.items():
        if code not in _CAUGHT and code not in _UNCAUGHT:
            raise SystemExit(f"{key}: mutmut left it {code!r} (not run or suspicious); see {log}")
        mutant = mutants[key]
        if code in _CAUGHT:
            caught.append(Verdict(mutant.id, mutant.line, caught=True, by_mutmut=True))
        else:
            survivors.append(mutant)
    return caught, survivors


class PlainRunner:
    """Runs the test file against mutants applied to a copy of the module, a process each.

    Args:
        work: where the copy of relayd/ and tests/ goes.
        path: the module to mutate.
        test_file: the tests to run.

    Raises:
        SystemExit: the tests fail on the unmutated copy.
    """

    def __init__(self, work: Path, path: str, test_file: str) -> None:
        _copy_project(work)
        self._target = work / path
        self.source = self._target.read_text()
        self._command = [sys.executable, "-m", "pytest", "-x", "-q", *_PYTEST_ARGS, test_file]
        self._cwd = work
        self._env = {**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1"}
        started = time.monotonic()
        if not self._passes(None):
            raise SystemExit(f"{test_file} fails on the unmutated code (in {work})")
        clean_s = time.monotonic() - started
        self._timeout = clean_s * _TIMEOUT_FACTOR + _TIMEOUT_CONSTANT_S

    def judge(self, mutants: Iterable[SkippedMutant | FunctionMutant]) -> list[Verdict]:
        """A verdict for each mutant; the module is left as it was."""
        verdicts = []
        try:
            for mutant in mutants:
                self._target.write_text(mutant.apply(self.source))
                caught = not self._passes(self._timeout)
                by_mutmut = isinstance(mutant, FunctionMutant)
                verdicts.append(Verdict(mutant.id, mutant.line, caught, by_mutmut))
        finally:
            self._target.write_text(self.source)
        return verdicts

    def _passes(self, timeout: float | None) -> bool:
        try:
            run = subprocess.run(
                self._command, cwd=self._cwd, env=self._env, capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return False
        return run.returncode == 0


# -- naming mutmut's mutants ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class FunctionMutant:
    """One of mutmut's mutants, as a function to put in place of the original.

    Attributes:
        id: what and where, as named in ``equivalents.toml``.
        line: the first line it changes in the original module.
        first: the original function's first line (its ``def``), 1-based.
        last: its last line.
        lines: the mutated function, named like the original.
    """

    id: MutantId
    line: int
    first: int
    last: int
    lines: tuple[str, ...]

    def apply(self, source: str) -> str:
        """The module with this mutant in place of its function."""
        lines = source.splitlines()
        return "\n".join([*lines[: self.first - 1], *self.lines, *lines[self.last :]]) + "\n"


def mutmut_mutants(
    path: str, source: str, mutated_source: str, keys: Iterable[str]
) -> dict[str, FunctionMutant]:
    """Each of mutmut's mutants, named by what it changes, ready to apply to ``source``.

    Args:
        path: the module, relative to the repository.
        source: the module as written.
        mutated_source: the module as mutmut rewrote it, every mutant a function
            named ``x_<function>__mutmut_<n>`` or ``xǁ<Class>ǁ<method>__mutmut_<n>``
            beside the unmutated ``...__mutmut_orig``.
        keys: mutmut's names of the mutants, ``<module>.<function name>``.
    """
    generated = _functions(ast.parse(mutated_source))
    originals = _functions(ast.parse(source))
    lines = mutated_source.splitlines()
    mutants = {}
    for key in keys:
        name = key.rpartition(".")[2]
        stem = name.partition("__mutmut_")[0]
        if stem.startswith("x" + _SEPARATOR):
            cls, _, function = stem[2:].partition(_SEPARATOR)
            scope = f"{cls}.{function}"
        else:
            scope = function = stem.removeprefix("x_")
        before = _lines_of(lines, generated[stem + "__mutmut_orig"], function)
        after = _lines_of(lines, generated[name], function)
        matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
        removed, added, first = [], [], None
        for tag, a0, a1, b0, b1 in matcher.get_opcodes():
            if tag != "equal":
                removed += before[a0:a1]
                added += after[b0:b1]
                first = a0 if first is None else first
        assert first is not None, f"{key} changes nothing"
        original = originals[scope.replace(".", _SEPARATOR)]
        assert original.end_lineno is not None
        mutants[key] = FunctionMutant(
            MutantId(path, scope, _join(removed), _join(added)),
            original.lineno + first,
            original.lineno,
            original.end_lineno,
            tuple(after),
        )
    return mutants


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    """Functions by name, methods as ``Classǁmethod``."""
    found: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef):
                    found[member.name] = member
                    found[f"{node.name}{_SEPARATOR}{member.name}"] = member
    return found


def _lines_of(
    lines: list[str], function: ast.FunctionDef | ast.AsyncFunctionDef, name: str
) -> list[str]:
    assert function.end_lineno is not None
    found = lines[function.lineno - 1 : function.end_lineno]
    # The generated functions differ from the original only in their names.
    return [found[0].replace(function.name, name, 1), *found[1:]]


def _join(lines: Iterable[str]) -> str:
    return " ".join(line.strip() for line in lines if line.strip())


# -- judging and reporting -----------------------------------------------------------


def judge(result: ModuleResult, equivalents: Sequence[Equivalent]) -> None:
    """Split ``result``'s survivors into equivalent ones and the rest."""
    listed = {e.mutant for e in equivalents}
    for verdict in result.verdicts:
        if not verdict.caught:
            (result.equivalent if verdict.mutant in listed else result.survivors).append(verdict)


def stale_equivalents(
    results: Sequence[ModuleResult], equivalents: Sequence[Equivalent]
) -> list[tuple[Equivalent, str]]:
    """Entries for the modules run that match no mutant, or only killed ones."""
    run = {r.path for r in results}
    caught = {v.mutant: v.caught for r in results for v in r.verdicts}
    stale = []
    for entry in equivalents:
        if entry.mutant.path not in run:
            continue
        if entry.mutant not in caught:
            stale.append((entry, "matches no mutant"))
        elif caught[entry.mutant]:
            stale.append((entry, "is killed by a test: not equivalent"))
    return stale


def _print_counts(kind: str, verdicts: Sequence[Verdict], seconds: float) -> None:
    killed = sum(v.caught for v in verdicts)
    print(
        f"    {kind}: {len(verdicts)} mutants, {killed} killed, "
        f"{len(verdicts) - killed} survived ({seconds:.0f} s)",
        flush=True,
    )


def print_module(result: ModuleResult) -> None:
    """The module's score and each survivor not listed as equivalent."""
    print(
        f"    score {result.score:.1%}: {result.killed} of {len(result.verdicts)} killed, "
        f"{len(result.equivalent)} equivalent, {len(result.survivors)} survived"
    )
    for v in sorted(result.survivors, key=lambda v: v.line):
        origin = "" if v.by_mutmut else "  (skipped by mutmut)"
        print(f"    survived: {v.mutant.path}:{v.line} in {v.mutant.scope}{origin}")
        print(f"        - {v.mutant.original}")
        print(f"        + {v.mutant.mutated}")
    print(flush=True)


def print_summary(results: Sequence[ModuleResult], stale: Sequence[tuple[Equivalent, str]]) -> None:
    """One line per module, then the stale equivalents entries."""
    width = max(len(r.path) for r in results)
    print(f"{'module':{width}}  mutants  killed  equivalent  survived   score")
    for r in results:
        mark = "" if r.score >= MIN_SCORE else f"  (under {MIN_SCORE:.0%})"
        print(
            f"{r.path:{width}}  {len(r.verdicts):7}  {r.killed:6}  {len(r.equivalent):10}  "
            f"{len(r.survivors):8}  {r.score:6.1%}{mark}"
        )
    for entry, why in stale:
        m = entry.mutant
        print(f"stale entry in equivalents.toml ({m.path}, {m.scope}: {m.mutated!r}) {why}")


if __name__ == "__main__":
    sys.exit(main())

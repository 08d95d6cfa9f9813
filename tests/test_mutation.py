"""``./dev mutation`` (tests/mutation/) kept from rotting without running mutmut.

mutmut itself is only installed by ``./dev mutation``; these tests check what
would go wrong quietly: a pure module left out of the run, a test file that
no longer exists, an equivalents entry naming code that is gone, the AST pass
mutating what mutmut already does (or missing what it does not), and the
reading of mutmut's generated functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.mutation.plan import (
    MODULES,
    NOT_MUTATED,
    Equivalent,
    MutantId,
    load_equivalents,
    pure_modules_on_disk,
)
from tests.mutation.run import (
    ModuleResult,
    Verdict,
    judge,
    mutmut_mutants,
    select,
    stale_equivalents,
)
from tests.mutation.skipped import skipped_mutants

ROOT = Path(__file__).resolve().parents[1]


# -- the plan ----------------------------------------------------------------------


def test_every_pure_module_is_mutated_or_says_why_not() -> None:
    pure = pure_modules_on_disk(ROOT)
    assert set(MODULES) | set(NOT_MUTATED) == pure
    assert not set(MODULES) & set(NOT_MUTATED)


def test_a_module_importing_trio_is_not_pure(tmp_path: Path) -> None:
    package = tmp_path / "relayd" / "routing"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pure.py").write_text("import math\n")
    (package / "waits.py").write_text("from trio.lowlevel import ParkingLot\n")
    assert pure_modules_on_disk(tmp_path) == {"relayd/routing/pure.py"}


def test_each_module_has_its_own_test_file() -> None:
    for module, test_file in MODULES.items():
        assert (ROOT / module).is_file(), module
        assert (ROOT / test_file).is_file(), test_file


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("frames", ["relayd/wire/frames.py"]),
        ("relayd.policy.admission", ["relayd/policy/admission.py"]),
        ("relayd/routing/table.py", ["relayd/routing/table.py"]),
    ],
)
def test_a_module_is_named_by_path_dotted_name_or_stem(name: str, expected: list[str]) -> None:
    assert select([name]) == expected


def test_no_names_selects_every_module_and_a_wrong_one_is_refused() -> None:
    assert select([]) == list(MODULES)
    with pytest.raises(ValueError, match="no such module: framez"):
        select(["framez"])


# -- the equivalents file ----------------------------------------------------------


def _scopes(source: str) -> set[str]:
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            for member in node.body:
                if isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(f"{node.name}.{member.name}")
                elif isinstance(member, ast.AnnAssign | ast.Assign):
                    targets = member.targets if isinstance(member, ast.Assign) else [member.target]
                    names |= {f"{node.name}.{t.id}" for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign | ast.Assign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _has_lines(source: str, original: str) -> bool:
    lines = [line.strip() for line in source.splitlines() if line.strip()]
    return any(
        " ".join(lines[i:j]) == original
        for i in range(len(lines))
        for j in range(i + 1, min(i + 8, len(lines)) + 1)
    )


def test_every_equivalent_names_real_code_and_gives_a_reason() -> None:
    for entry in load_equivalents():
        mutant = entry.mutant
        source = (ROOT / mutant.path).read_text()
        assert mutant.scope in _scopes(source), mutant
        assert _has_lines(source, mutant.original), mutant
        assert mutant.mutated != mutant.original, mutant
        assert len(entry.reason) > 10, mutant


def test_equivalents_of_code_mutmut_skips_are_mutants_the_ast_pass_makes() -> None:
    made = {m.id for path in MODULES for m in skipped_mutants(path, (ROOT / path).read_text())}
    skipped_scopes = {m.scope for m in made}
    for entry in load_equivalents():
        if entry.mutant.scope in skipped_scopes:
            assert entry.mutant in made, entry.mutant


def test_an_equivalents_entry_must_be_complete(tmp_path: Path) -> None:
    bad = tmp_path / "equivalents.toml"
    bad.write_text(
        '[[equivalent]]\npath = "relayd/wire/frames.py"\nscope = "_unmask"\n'
        'original = "if not n:"\nmutated = "if n:"\n'
    )
    with pytest.raises(ValueError, match="needs"):
        load_equivalents(bad)
    bad.write_text(
        '[[equivalent]]\npath = "relayd/daemon/gate.py"\nscope = "x"\n'
        'original = "a"\nmutated = "b"\nreason = "because"\n'
    )
    with pytest.raises(ValueError, match="not a mutated module"):
        load_equivalents(bad)


# -- the AST pass over what mutmut skips ---------------------------------------------

_SAMPLE = '''\
"""A module."""

import functools

__all__ = ["LIMIT", "Box"]

LIMIT: int = 256
NAME = "relay"


class Box:
    """A box."""

    __slots__ = ("size",)
    kind: str = "small"

    def grow(self) -> int:
        return self.size + 1

    @staticmethod
    def make() -> int:
        return 2

    @property
    def full(self) -> bool:
        return self.size >= LIMIT


@functools.lru_cache(maxsize=8)
def cached(n: int) -> bool:
    return n < 3
'''


def _mutants(source: str) -> dict[tuple[str, str], MutantId]:
    return {(m.id.scope, m.id.mutated): m.id for m in skipped_mutants("m.py", source)}


def test_the_ast_pass_mutates_constants_fields_and_decorated_functions() -> None:
    made = _mutants(_SAMPLE)
    assert set(made) == {
        ("LIMIT", "LIMIT: int = 257"),
        ("NAME", 'NAME = "XXrelayXX"'),
        ("Box.kind", 'kind: str = "XXsmallXX"'),
        ("Box.full", "return self.size > LIMIT"),
        ("cached", "return n <= 3"),
        ("cached", "return n < 4"),
    }
    assert made[("LIMIT", "LIMIT: int = 257")].original == "LIMIT: int = 256"


def test_each_ast_mutant_applies_to_exactly_what_it_names() -> None:
    for mutant in skipped_mutants("m.py", _SAMPLE):
        mutated = mutant.apply(_SAMPLE)
        ast.parse(mutated)
        changed = [
            line.strip()
            for old, line in zip(_SAMPLE.splitlines(), mutated.splitlines(), strict=True)
            if old != line
        ]
        assert changed == [mutant.id.mutated]


def test_the_ast_pass_keeps_precedence_when_a_mutant_binds_looser() -> None:
    source = "X = (1 if A else 2) * 3\nY = not A or B\n"
    for mutant in skipped_mutants("m.py", source):
        tree = ast.parse(mutant.apply(source))
        assert isinstance(tree.body[0], ast.Assign)
    forced = _mutants(source)
    assert ("Y", "Y = A or B") in forced
    assert ("Y", "Y = not A and B") in forced


# -- reading mutmut's output -------------------------------------------------------

_ORIGINAL = """\
def check(n):
    return n < 3


class Gate:
    def open(self, origin):
        if origin is not None:
            return 403
        return None
"""

# What mutmut 3 writes: the unmutated copy and each mutant beside it, renamed.
_GENERATED = """\
def x_check__mutmut_orig(n):
    return n < 3


def x_check__mutmut_1(n):
    return n <= 3


class Gate:
    def xǁGateǁopen__mutmut_orig(self, origin):
        if origin is not None:
            return 403
        return None

    def xǁGateǁopen__mutmut_1(self, origin):
        if origin is None:
            return 403
        return None

    def xǁGateǁopen__mutmut_2(self, origin):
        if origin is not None:
            return 404
        return None
"""


def test_mutmut_mutants_are_named_by_scope_and_change_with_their_line() -> None:
    keys = ["m.x_check__mutmut_1", "m.xǁGateǁopen__mutmut_1", "m.xǁGateǁopen__mutmut_2"]
    mutants = mutmut_mutants("m.py", _ORIGINAL, _GENERATED, keys)
    found = {key: (m.id, m.line) for key, m in mutants.items()}
    assert found["m.x_check__mutmut_1"] == (
        MutantId("m.py", "check", "return n < 3", "return n <= 3"),
        2,
    )
    assert found["m.xǁGateǁopen__mutmut_1"] == (
        MutantId("m.py", "Gate.open", "if origin is not None:", "if origin is None:"),
        7,
    )
    assert found["m.xǁGateǁopen__mutmut_2"] == (
        MutantId("m.py", "Gate.open", "return 403", "return 404"),
        8,
    )


def test_a_mutmut_mutant_applies_to_the_module_as_written() -> None:
    keys = ["m.xǁGateǁopen__mutmut_2"]
    applied = mutmut_mutants("m.py", _ORIGINAL, _GENERATED, keys)[keys[0]].apply(_ORIGINAL)
    assert applied == _ORIGINAL.replace("return 403", "return 404")


# -- scoring -------------------------------------------------------------------------


def test_listed_equivalents_leave_the_score_and_stale_ones_are_reported() -> None:
    a = MutantId("relayd/wire/frames.py", "f", "x < 1", "x <= 1")
    b = MutantId("relayd/wire/frames.py", "f", "x < 1", "x < 2")
    c = MutantId("relayd/wire/frames.py", "f", "y = 1", "y = 2")
    verdicts = [Verdict(a, 1, caught=False, by_mutmut=True), Verdict(b, 1, True, True)]
    verdicts += [Verdict(c, 2, caught=True, by_mutmut=False)] * 18
    result = ModuleResult("relayd/wire/frames.py", verdicts)
    listed = [Equivalent(a, "the same"), Equivalent(b, "wrongly listed")]
    judge(result, listed)
    assert result.score == 1.0
    assert result.survivors == []
    gone = Equivalent(MutantId("relayd/wire/frames.py", "g", "z", "w"), "code removed")
    assert stale_equivalents([result], [*listed, gone]) == [
        (listed[1], "is killed by a test: not equivalent"),
        (gone, "matches no mutant"),
    ]

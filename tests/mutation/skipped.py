"""The mutants mutmut never makes, made by a small AST pass of our own.

mutmut 3 mutates the bodies of functions and methods only (it swaps each
function for a trampoline that picks the mutant at call time). It leaves alone:

* module constants (``MAX_ID_CHARS = 256``, ``_FIN = 0x80``, a frozenset of
  close codes) and type aliases carrying limits (``Annotated[str,
  msgspec.Meta(max_length=...)]``);
* class bodies: dataclass and struct field defaults (``echo: bool = False``),
  field constraints, enum values, class keywords (``tag="welcome"``);
* decorated functions other than plain ``@staticmethod``/``@classmethod``:
  properties, ``functools.lru_cache``.

Yet these hold documented limits and wire values. :func:`skipped_mutants` makes
mutants of them with mutmut's own operators (numbers + 1, strings wrapped in
``XX``, ``True``/``False`` swapped, comparison, boolean, arithmetic and unary
operators swapped or dropped, a call argument set to None or removed, a
conditional expression forced down each arm); ``tests/mutation/run.py`` runs
the module's test file against each, one process per mutant.

Left out on purpose: docstrings, imports, ``__all__`` (pinned by the API
tests), ``__slots__`` (a wrong slot fails at the first assignment, whatever
the tests), ``TypeVar`` names (no run-time effect), decorators and plain
annotations (not run, except ``Annotated`` metadata, which msgspec enforces).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
from collections.abc import Iterator
from typing import Final, TypeVar

from tests.mutation.plan import MutantId

__all__ = ["SkippedMutant", "skipped_mutants"]

_N = TypeVar("_N", bound=ast.AST)

_UNCHANGED_NAMES: Final = frozenset({"__all__", "__slots__"})
_PLAIN_DECORATORS: Final = frozenset({"staticmethod", "classmethod"})
#: mutmut leaves these calls' arguments alone; so do we.
_CALLS_NOT_MUTATED: Final = frozenset({"len", "isinstance"})

_BINARY: Final[dict[type[ast.operator], type[ast.operator]]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.Div,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.BitXor: ast.BitAnd,
    ast.Pow: ast.Mult,
}
_COMPARE: Final[dict[type[ast.cmpop], type[ast.cmpop]]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}


@dataclasses.dataclass(frozen=True, slots=True)
class SkippedMutant:
    """One mutant of a module's source, applied as a text replacement.

    Attributes:
        id: what and where, as named in ``equivalents.toml``.
        line: the first line it changes, for people.
        start: where the replaced text starts, as an offset in the source.
        end: where it ends.
        replacement: the text put in its place.
    """

    id: MutantId
    line: int
    start: int
    end: int
    replacement: str

    def apply(self, source: str) -> str:
        """The mutated module."""
        return source[: self.start] + self.replacement + source[self.end :]


def skipped_mutants(path: str, source: str) -> list[SkippedMutant]:
    """Every mutant of ``source`` (the module at ``path``) that mutmut does not make."""
    tree = ast.parse(source)
    maker = _Maker(path, source, tree)
    for scope, root in _roots(tree):
        for node in _walk(root):
            for mutated in _mutations(node):
                maker.add(scope, node, mutated)
    return maker.mutants


# -- what mutmut skips -------------------------------------------------------------


def _roots(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """The subtrees mutmut does not mutate, each with the scope it belongs to."""
    for statement in _code(tree.body):
        if isinstance(statement, ast.ClassDef):
            for keyword in statement.keywords:
                yield statement.name, keyword.value
            for member in _code(statement.body):
                yield from _statement_roots(member, f"{statement.name}.")
        else:
            yield from _statement_roots(statement, "")


def _statement_roots(statement: ast.stmt, prefix: str) -> Iterator[tuple[str, ast.AST]]:
    if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
        if _mutmut_skips(statement):
            for inner in _code(statement.body):
                yield prefix + statement.name, inner
    elif isinstance(statement, ast.Assign | ast.AnnAssign):
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        names = [target.id for target in targets if isinstance(target, ast.Name)]
        name = names[0] if names else "<module>"
        if name in _UNCHANGED_NAMES or _is_typevar(statement.value):
            return
        if statement.value is not None:
            yield prefix + name, statement.value
        if isinstance(statement, ast.AnnAssign):
            for metadata in _annotated_metadata(statement.annotation):
                yield prefix + name, metadata
    elif not isinstance(statement, ast.Import | ast.ImportFrom | ast.ClassDef):
        yield prefix + "<module>", statement


def _code(body: list[ast.stmt]) -> list[ast.stmt]:
    """``body`` without its docstring."""
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        return body[1:]
    return body


def _mutmut_skips(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    decorators = function.decorator_list
    if not decorators:
        return False
    only = decorators[0]
    return not (
        len(decorators) == 1 and isinstance(only, ast.Name) and only.id in _PLAIN_DECORATORS
    )


def _is_typevar(value: ast.expr | None) -> bool:
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and value.func.id == "TypeVar"
    )


def _annotated_metadata(annotation: ast.expr) -> Iterator[ast.expr]:
    for node in ast.walk(annotation):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id == "Annotated"
            and isinstance(node.slice, ast.Tuple)
        ):
            yield from node.slice.elts[1:]


def _walk(root: ast.AST) -> Iterator[ast.AST]:
    """``root`` and the nodes below it that run.

    Nested definitions and annotations are left out, and so are the parts of
    f-strings, which have no reliable positions before Python 3.12.
    """
    yield root
    if isinstance(root, ast.JoinedStr):
        return
    for child in ast.iter_child_nodes(root):
        if not isinstance(
            child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.arg | ast.arguments
        ):
            yield from _walk(child)


# -- the operators -----------------------------------------------------------------


def _mutations(node: ast.AST) -> Iterator[ast.AST]:
    """Mutated copies of ``node`` itself (its children are visited separately)."""
    if isinstance(node, ast.Constant):
        yield from _constant_mutations(node)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        yield _replace(node, op=_BINARY[type(node.op)]())
    elif isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.Not | ast.Invert):
            yield node.operand
        elif isinstance(node.op, ast.USub | ast.UAdd):
            yield _replace(node, op=ast.UAdd() if isinstance(node.op, ast.USub) else ast.USub())
    elif isinstance(node, ast.BoolOp):
        yield _replace(node, op=ast.Or() if isinstance(node.op, ast.And) else ast.And())
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            ops = list(node.ops)
            ops[i] = _COMPARE[type(op)]()
            yield _replace(node, ops=ops)
    elif isinstance(node, ast.Call):
        yield from _call_mutations(node)
    elif isinstance(node, ast.IfExp):
        forced: list[tuple[ast.boolop, bool]] = [(ast.And(), False), (ast.Or(), True)]
        for bool_op, literal in forced:
            yield _replace(node, test=ast.BoolOp(bool_op, [node.test, ast.Constant(literal)]))
    elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
        none = isinstance(node.value, ast.Constant) and node.value.value is None
        yield _replace(node, value=ast.Constant("" if none else None))


def _constant_mutations(node: ast.Constant) -> Iterator[ast.Constant]:
    value = node.value
    if isinstance(value, bool):
        yield ast.Constant(not value)
    elif isinstance(value, int | float):
        yield ast.Constant(value + 1)
    elif isinstance(value, str):
        yield ast.Constant(f"XX{value}XX")
    elif isinstance(value, bytes):
        yield ast.Constant(b"XX" + value + b"XX")


def _call_mutations(node: ast.Call) -> Iterator[ast.Call]:
    if isinstance(node.func, ast.Name) and node.func.id in _CALLS_NOT_MUTATED:
        return
    for i, arg in enumerate(node.args):
        if not isinstance(arg, ast.Starred) and not _is_none(arg):
            args = list(node.args)
            args[i] = ast.Constant(None)
            yield _replace(node, args=args)
    for i, keyword in enumerate(node.keywords):
        if keyword.arg is not None and not _is_none(keyword.value):
            keywords = list(node.keywords)
            keywords[i] = ast.keyword(keyword.arg, ast.Constant(None))
            yield _replace(node, keywords=keywords)
    if len(node.args) + len(node.keywords) > 1:
        for i in range(len(node.args)):
            yield _replace(node, args=node.args[:i] + node.args[i + 1 :])
        for i in range(len(node.keywords)):
            yield _replace(node, keywords=node.keywords[:i] + node.keywords[i + 1 :])


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _replace(node: _N, **changes: object) -> _N:
    new = copy.copy(node)
    for name, value in changes.items():
        setattr(new, name, value)
    return new


# -- turning a mutated node into text ----------------------------------------------


class _Maker:
    """Places mutated nodes into the source as text, checked by parsing it back."""

    def __init__(self, path: str, source: str, tree: ast.Module) -> None:
        self.path = path
        self.source = source
        self.tree = tree
        self.lines = source.splitlines(keepends=True)
        self.offsets = [0]
        for line in self.lines:
            self.offsets.append(self.offsets[-1] + len(line))
        self.parents = {
            id(child): (parent, name)
            for parent in ast.walk(tree)
            for name, value in ast.iter_fields(parent)
            for child in (value if isinstance(value, list) else [value])
            if isinstance(child, ast.AST)
        }
        self.mutants: list[SkippedMutant] = []

    def add(self, scope: str, node: ast.AST, mutated: ast.AST) -> None:
        lineno, col, end_lineno, end_col = _span(node)
        start, end = self._offset(lineno, col), self._offset(end_lineno, end_col)
        expected = self._dump_with(node, mutated)
        text = _unparse(mutated, self.source[start:end])
        for replacement in (text, f"({text})"):
            candidate = self.source[:start] + replacement + self.source[end:]
            if ast.dump(ast.parse(candidate)) == expected:
                break
        else:
            raise AssertionError(f"{self.path}:{lineno}: cannot place {text!r}")
        first, last = self.offsets[lineno - 1], self.offsets[end_lineno]
        original = _normalise(self.source[first:last])
        changed = _normalise(self.source[first:start] + replacement + self.source[end:last])
        mutant_id = MutantId(self.path, scope, original, changed)
        self.mutants.append(SkippedMutant(mutant_id, lineno, start, end, replacement))

    def _offset(self, lineno: int, col_bytes: int) -> int:
        line = self.lines[lineno - 1]
        return self.offsets[lineno - 1] + len(line.encode()[:col_bytes].decode())

    def _dump_with(self, node: ast.AST, mutated: ast.AST) -> str:
        parent, name = self.parents[id(node)]
        value = getattr(parent, name)
        if isinstance(value, list):
            swapped = [mutated if item is node else item for item in value]
            setattr(parent, name, swapped)
        else:
            setattr(parent, name, mutated)
        try:
            return ast.dump(self.tree)
        finally:
            setattr(parent, name, value)


def _unparse(node: ast.AST, original: str) -> str:
    text = ast.unparse(node)
    # Keep a string's double quotes as written, so a mutant reads like its line.
    if original.lstrip("rbRB").startswith('"') and text.count("'") == 2 and '"' not in text:
        text = text.replace("'", '"')
    return text


def _span(node: ast.AST) -> tuple[int, int, int, int]:
    span = (
        getattr(node, "lineno", None),
        getattr(node, "col_offset", None),
        getattr(node, "end_lineno", None),
        getattr(node, "end_col_offset", None),
    )
    assert all(isinstance(part, int) for part in span), f"{node!r} has no position"
    return span  # type: ignore[return-value]


def _normalise(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())

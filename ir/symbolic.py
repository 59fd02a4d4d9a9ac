"""Closed forms (sympy) of the keys each query sees, per primitive.

For interval-like primitives the keys of a query coordinate ``q`` on one axis
are the progression ``first(q), first(q) + step, ..., last(q)`` (empty when
``last < first``); grid primitives give one progression per grid axis (their
product is the key set), flat primitives one over the flat index. Primitives
with no interval (global tokens, documents, block layouts) get a membership
predicate over lookup tables instead; primitives whose data are given at call
time get a :class:`Runtime` rule, which only names them. Parameters may be ints (specialised and
simplified by sympy) or sympy symbols (the general formula, for reading).

:func:`to_code` prints an expression as integer-exact Python or numpy code;
the analysis evaluates those strings, and the lowering prints them into
kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import sympy
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pycode import PythonCodePrinter

from attncc.ir.grid import Grid
from attncc.ir.nodes import (
    PRIMITIVES,
    Axial,
    Band,
    BlockDiagonal,
    BlockSparse,
    Causal,
    Congruent,
    Dense,
    Document,
    GlobalTokens,
    Intersection,
    KeyRange,
    Neighborhood,
    Pattern,
    RuntimePrimitive,
    SlidingWindow,
    Strided,
    Union,
)
from attncc.ir.validate import neighborhood_axes

Num = int | sympy.Expr

q = sympy.Symbol("q", integer=True, nonnegative=True)
k = sympy.Symbol("k", integer=True, nonnegative=True)


def _div(a: Num, b: Num) -> sympy.Expr:
    return sympy.floor(sympy.sympify(a) / b)


@dataclass(frozen=True)
class Progression:
    """Keys ``first, first + step, ..., last`` seen by coordinate ``q`` on one axis."""

    first: sympy.Expr
    last: sympy.Expr
    step: sympy.Expr

    def code(self, numpy: bool = False) -> dict[str, str]:
        return {name: to_code(getattr(self, name), numpy) for name in ("first", "last", "step")}


def neighborhood_progression(
    length: Num, window: Num, dilation: Num = 1, stride: Num = 1, causal: bool = False
) -> Progression:
    """NATTEN's generalized neighborhood window of coordinate ``q`` on one axis."""
    group = sympy.Mod(q, dilation)
    qi = _div(q, dilation)  # position inside the dilation group
    group_len = _div(length - group + dilation - 1, dilation)
    if causal:
        leader = qi if stride == 1 else sympy.Min(_div(qi, stride) * stride + stride - 1, group_len - 1)
        first = group + dilation * sympy.Max(leader - window + 1, 0)
        return Progression(first, q, sympy.sympify(dilation))  # the window ends at the query
    left = _div(window, 2)
    right = window - 1 - left
    # With stride 1 the leader is the query itself, already inside the group.
    leader = qi if stride == 1 else sympy.Min(_div(qi, stride) * stride + _div(stride, 2), group_len - 1)
    centre = sympy.Min(sympy.Max(leader, left), group_len - 1 - right)
    first, last = group + dilation * (centre - left), group + dilation * (centre + right)
    return Progression(first, last, sympy.sympify(dilation))


def band_progression(length: Num, left: Num, right: Num) -> Progression:
    """Sliding window ``[q - left, q + right]`` cut to ``[0, length - 1]``."""
    first = sympy.Max(q - left, 0) if left else q
    last = sympy.Min(q + right, length - 1) if right else q
    return Progression(first, last, sympy.Integer(1))


def offset_progression(length: Num, lo: Num | None, hi: Num | None) -> Progression:
    """Keys ``q + lo .. q + hi`` cut to ``[0, length - 1]`` (``None``: open); empty past a border."""
    first = sympy.Integer(0) if lo is None else sympy.Max(q + lo, 0)
    last = sympy.sympify(length) - 1 if hi is None else sympy.Min(q + hi, length - 1)
    return Progression(first, last, sympy.Integer(1))


def key_progression(length: Num, lo: Num | None, hi: Num | None) -> Progression:
    """Keys ``lo .. hi`` whatever ``q`` is (``None``: open), cut to ``[0, length - 1]``."""
    first = sympy.Integer(0) if lo is None else sympy.Max(sympy.sympify(lo), 0)
    last = sympy.sympify(length) - 1 if hi is None else sympy.Min(sympy.sympify(hi), length - 1)
    return Progression(first, last, sympy.Integer(1))


def block_progression(length: Num, block: Num) -> Progression:
    """The keys of ``q``'s block of ``block`` coordinates (the last block may be short)."""
    start = _div(q, block) * block
    return Progression(start, sympy.Min(start + block - 1, length - 1), sympy.Integer(1))


def strided_progression(length: Num, stride: Num, offset: Num = 0) -> Progression:
    """Keys ``k`` with ``(q - k) % stride == offset``: the residue class of ``q - offset``."""
    first = sympy.Mod(q - offset, stride)
    last = length - 1 - sympy.Mod(length - 1 - q + offset, stride)
    return Progression(first, last, sympy.sympify(stride))


def full_progression(length: Num) -> Progression:
    return Progression(sympy.Integer(0), sympy.sympify(length) - 1, sympy.Integer(1))


def point_progression() -> Progression:
    return Progression(q, q, sympy.Integer(1))


# --- rules: a pattern as closed forms ---------------------------------------------


@dataclass(frozen=True)
class GridBox:
    """Keys are the product over grid axes of one progression per axis."""

    axes: tuple[Progression, ...]


@dataclass(frozen=True)
class FlatRange:
    """Keys are one progression over the flat index."""

    range: Progression


@dataclass(frozen=True)
class Predicate:
    """Keys ``k`` where ``expr(q, k)`` holds; ``tables`` name its lookup functions."""

    expr: sympy.Basic
    tables: tuple[tuple[str, tuple], ...]


@dataclass(frozen=True)
class Runtime:
    """Keys the call's data keep (Note [Runtime data] in attncc.ir.nodes): no closed form; the
    kernel reads ``node``'s normalised data (attncc.runtime.data; Note [Runtime plans] in
    attncc.lower.plan)."""

    node: RuntimePrimitive


@dataclass(frozen=True)
class AnyOf:
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class AllOf:
    rules: tuple[Rule, ...]


# The primitives whose data a call gives (by their NAME), in the order of the kernels' arguments.
RUNTIME_KINDS = tuple(name for name, cls in PRIMITIVES.items() if issubclass(cls, RuntimePrimitive))

Rule = GridBox | FlatRange | Predicate | Runtime | AnyOf | AllOf


def has_runtime(rule: Rule) -> bool:
    """Whether ``rule`` reads data given at call time."""
    if isinstance(rule, Runtime):
        return True
    return isinstance(rule, (AnyOf, AllOf)) and any(has_runtime(r) for r in rule.rules)


def rules(p: Pattern, grid: Grid) -> Rule:
    """The closed-form rule of a head-independent pattern on ``grid``."""
    n = grid.size
    if isinstance(p, RuntimePrimitive):
        return Runtime(p)
    if isinstance(p, Dense):
        return GridBox(tuple(full_progression(s) for s in grid.shape))
    if isinstance(p, Neighborhood):
        params = [(size, *axis) for size, axis in zip(grid.shape, neighborhood_axes(p, grid.rank))]
        return GridBox(tuple(neighborhood_progression(*args) for args in params))
    if isinstance(p, Axial):
        axes = p.axes if p.axes is not None else range(grid.rank)
        boxes = tuple(
            GridBox(
                tuple(
                    full_progression(s) if b == a else point_progression() for b, s in enumerate(grid.shape)
                )
            )
            for a in axes
        )
        return boxes[0] if len(boxes) == 1 else AnyOf(boxes)
    if isinstance(p, (Band, BlockDiagonal, Congruent, KeyRange)):
        return GridBox(
            tuple(
                _axis_progression(p, size) if a == p.axis else full_progression(size)
                for a, size in enumerate(grid.shape)
            )
        )
    if isinstance(p, SlidingWindow):
        return FlatRange(band_progression(n, p.left, p.right))
    if isinstance(p, Causal):
        return FlatRange(Progression(sympy.Integer(0), q, sympy.Integer(1)))
    if isinstance(p, Strided):
        return FlatRange(strided_progression(n, p.stride, p.offset))
    if isinstance(p, GlobalTokens):
        is_global = sympy.Function("is_global")
        flags = tuple(int(i in set(p.indices)) for i in range(n))
        return Predicate(
            sympy.Or(sympy.Eq(is_global(q), 1), sympy.Eq(is_global(k), 1)), (("is_global", flags),)
        )
    if isinstance(p, Document):
        doc = sympy.Function("doc")
        return Predicate(sympy.Eq(doc(q), doc(k)), (("doc", p.ids),))
    if isinstance(p, BlockSparse):
        layout = sympy.Function("layout")
        cell = layout(_div(q, p.block), _div(k, p.block))
        return Predicate(sympy.Eq(cell, 1), (("layout", p.layout),))
    if isinstance(p, Union):
        return AnyOf(tuple(rules(op, grid) for op in p.operands))
    if isinstance(p, Intersection):
        return AllOf(tuple(rules(op, grid) for op in p.operands))
    raise TypeError(f"{type(p).__name__} has no closed form; resolve heads first")


def _axis_progression(p: Band | BlockDiagonal | Congruent | KeyRange, length: Num) -> Progression:
    """The progression of a one-axis primitive on its axis."""
    if isinstance(p, Band):
        return offset_progression(length, p.lo, p.hi)
    if isinstance(p, KeyRange):
        return key_progression(length, p.lo, p.hi)
    if isinstance(p, BlockDiagonal):
        return block_progression(length, p.block)
    return strided_progression(length, p.modulus, p.offset)


def offset_reach(rule: Rule, grid: Grid) -> tuple[int, ...]:
    """Per grid axis, a bound on ``|k_a - q_a|`` over the pairs ``rule`` keeps: exact for a
    box of progressions (the largest offset any query's keys reach on that axis), the axis's
    length less one where the rule does not bound it (flat ranges on a grid of rank > 1,
    predicates); the least over an intersection's rules, the greatest over a union's."""
    if isinstance(rule, GridBox):
        return tuple(_progression_reach(p, size) for p, size in zip(rule.axes, grid.shape))
    if isinstance(rule, FlatRange) and grid.rank == 1:
        return (_progression_reach(rule.range, grid.size),)
    if isinstance(rule, (AnyOf, AllOf)):
        parts = [offset_reach(r, grid) for r in rule.rules]
        pick = max if isinstance(rule, AnyOf) else min
        return tuple(pick(p[a] for p in parts) for a in range(grid.rank))
    return tuple(size - 1 for size in grid.shape)


def _progression_reach(prog: Progression, length: int) -> int:
    """The largest ``|k - q|`` of a key ``k`` in the progression of some ``q`` in ``[0, length)``."""
    qs = np.arange(length, dtype=np.int64)
    first, last = (to_numpy(e)(qs) for e in (prog.first, prog.last))
    kept = first <= last
    if not kept.any():
        return 0
    return int(max((qs - first)[kept].max(), (last - qs)[kept].max(), 0))


# --- printing ----------------------------------------------------------------------


class _IntegerPrinter(PythonCodePrinter):
    """Prints integer expressions with ``//`` and ``%`` so results stay exact."""

    def __init__(self, min_name: str, max_name: str) -> None:
        super().__init__({"fully_qualified_modules": False})
        self._min, self._max = min_name, max_name

    def _print_floor(self, expr: sympy.Expr) -> str:
        num, den = sympy.fraction(sympy.together(expr.args[0]))
        if den == 1:
            return self._print(num)
        return f"({self._operand(num)} // {self._operand(den, strict=True)})"

    def _print_Mod(self, expr: sympy.Expr) -> str:
        a, b = expr.args
        return f"({self._operand(a)} % {self._operand(b, strict=True)})"

    def _operand(self, expr: sympy.Expr, strict: bool = False) -> str:
        """An operand of ``//`` or ``%`` (same precedence as ``*``), bracketed when needed."""
        return self.parenthesize(expr, PRECEDENCE["Mul"], strict=strict)

    def _minmax(self, name: str, args: tuple) -> str:
        out = self._print(args[0])
        for a in args[1:]:
            out = f"{name}({out}, {self._print(a)})"
        return out

    def _print_Min(self, expr: sympy.Expr) -> str:
        return self._minmax(self._min, expr.args)

    def _print_Max(self, expr: sympy.Expr) -> str:
        return self._minmax(self._max, expr.args)

    def _print_Rational(self, expr: sympy.Expr) -> str:
        if expr.q != 1:
            raise ValueError(f"non-integer constant {expr} in an index expression")
        return str(expr.p)


def to_code(expr: sympy.Expr, numpy: bool = False, min_name: str = "", max_name: str = "") -> str:
    """Integer-exact code for ``expr``: Python (``min``/``max``), numpy
    (``minimum``/``maximum``) or any dialect that names its own min and max
    (the Triton templates use ``tl.minimum``/``tl.maximum``)."""
    default = ("minimum", "maximum") if numpy else ("min", "max")
    return _IntegerPrinter(min_name or default[0], max_name or default[1]).doprint(expr)


def to_numpy(expr: sympy.Expr) -> Callable[[np.ndarray], np.ndarray]:
    """A vectorised function of ``q`` (int64 arrays) evaluating ``expr`` exactly."""
    fn = eval(f"lambda q: {to_code(expr, numpy=True)}", {"minimum": np.minimum, "maximum": np.maximum})
    return lambda qs: np.broadcast_to(np.asarray(fn(qs), dtype=np.int64), np.shape(qs))


def describe(rule: Rule, indent: str = "") -> list[str]:
    """Readable lines: each axis's closed form as code, predicates as sympy text."""
    if isinstance(rule, GridBox):
        return [
            f"{indent}axis {a}: k_{a} in [{to_code(p.first)}, {to_code(p.last)}] step {to_code(p.step)}"
            for a, p in enumerate(rule.axes)
        ]
    if isinstance(rule, FlatRange):
        p = rule.range
        return [f"{indent}flat: k in [{to_code(p.first)}, {to_code(p.last)}] step {to_code(p.step)}"]
    if isinstance(rule, Predicate):
        return [f"{indent}keep if {rule.expr}"]
    if isinstance(rule, Runtime):
        return [f"{indent}keep if the call's data say so: {rule.node} (data: {' or '.join(rule.node.DATA)})"]
    head = "any of:" if isinstance(rule, AnyOf) else "all of:"
    return [f"{indent}{head}"] + [line for r in rule.rules for line in describe(r, indent + "  ")]

"""FlexAttention ``mask_mod`` functions derived from the pattern IR.

A peer must be given exactly our pattern, for every case, so the mask_mod is
not written by hand: it evaluates the closed-form rules of
:func:`attncc.ir.symbolic.rules` (the same forms the analysis and lowering
use) with torch operations on the flat indices FlexAttention passes in. That
keeps it traceable by ``vmap`` and ``torch.compile``: integer arithmetic,
comparisons and lookups into captured tensors, no Python branches on values.
Tests hold it against the brute-force oracle of :mod:`attncc.ir.mask`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce

import sympy
import torch
from sympy.core.function import AppliedUndef

from attncc.ir.canonical import canonicalize, resolve_heads
from attncc.ir.grid import Grid
from attncc.ir.nodes import Dense, Pattern
from attncc.ir.symbolic import AllOf, AnyOf, FlatRange, GridBox, Predicate, Progression, Rule, k, q, rules
from attncc.ir.validate import validate

Value = torch.Tensor | int
KeepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _minimum(a: Value, b: Value) -> Value:
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    if isinstance(a, int):
        a, b = b, a
    return torch.clamp(a, max=b) if isinstance(b, int) else torch.minimum(a, b)


def _maximum(a: Value, b: Value) -> Value:
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    if isinstance(a, int):
        a, b = b, a
    return torch.clamp(a, min=b) if isinstance(b, int) else torch.maximum(a, b)


Env = dict[sympy.Symbol, Value]
Tables = dict[str, torch.Tensor]
Fn = Callable[[Env, Tables], Value]


def _compiled(expr: sympy.Basic) -> Fn:
    """An integer (or boolean) sympy expression of ``q``/``k`` as a function of torch operations.

    Note [No sympy under tracing]: every sympy step (``together``, ``fraction``, the argument
    walk) happens here, once; the function only adds, multiplies and compares, so Dynamo
    traces it inside FlexAttention (evaluating sympy there failed: Dynamo cannot trace sympy).
    Division only appears as ``floor`` of a fraction (see ``_div`` in :mod:`attncc.ir.symbolic`),
    so everything stays in exact integer arithmetic.
    """
    if expr.is_Integer:
        value = int(expr)
        return lambda env, tables: value
    if expr.is_Symbol:
        return lambda env, tables: env[expr]
    if isinstance(expr, sympy.floor):
        num, den = (_compiled(e) for e in sympy.fraction(sympy.together(expr.args[0])))
        return lambda env, tables: num(env, tables) // den(env, tables)
    if isinstance(expr, sympy.Eq):
        lhs, rhs = _compiled(expr.lhs), _compiled(expr.rhs)
        return lambda env, tables: lhs(env, tables) == rhs(env, tables)
    if isinstance(expr, sympy.Mod):
        a, m = (_compiled(e) for e in expr.args)
        return lambda env, tables: a(env, tables) % m(env, tables)
    if isinstance(expr, AppliedUndef):
        name, args = expr.func.__name__, [_compiled(a) for a in expr.args]
        return lambda env, tables: tables[name][tuple(a(env, tables) for a in args)]
    combine = next((f for kind, f in _COMBINE if isinstance(expr, kind)), None)
    if combine is None:
        raise TypeError(f"no torch form for {type(expr).__name__} in {expr}")
    parts = [_compiled(a) for a in expr.args]
    return lambda env, tables: reduce(combine, (p(env, tables) for p in parts))


_COMBINE = (
    (sympy.Add, lambda a, b: a + b),
    (sympy.Mul, lambda a, b: a * b),
    (sympy.Min, _minimum),
    (sympy.Max, _maximum),
    (sympy.Or, lambda a, b: a | b),
    (sympy.And, lambda a, b: a & b),
)


def _progression(prog: Progression) -> Callable[[torch.Tensor, torch.Tensor, Tables], torch.Tensor]:
    """``keep(key, query)`` of a progression of keys per query."""
    first, last, step = (_compiled(getattr(prog, f)) for f in ("first", "last", "step"))
    exact = prog.step == 1

    def keep(key: torch.Tensor, query: torch.Tensor, tables: Tables) -> torch.Tensor:
        env = {q: query}
        lo = first(env, tables)
        inside = (key >= lo) & (key <= last(env, tables))
        return inside if exact else inside & ((key - lo) % step(env, tables) == 0)

    return keep


def _keep_fn(rule: Rule, grid: Grid, device: torch.device) -> KeepFn:
    """``keep(q_idx, kv_idx)`` of a rule, on broadcastable flat-index tensors."""
    if isinstance(rule, GridBox):
        axes = [(_progression(prog), size, st) for prog, size, st in zip(rule.axes, grid.shape, grid.strides)]

        def box(qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
            terms = [keep((ki // st) % size, (qi // st) % size, {}) for keep, size, st in axes]
            return reduce(lambda a, b: a & b, terms)

        return box
    if isinstance(rule, FlatRange):
        keep = _progression(rule.range)
        return lambda qi, ki: keep(ki, qi, {})
    if isinstance(rule, Predicate):
        tables = {name: torch.tensor(values, device=device) for name, values in rule.tables}
        fn = _compiled(rule.expr)
        return lambda qi, ki: fn({q: qi, k: ki}, tables)  # type: ignore[return-value]
    parts = [_keep_fn(r, grid, device) for r in rule.rules]
    combine = (lambda a, b: a | b) if isinstance(rule, AnyOf) else (lambda a, b: a & b)
    assert isinstance(rule, (AnyOf, AllOf))
    return lambda qi, ki: reduce(combine, (part(qi, ki) for part in parts))


def mask_mod(
    pattern: Pattern, grid: Grid, heads: int | None = None, device: torch.device | str = "cpu"
) -> tuple[MaskMod | None, int]:
    """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` of ``pattern`` and the head count its
    block mask needs (1 when every head shares the pattern). ``None`` for a dense pattern:
    FlexAttention then runs with no block mask, as a user would call it."""
    heads = validate(pattern, grid, heads)
    per_head = [canonicalize(p, grid) for p in resolve_heads(pattern, heads)]
    distinct = list(dict.fromkeys(per_head))
    device = torch.device(device)
    fns = [_keep_fn(rules(p, grid), grid, device) for p in distinct]
    if len(distinct) == 1:
        if isinstance(distinct[0], Dense):
            return None, 1
        fn = fns[0]
        return (lambda b, h, qi, ki: fn(qi, ki)), 1
    group = torch.tensor([distinct.index(p) for p in per_head], device=device)

    def by_head(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        return reduce(lambda a, c: a | c, ((group[h] == i) & fn(qi, ki) for i, fn in enumerate(fns)))

    return by_head, heads

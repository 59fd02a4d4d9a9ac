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


def _evaluate(expr: sympy.Basic, env: dict[sympy.Symbol, Value], tables: dict[str, torch.Tensor]) -> Value:
    """An integer (or boolean) sympy expression of ``q``/``k`` as torch operations.

    Division only appears as ``floor`` of a fraction (see ``_div`` in
    :mod:`attncc.ir.symbolic`), so everything stays in exact integer arithmetic.
    """
    ev = lambda e: _evaluate(e, env, tables)  # noqa: E731
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return env[expr]
    if isinstance(expr, sympy.Add):
        return reduce(lambda a, b: a + b, map(ev, expr.args))
    if isinstance(expr, sympy.Mul):
        return reduce(lambda a, b: a * b, map(ev, expr.args))
    if isinstance(expr, sympy.floor):
        num, den = sympy.fraction(sympy.together(expr.args[0]))
        return ev(num) // ev(den)
    if isinstance(expr, sympy.Mod):
        return ev(expr.args[0]) % ev(expr.args[1])
    if isinstance(expr, sympy.Min):
        return reduce(_minimum, map(ev, expr.args))
    if isinstance(expr, sympy.Max):
        return reduce(_maximum, map(ev, expr.args))
    if isinstance(expr, sympy.Eq):
        return ev(expr.lhs) == ev(expr.rhs)
    if isinstance(expr, sympy.Or):
        return reduce(lambda a, b: a | b, map(ev, expr.args))
    if isinstance(expr, sympy.And):
        return reduce(lambda a, b: a & b, map(ev, expr.args))
    if isinstance(expr, AppliedUndef):
        return tables[expr.func.__name__][tuple(ev(a) for a in expr.args)]
    raise TypeError(f"no torch form for {type(expr).__name__} in {expr}")


def _in_progression(key: torch.Tensor, query: torch.Tensor, prog: Progression, tables) -> torch.Tensor:
    env = {q: query}
    first, last, step = (_evaluate(getattr(prog, f), env, tables) for f in ("first", "last", "step"))
    keep = (key >= first) & (key <= last)
    return keep if step == 1 else keep & ((key - first) % step == 0)


def _keep_fn(rule: Rule, grid: Grid, device: torch.device) -> KeepFn:
    """``keep(q_idx, kv_idx)`` of a rule, on broadcastable flat-index tensors."""
    if isinstance(rule, GridBox):
        axes = list(zip(rule.axes, grid.shape, grid.strides))

        def box(qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
            terms = [
                _in_progression((ki // st) % size, (qi // st) % size, prog, {}) for prog, size, st in axes
            ]
            return reduce(lambda a, b: a & b, terms)

        return box
    if isinstance(rule, FlatRange):
        return lambda qi, ki: _in_progression(ki, qi, rule.range, {})
    if isinstance(rule, Predicate):
        tables = {name: torch.tensor(values, device=device) for name, values in rule.tables}
        return lambda qi, ki: _evaluate(rule.expr, {q: qi, k: ki}, tables)  # type: ignore[return-value]
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

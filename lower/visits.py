"""How many KV tiles a plan's kernel visits: the denominator of its tile-level bound.

These mirror the kernel's range arithmetic on the host (see Note [KV iteration]
in :mod:`attncc.lower.plan`), for the bound the benchmarks report and for tests.
"""

from __future__ import annotations

import itertools
import math
from functools import cache
from types import CodeType, SimpleNamespace

import numpy as np

from attncc.lower.plan import AxisForm, KernelPlan

# The range forms are Triton expressions; on the host tl.minimum/maximum are numpy's.
_HOST = {"tl": SimpleNamespace(minimum=np.minimum, maximum=np.maximum)}


@cache
def _code(expr: str) -> CodeType:
    return compile(expr, "<range form>", "eval")  # forms printed by lowering


def _form(expr: str, i: np.ndarray, lg: int) -> np.ndarray:
    return eval(_code(expr), _HOST, {"i": i, "Lg": lg}) + i * 0


def _per_group(plan: KernelPlan, term: tuple[AxisForm, ...]) -> list[list[tuple[dict, int, int]]]:
    """Per dilation group, per axis: ``(bounds, kv_tile, group_length)``.

    ``bounds`` holds the forms at every Q tile's first and last row, shaped to
    broadcast over the three axes: ``first_lo``/``last_hi`` (the tile's key
    range) and ``first_hi``/``last_lo`` (the keys every row sees).
    """
    out = []
    for group in itertools.product(*(range(d) for d in plan.dilation)):
        axes = []
        for a, (axis, lg, t_q) in enumerate(zip(term, plan.group_lengths(group), plan.q_tile)):  # type: ignore[arg-type]
            lo = np.arange(math.ceil(lg / t_q)) * t_q
            hi = np.minimum(lo + t_q - 1, lg - 1)
            shape = [1, 1, 1]
            shape[a] = len(lo)
            bounds = {
                "first_lo": _form(axis.first, lo, lg),
                "last_hi": _form(axis.last, hi, lg),
                "first_hi": _form(axis.first, hi, lg),
                "last_lo": _form(axis.last, lo, lg),
            }
            axes.append(({k: v.reshape(shape) for k, v in bounds.items()}, plan.kv_tile[a], lg))
        out.append(axes)
    return out


def _union_count(boxes: list[list[tuple[np.ndarray, np.ndarray]]]) -> np.ndarray | int:
    """Per Q tile, the tiles in the union of boxes (per box, per axis ``(lo, hi)`` tile indices)."""
    total: np.ndarray | int = 0
    for size in range(1, len(boxes) + 1):  # inclusion-exclusion over the boxes
        for subset in itertools.combinations(boxes, size):
            count: np.ndarray | int = 1
            for a in range(3):
                lo = np.maximum.reduce([box[a][0] for box in subset])
                hi = np.minimum.reduce([box[a][1] for box in subset])
                count = count * np.maximum(hi - lo + 1, 0)
            total = total + (-1) ** (size + 1) * count
    return total


def _full_box(axes: list[tuple[dict, int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The whole KV tiles every row of the Q tile sees under one congruence-free term."""
    out = []
    for b, t_k, lg in axes:
        f_lo = np.maximum(b["first_lo"] // t_k, -(-b["first_hi"] // t_k))
        f_hi = np.minimum(np.minimum(b["last_hi"] // t_k, (b["last_lo"] + 1) // t_k - 1), lg // t_k - 1)
        out.append((f_lo, f_hi))
    return out


def tile_counts(plan: KernelPlan) -> tuple[np.ndarray, np.ndarray]:
    """Per Q tile of a range plan (every group's, flattened): KV tiles the kernel visits, and
    how many of them it runs unmasked (full); what the autotuner's cost model reads."""
    terms = [_per_group(plan, term) for term in plan.terms]
    visited, full = [], []
    for g, group in enumerate(itertools.product(*(range(d) for d in plan.dilation))):
        shape = tuple(math.ceil(lg / t) for lg, t in zip(plan.group_lengths(group), plan.q_tile))
        boxes = [[(b["first_lo"] // t_k, b["last_hi"] // t_k) for b, t_k, _ in term[g]] for term in terms]
        whole = [_full_box(terms[t][g]) for t in plan.full_terms]
        visited.append(np.broadcast_to(_union_count(boxes), shape).ravel())
        full.append(np.broadcast_to(_union_count(whole), shape).ravel())
    return np.concatenate(visited).astype(np.int64), np.concatenate(full).astype(np.int64)


def visited_tiles(plan: KernelPlan, table_entries: int = 0) -> tuple[int, int]:
    """``(visited, dense)`` tile pairs of one head: what the kernel loops over, and what a
    dense kernel with tiles of the same token counts would. Table plans pass their entry count."""
    n = math.prod(plan.grid)
    dense = math.ceil(n / plan.block_m) * math.ceil(n / plan.block_n)
    if plan.iteration != "range":
        return table_entries, dense
    return int(tile_counts(plan)[0].sum()), dense


def full_tiles(plan: KernelPlan) -> int:
    """Tiles a range plan's kernel runs unmasked (one head), as the kernel computes them."""
    return int(tile_counts(plan)[1].sum())

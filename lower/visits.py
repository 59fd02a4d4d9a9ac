"""The tiles each loop of a plan's kernels walks, computed on the host.

These mirror the kernels' range arithmetic (Note [KV iteration], Note [Inverse
iteration] and Note [Loops] in :mod:`attncc.lower.plan`) with the same integer
rules (Triton's ``//`` truncates toward zero), so the counts are the kernels' own:
the denominator of a plan's tile-level bound (Note [Kernel tile bound]), what the
autotuner's cost model reads, the tile mix of the static estimate
(:mod:`attncc.machine.model`) and the kernel's tile map that ``attncc analyze --png`` draws.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from types import CodeType, SimpleNamespace

import numpy as np

from attncc.errors import PatternError, field_error
from attncc.ir.analysis import EMPTY, FULL, PARTIAL
from attncc.lower.plan import AxisForm, KernelPlan
from attncc.memo import memo

# The range forms are Triton expressions; on the host tl.minimum/maximum are numpy's.
_HOST = {"tl": SimpleNamespace(minimum=np.minimum, maximum=np.maximum)}


@memo
def _code(expr: str) -> CodeType:
    return compile(expr, "<range form>", "eval")  # forms printed by lowering


def _form(expr: str, i: np.ndarray, lg: int) -> np.ndarray:
    return eval(_code(expr), _HOST, {"i": i, "Lg": lg}) + i * 0


def _tdiv(a: np.ndarray, b: int) -> np.ndarray:
    """Integer division truncating toward zero, as Triton's ``//`` on signed integers."""
    return np.where(a < 0, -((-a) // b), a // b)


@dataclass(frozen=True)
class LoopTiles:
    """One loop of a walk: its name (the template's ``# loop:`` comment) and, per program
    of the walk (every group's tiles, flattened), how many tiles it runs."""

    name: str
    per_program: np.ndarray

    @property
    def total(self) -> int:
        return int(self.per_program.sum())


def _groups(plan: KernelPlan):
    return list(itertools.product(*(range(d) for d in plan.dilation)))


def _count(lo: list, hi: list) -> np.ndarray:
    out = 1
    for a in range(3):
        out = out * np.maximum(hi[a] - lo[a] + 1, 0)
    return out


def _grid_of(counts: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(counts, shape).ravel().astype(np.int64)


def _loops(plan: KernelPlan, boxes: list, full: tuple | None, shape: tuple) -> list[np.ndarray]:
    """Per loop of a range walk, tiles per program: the full sub-box, term 0's box less it, and
    term 1's box less term 0's (Note [Loops])."""
    out = []
    n0 = _count(*boxes[0])
    if full is not None:
        nf = _count(*full)
        out += [_grid_of(nf, shape), _grid_of(n0 - nf, shape)]
    else:
        out.append(_grid_of(n0, shape))
    for lo, hi in boxes[1:]:
        lo0, hi0 = boxes[0]
        overlap = _count(
            [np.maximum(a, b) for a, b in zip(lo, lo0)], [np.minimum(a, b) for a, b in zip(hi, hi0)]
        )
        out.append(_grid_of(_count(lo, hi) - overlap, shape))
    return out


def _static(plan: KernelPlan) -> None:
    """Refuse a runtime plan: its walks depend on each call's data (Note [Runtime plans])."""
    if plan.iteration == "runtime":
        raise field_error(
            PatternError, "pattern", "a pattern with data given per call",
            "a static pattern: the tiles a runtime plan walks depend on each call's data",
        )  # fmt: skip


def _names(plan: KernelPlan, inverse: bool) -> list[str]:
    if plan.iteration == "table":
        return ["full", "partial"]
    return (["full"] if plan.full_loop(inverse) else []) + ["partial"] * len(plan.terms)


def walk(plan: KernelPlan, tables: tuple[np.ndarray, ...] | None = None) -> list[LoopTiles]:
    """The forward and dQ kernels' loops, per Q tile (table plans read their ``offsets``).

    A plan whose queries cover a box of the grid walks the Q tiles that box touches, with the
    box at the end of the grid (Note [Walks of a region])."""
    _static(plan)
    if plan.iteration == "table":
        loops = _table_loops(tables[1] if tables is not None else None)
        if plan.region:  # a table plan's entries are per Q tile of every group, in group order
            shapes = [
                tuple(math.ceil(lg / t) for lg, t in zip(plan.group_lengths(g), plan.q_tile))
                for g in _groups(plan)
            ]
            keep = np.concatenate([_region_tiles(plan, shape).ravel() for shape in shapes])
            loops = [LoopTiles(lp.name, lp.per_program[keep]) for lp in loops]
        return loops
    per_loop = []
    for group in _groups(plan):
        boxes, full, shape = _forward_boxes(plan, group)
        keep = _region_tiles(plan, shape).ravel()
        per_loop.append([counts[keep] for counts in _loops(plan, boxes, full, shape)])
    return [
        LoopTiles(name, np.concatenate(parts)) for name, parts in zip(_names(plan, False), zip(*per_loop))
    ]


# Note [Walks of a region]: the queries of a region plan (Note [Query regions] in
# attncc.lower.plan) sit where each call's offsets put them; a static walk takes the default,
# the end of the grid (a KV cache's newest rows). The forward and dQ kernels run the Q tiles
# the box touches (the others return at once); the dK/dV kernel clips each KV tile's range of
# Q tiles to them, except in table plans, whose dK/dV lists are the whole grid's (the tiles
# outside the box are masked off: wasted, not wrong). A region never lies along a dilated axis,
# so every group's length there is the grid's. Lowering's box choice (Note [Box choice]) reads
# these walks, so a region gets the boxes that suit its own rows, not the whole grid's.


def _region_tiles(plan: KernelPlan, shape: tuple[int, ...]) -> np.ndarray:
    """Which of a ``shape`` grid of Q tiles the queries' box touches (all when no region)."""
    keep = np.ones(shape, bool)
    for a in plan.region_axes:
        lo, hi = _region_span(plan, a)
        tiles = np.arange(shape[a]).reshape(_axis_shape(a, shape[a]))
        keep = keep & (tiles >= lo) & (tiles <= hi)
    return keep


def _region_span(plan: KernelPlan, a: int) -> tuple[int, int]:
    """The first and last Q tile along axis ``a`` of the box at the end of the grid."""
    start = plan.grid[a] - plan.region_shape[a]
    return start // plan.q_tile[a], (plan.grid[a] - 1) // plan.q_tile[a]


def _forward_boxes(plan: KernelPlan, group: tuple[int, int, int]) -> tuple[list, tuple | None, tuple]:
    """Per Q tile of ``group`` (arrays over its tile grid): each term's box of KV tiles
    ``(lo, hi)`` (per axis, inclusive), the full sub-box of the first term (None without a
    full-tile loop), and the group's Q tiles per axis."""
    lgs = plan.group_lengths(group)
    shape = tuple(math.ceil(lg / t) for lg, t in zip(lgs, plan.q_tile))
    axes = []
    for a in range(3):
        qlo = np.arange(shape[a]) * plan.q_tile[a]
        qhi = np.minimum(qlo + plan.q_tile[a] - 1, lgs[a] - 1)
        axes.append((qlo.reshape(_axis_shape(a, shape[a])), qhi.reshape(_axis_shape(a, shape[a]))))
    boxes, full = [], None
    for t, term in enumerate(plan.terms):
        lo, hi = [], []
        for a, (axis, (qlo, qhi)) in enumerate(zip(term, axes)):
            lo.append(_tdiv(_form(axis.first, qlo, lgs[a]), plan.kv_tile[a]))
            hi.append(_tdiv(_form(axis.last, qhi, lgs[a]), plan.kv_tile[a]))
        boxes.append((lo, hi))
        if t == 0 and plan.full_loop(False):
            run = plan.walk_order(False)[2] if plan.walk_rows(False) else None
            full = _full_box(plan, term, axes, lgs, lo, hi, plan.kv_tile, run)
    return boxes, full, shape


def _axis_shape(a: int, n: int) -> list[int]:
    shape = [1, 1, 1]
    shape[a] = n
    return shape


def _full_box(
    plan, term: tuple[AxisForm, ...], axes, lgs, lo, hi, tile, run: int | None
) -> tuple[list, list]:
    """The whole KV tiles inside [first(last row), last(first row)] on every axis, kept off a
    row's first tile on the ``run`` axis when the walk has more than one row (Note [Loops])."""
    fl, fh = [], []
    for a, (axis, (qlo, qhi)) in enumerate(zip(term, axes)):
        t = tile[a]
        fl.append(np.maximum(lo[a], _tdiv(_form(axis.first, qhi, lgs[a]) + t - 1, t)))
        fh.append(
            np.minimum(np.minimum(hi[a], _tdiv(_form(axis.last, qlo, lgs[a]) + 1, t) - 1), lgs[a] // t - 1)
        )
    if run is not None:
        fl[run] = _off_row_start(plan.walk_order(False), lo, hi, fl[run], run)
    return fl, fh


def _off_row_start(
    order: tuple[int, int, int], lo: list, hi: list, fl_run: np.ndarray, run: int
) -> np.ndarray:
    """Note [Loops]: on a box of more than one row the full run starts after the row's first tile."""
    rows = (hi[order[0]] - lo[order[0]] + 1) * (hi[order[1]] - lo[order[1]] + 1)
    return np.where(rows > 1, np.maximum(fl_run, lo[run] + 1), fl_run)


def _table_loops(offsets: np.ndarray | None) -> list[LoopTiles]:
    if offsets is None:
        raise ValueError("a table plan's walk needs its tables (attncc.lower.lowering.kernel_tables)")
    offsets = np.asarray(offsets, np.int64)
    return [
        LoopTiles("full", offsets[1::2] - offsets[0:-1:2]),
        LoopTiles("partial", offsets[2::2] - offsets[1::2]),
    ]


def inverse_walk(plan: KernelPlan, tables: tuple[np.ndarray, ...] | None = None) -> list[LoopTiles]:
    """The dK/dV kernel's loops, per KV tile, for one query head (Note [Inverse iteration])."""
    _static(plan)
    if plan.iteration == "table":
        return _table_loops(tables[3] if tables is not None else None)
    per_loop: list[list[np.ndarray]] = []
    for group in _groups(plan):
        lgs = plan.group_lengths(group)
        shape = tuple(math.ceil(lg / t) for lg, t in zip(lgs, plan.kv_tile))
        boxes, full = [], None
        for t_idx, term in enumerate(plan.terms):
            lo, hi, flo_fhi = [], [], []
            for a, axis in enumerate(term):
                i = np.arange(lgs[a])
                first, last = _form(axis.first, i, lgs[a]), _form(axis.last, i, lgs[a])
                k0 = (np.arange(shape[a]) * plan.kv_tile[a]).reshape(_axis_shape(a, shape[a]))
                k1 = k0 + plan.kv_tile[a] - 1
                ilo = np.searchsorted(last, k0, "left")  # first i with last(i) >= k0
                ihi = np.searchsorted(first, k1, "right")  # first i with first(i) > k1
                tq = plan.q_tile[a]
                lo.append(ilo // tq)
                hi.append(np.where(ihi > ilo, (ihi - 1) // tq, ilo // tq - 1))
                if a in plan.region_axes:  # Note [Walks of a region]
                    first_tile, last_tile = _region_span(plan, a)
                    lo[a], hi[a] = np.maximum(lo[a], first_tile), np.minimum(hi[a], last_tile)
                flo_fhi.append((np.searchsorted(last, k1, "left"), np.searchsorted(first, k0, "right")))
            boxes.append((lo, hi))
            if t_idx == 0 and plan.full_loop(True):
                fl = [
                    np.maximum(lo[a], (flo + plan.q_tile[a] - 1) // plan.q_tile[a])
                    for a, (flo, _) in enumerate(flo_fhi)
                ]
                fh = [
                    np.minimum(np.minimum(hi[a], fhi // plan.q_tile[a] - 1), lgs[a] // plan.q_tile[a] - 1)
                    for a, (_, fhi) in enumerate(flo_fhi)
                ]
                if plan.walk_rows(True):
                    run = plan.walk_order(True)[2]
                    fl[run] = _off_row_start(plan.walk_order(True), lo, hi, fl[run], run)
                full = (fl, fh)
        per_loop.append(_loops(plan, boxes, full, shape))
    return [LoopTiles(name, np.concatenate(parts)) for name, parts in zip(_names(plan, True), zip(*per_loop))]


def tile_counts(plan: KernelPlan) -> tuple[np.ndarray, np.ndarray]:
    """Per Q tile of a range plan (every group's, flattened): KV tiles the kernel visits, and
    how many of them it runs unmasked (full); what the autotuner's cost model reads."""
    loops = walk(plan)
    visited = np.sum([loop.per_program for loop in loops], axis=0)
    full = loops[0].per_program if loops[0].name == "full" else np.zeros_like(visited)
    return visited.astype(np.int64), full.astype(np.int64)


# Note [Kernel tile bound]: a plan's tile-level bound is dense / visited tile pairs with
# both sides counted in the plan's own tiles: ``dense`` is every Q tile (of every dilation
# group) against every KV tile, which is what the same kernel walks on the dense pattern.
# Counting dense in runs of block_m / block_n flat tokens instead compares two tilings: the
# boxes pad a grid they do not divide (8x8 boxes on a 6x9 grid are 1x2 boxes: 128 slots for
# 54 tokens), and 4 visited box pairs against 1 flat pair would read as a "bound" of 0.25
# (bench tiny's 6x9 neighborhood). Like against like, visited <= dense and the bound is >= 1, as
# the exact analysis's (Note [Tile-level bound] in attncc.ir.analysis); what the padding
# costs is the boxes' choice (Note [Box choice]) and shows in the measured efficiency.


def tiles_per_group(plan: KernelPlan, box: tuple[int, int, int]) -> list[int]:
    """Tiles of ``box`` in each dilation group, in the kernel's group order."""
    return [math.prod(math.ceil(lg / t) for lg, t in zip(plan.group_lengths(g), box)) for g in _groups(plan)]


def dense_tiles(plan: KernelPlan) -> int:
    """Tile pairs of one head that the plan's kernel walks on the dense pattern: every Q tile
    against every KV tile, in the plan's boxes (Note [Kernel tile bound])."""
    return sum(tiles_per_group(plan, plan.q_tile)) * sum(tiles_per_group(plan, plan.kv_tile))


def visited_tiles(plan: KernelPlan, table_entries: int = 0) -> tuple[int, int]:
    """``(visited, dense)`` tile pairs of one head: what the kernel loops over, and
    :func:`dense_tiles` (Note [Kernel tile bound]). Table plans pass their entry count."""
    if plan.iteration != "range":
        return table_entries, dense_tiles(plan)
    return int(tile_counts(plan)[0].sum()), dense_tiles(plan)


def tile_map(plan: KernelPlan, tables: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """``[Q tiles, KV tiles]`` int8: what the forward kernel does with each tile pair of one
    head: ``EMPTY`` (never visited), ``PARTIAL`` (visited, masked) or ``FULL`` (visited
    unmasked: Note [Loops]). Tiles are numbered group by group (Note [Dilation groups]),
    row-major over each group's boxes; a Q tile visits only KV tiles of its own group.
    Table plans read their tables (:func:`attncc.lower.lowering.kernel_tables`)."""
    q_counts, kv_counts = tiles_per_group(plan, plan.q_tile), tiles_per_group(plan, plan.kv_tile)
    out = np.full((sum(q_counts), sum(kv_counts)), EMPTY, np.int8)
    if plan.iteration == "table":
        if tables is None:
            raise ValueError("a table plan's tile map needs its tables (attncc.lower.lowering.kernel_tables)")
        offsets, entries = np.asarray(tables[1], np.int64), np.asarray(tables[2], np.int64)
        segment = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))  # 2 * row + (1 if partial)
        out[segment // 2, entries] = np.where(segment % 2 == 0, FULL, PARTIAL)
        return out
    q0 = k0 = 0
    for group, nq, nk in zip(_groups(plan), q_counts, kv_counts):
        boxes, full, shape = _forward_boxes(plan, group)
        kv_shape = tuple(math.ceil(lg / t) for lg, t in zip(plan.group_lengths(group), plan.kv_tile))
        visited = np.logical_or.reduce([_inside(lo, hi, shape, kv_shape) for lo, hi in boxes])
        block = np.where(visited, PARTIAL, EMPTY).astype(np.int8)
        if full is not None:
            block[_inside(*full, shape, kv_shape)] = FULL
        out[q0 : q0 + nq, k0 : k0 + nk] = block.reshape(nq, nk)
        q0, k0 = q0 + nq, k0 + nk
    return out


def _inside(lo: list, hi: list, shape: tuple, kv_shape: tuple) -> np.ndarray:
    """``[*shape, *kv_shape]``: whether each KV tile lies in each Q tile's box ``[lo, hi]``."""
    inside = np.ones((1,) * 6, dtype=bool)
    for a in range(3):
        k = np.arange(kv_shape[a]).reshape([kv_shape[a] if b == 3 + a else 1 for b in range(6)])
        first = np.broadcast_to(lo[a], shape)[..., None, None, None]
        last = np.broadcast_to(hi[a], shape)[..., None, None, None]
        inside = inside & (first <= k) & (k <= last)
    return np.broadcast_to(inside, (*shape, *kv_shape))


def full_tiles(plan: KernelPlan) -> int:
    """Tiles a range plan's kernel runs unmasked (one head), as the kernel computes them."""
    return int(tile_counts(plan)[1].sum())

"""Exact sparsity analysis from the closed forms: density, FLOPs and the tile map.

Nothing here looks at the brute-force mask; property tests compare the two.

Two ways to count kept pairs per (Q tile, KV tile), both exact:

* factored: a pattern that is one product over grid axes (neighborhood,
  dense, single-axis axial and their intersections) with box tiles counts
  per axis, ``kept(Qbox, Kbox) = prod_a sum_{q_a in Qbox_a} #keys_a(q_a, Kbox_a)``,
  in O(sum_a L_a * tiles_a) arithmetic. This is the case that matters for
  vision and video and it needs no N^2 work.
  Unions of a few products use inclusion-exclusion over such counts.
* rows: anything else evaluates the closed forms for a block of queries
  against every key and sums each tile: O(N^2) work in bounded memory.

Note [Tile-level bound]: ``tile_bound`` is dense tiles / visited (non-empty)
tiles for the given tiling: the speedup over dense that a kernel visiting
exactly the non-empty tiles at dense throughput could reach. It is below the
ideal ``1 / density`` because a visited tile also holds pairs the pattern drops.
Both counts are tile pairs of the one tiling, so the bound is at least 1; a
kernel plan's bound counts its own boxes the same way (Note [Kernel tile bound]
in :mod:`attncc.lower.visits`).

Note [Data-dependent analysis]: a primitive whose data are given at call time
(Note [Runtime data] in attncc.ir.nodes) has no closed form, so its density
depends on the data. Patterns are built from primitives by union and
intersection only, so the mask only grows with a runtime leaf's mask: the data
that keep every pair give the most any data keep, the data that keep none the
fewest. The analysis counts both, with each runtime rule replaced by a box of
every key and by an empty one: a tile is empty when no data keep a pair of it
(the kernel may skip it whatever the data), full when every data keep all of
it, and partial otherwise, which is every tile for a runtime leaf on its own.
``kept_pairs`` (and the density, the tile counts) are then the most, and
``min_kept_pairs`` the fewest.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import sympy

from attncc.errors import PatternError, field_error
from attncc.ir import symbolic
from attncc.ir.canonical import canonicalize, resolve_heads
from attncc.ir.grid import Grid
from attncc.ir.nodes import Dense, Documents, Intersection, KeyLengths, KeyRange, Pattern, Union
from attncc.ir.segments import BySegments, Segments
from attncc.ir.symbolic import (
    AllOf,
    AnyOf,
    FlatRange,
    GridBox,
    Predicate,
    Progression,
    Rule,
    Runtime,
    full_progression,
    has_runtime,
    rules,
    to_numpy,
)
from attncc.ir.validate import required_heads, validate, validate_cross, validate_segments

EMPTY, PARTIAL, FULL = 0, 1, 2
_ROW_BLOCK_ELEMENTS = 1 << 22  # bound on queries x keys evaluated at once
_MAX_UNION_TERMS = 4  # unions of up to this many products use inclusion-exclusion

# Note [Analysis limits]: what each step costs is known before it starts, so an analysis
# that would run for hours or ask for terabytes is refused at once, naming the limit: the
# tile map holds heads x Q tiles x KV tiles counts (and the factored path one count per pair
# of tile boxes); a flat tiling is cut into boxes tile by tile; the factored path evaluates
# axis length x KV tile borders key counts per axis (axis length^2 where several progressions
# share an axis); the rows path evaluates N^2 query-key pairs. Memory stays within a few
# times the tile map (the rows and axes are walked in blocks). Every shipped spec fits, and
# so do the default tilings of a 512x512 image, of a 1-D sequence of 128Ki tokens, and of one
# of 32Ki tokens for a pattern the rows path counts (which takes a minute there).
MAX_TILES = 1 << 16  # tiles of one side (Q or KV)
MAX_TILE_PAIRS = 1 << 25  # entries of the tile map, and pairs of tile boxes
MAX_EVALUATIONS = 1 << 31  # key counts or query-key pairs one step evaluates


def _within(what: str, amount: int, limit: int, hint: str) -> None:
    """Raise a :class:`PatternError` naming the limit if ``amount`` exceeds it (Note [Analysis limits])."""
    if amount > limit:
        raise field_error(PatternError, what, amount, f"at most {limit:,}", hint)


@dataclass(frozen=True)
class Tiling:
    """Tiles of the grid: boxes of ``shape`` (one entry per axis), or, when
    ``flat``, runs of ``shape[0]`` consecutive flat (row-major) tokens."""

    shape: tuple[int, ...]
    flat: bool

    @staticmethod
    def of(tile: int | tuple[int, ...] | list[int], grid: Grid, name: str = "tile") -> Tiling:
        t = tuple(tile) if isinstance(tile, (tuple, list)) else (tile,)
        for i, v in enumerate(t):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise field_error(PatternError, f"{name}[{i}]", v, "an integer >= 1")
        if len(t) == grid.rank:
            return Tiling(t, flat=False)
        if len(t) == 1:
            return Tiling(t, flat=True)
        raise field_error(
            PatternError, name, t, f"one size (flat tokens) or {grid.rank} sizes (a box, one per axis)"
        )

    def counts(self, grid: Grid) -> tuple[int, ...]:
        """Tiles per axis (one entry when flat)."""
        if self.flat:
            return (math.ceil(grid.size / self.shape[0]),)
        return tuple(math.ceil(s / t) for s, t in zip(grid.shape, self.shape))

    def tile_of_token(self, grid: Grid) -> np.ndarray:
        """Tile index (row-major over tiles) of every flat token."""
        flat = np.arange(grid.size)
        if self.flat:
            return flat // self.shape[0]
        coords = np.unravel_index(flat, grid.shape)
        per_axis = [c // t for c, t in zip(coords, self.shape)]
        return np.ravel_multi_index(per_axis, self.counts(grid))

    def sizes(self, grid: Grid) -> np.ndarray:
        """Number of real tokens in each tile (border tiles may be short), from the shapes alone."""
        if self.flat:
            n, t = grid.size, self.shape[0]
            return np.minimum(t, n - t * np.arange(self.counts(grid)[0], dtype=np.int64))
        starts = [np.arange(0, s, t, dtype=np.int64) for s, t in zip(grid.shape, self.shape)]
        extents = [np.minimum(t, s - lo) for s, t, lo in zip(grid.shape, self.shape, starts)]
        return functools.reduce(np.multiply.outer, extents).ravel()

    @property
    def argument(self) -> int | tuple[int, ...]:
        """The tile as :meth:`of` (and :func:`analyze`) take it: a size when flat, else a box."""
        return self.shape[0] if self.flat else self.shape

    def __str__(self) -> str:
        return f"{self.shape[0]} flat" if self.flat else "x".join(map(str, self.shape))


class _TileMapCounts:
    """Density, FLOPs and tile counts of an analysis, from its ``heads``, ``head_dim``,
    ``kept_pairs``, ``tile_classes``, ``runtime`` and ``tokens`` (N)."""

    heads: int
    head_dim: int
    kept_pairs: int
    tile_classes: np.ndarray
    runtime: tuple[str, ...]
    tokens: int

    @property
    def total_pairs(self) -> int:
        return self.heads * self.tokens**2

    @property
    def data_dependent(self) -> bool:
        """Whether the kept pairs depend on data given at call time (Note [Data-dependent analysis])."""
        return bool(self.runtime)

    @property
    def density(self) -> float:
        return self.kept_pairs / self.total_pairs

    @property
    def ideal_speedup(self) -> float:
        return math.inf if self.kept_pairs == 0 else self.total_pairs / self.kept_pairs

    @property
    def flops_kept(self) -> int:
        """Forward FLOPs of the kept pairs (QK^T and PV: 4 * head_dim each), batch 1."""
        return 4 * self.head_dim * self.kept_pairs

    @property
    def flops_dense(self) -> int:
        return 4 * self.head_dim * self.total_pairs

    def _count(self, cls: int) -> int:
        return int((self.tile_classes == cls).sum())

    @property
    def empty_tiles(self) -> int:
        return self._count(EMPTY)

    @property
    def partial_tiles(self) -> int:
        return self._count(PARTIAL)

    @property
    def full_tiles(self) -> int:
        return self._count(FULL)

    @property
    def tile_bound(self) -> float:
        """See Note [Tile-level bound]."""
        visited = self.partial_tiles + self.full_tiles
        return math.inf if visited == 0 else self.tile_classes.size / visited


@dataclass(frozen=True, eq=False)
class Analysis(_TileMapCounts):
    """What :func:`analyze` found.

    The tile map has one entry per head when heads differ, else a single entry
    shared by every head; tile counts (``empty_tiles``, ...) are over the map,
    while ``kept_pairs`` and FLOPs cover all ``heads``. For a pattern with data given at
    call time (``runtime`` names its primitives), ``kept_pairs``, the density and
    ``tile_counts`` are the most any data keep, ``min_kept_pairs`` the fewest (Note
    [Data-dependent analysis]); for any other pattern the two are equal.
    """

    grid: Grid
    heads: int
    head_dim: int
    q_tiling: Tiling
    kv_tiling: Tiling
    kept_pairs: int
    tile_counts: np.ndarray = field(repr=False)  # [H or 1, q tiles, kv tiles] kept pairs
    tile_classes: np.ndarray = field(repr=False)  # [H or 1, q tiles, kv tiles] EMPTY/PARTIAL/FULL
    min_kept_pairs: int = 0
    runtime: tuple[str, ...] = ()  # the primitives whose data are given at call time, by name

    @property
    def tokens(self) -> int:
        return self.grid.size


def analyze(
    pattern: Pattern,
    grid: Grid,
    q_tile: int | tuple[int, ...] = 128,
    kv_tile: int | tuple[int, ...] = 128,
    heads: int | None = None,
    head_dim: int = 128,
) -> Analysis:
    """Exact density, FLOPs and tile map of ``pattern`` on ``grid``.

    ``q_tile``/``kv_tile`` are boxes (one size per axis) or flat runs (one size).
    """
    heads = validate(pattern, grid, heads)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise field_error(PatternError, "head_dim", head_dim, "an integer >= 1")
    q_tiling = Tiling.of(q_tile, grid, "q_tile")
    kv_tiling = Tiling.of(kv_tile, grid, "kv_tile")
    shared = required_heads(pattern) is None
    q_tiles, kv_tiles = math.prod(q_tiling.counts(grid)), math.prod(kv_tiling.counts(grid))
    hint = f"grid {grid} in tiles of {q_tiling} (Q) and {kv_tiling} (KV): take larger tiles or a smaller grid"
    _within("Q tiles", q_tiles, MAX_TILES, hint)
    _within("KV tiles", kv_tiles, MAX_TILES, hint)
    _within("tile map entries", (1 if shared else heads) * q_tiles * kv_tiles, MAX_TILE_PAIRS, hint)
    per_head: dict[Pattern, tuple[np.ndarray, np.ndarray]] = {}
    most, least = [], []
    for head_pattern in resolve_heads(pattern, 1 if shared else heads):
        canon = canonicalize(head_pattern, grid)
        if canon not in per_head:
            per_head[canon] = _count_bounds(rules(canon, grid), grid, q_tiling, kv_tiling)
        most.append(per_head[canon][0])
        least.append(per_head[canon][1])
    tile_counts_, fewest = np.stack(most), np.stack(least)
    capacity = np.outer(q_tiling.sizes(grid), kv_tiling.sizes(grid))
    classes = np.where(tile_counts_ == 0, EMPTY, np.where(fewest == capacity, FULL, PARTIAL))
    return Analysis(
        grid=grid,
        heads=heads,
        head_dim=head_dim,
        q_tiling=q_tiling,
        kv_tiling=kv_tiling,
        kept_pairs=int(tile_counts_.sum()) * (heads if shared else 1),
        tile_counts=tile_counts_,
        tile_classes=classes.astype(np.int8),
        min_kept_pairs=int(fewest.sum()) * (heads if shared else 1),
        runtime=tuple(leaf.NAME for leaf in pattern.runtime_leaves),
    )


def _count_bounds(
    rule: Rule, grid: Grid, q_tiling: Tiling, kv_tiling: Tiling
) -> tuple[np.ndarray, np.ndarray]:
    """The most and the fewest kept pairs per tile pair that any data keep (the same array
    twice for a rule without data: Note [Data-dependent analysis])."""
    if not has_runtime(rule):
        counts = tile_counts(rule, grid, q_tiling, kv_tiling)
        return counts, counts
    return tuple(  # type: ignore[return-value]
        tile_counts(_bounded(rule, grid, most), grid, q_tiling, kv_tiling) for most in (True, False)
    )


_NOTHING = Progression(sympy.Integer(1), sympy.Integer(0), sympy.Integer(1))  # no key: last < first


def _bounded(rule: Rule, grid: Grid, most: bool) -> Rule:
    """``rule`` with every runtime rule keeping every key (``most``) or none (Note
    [Data-dependent analysis])."""
    if isinstance(rule, Runtime):
        return GridBox(tuple(full_progression(s) if most else _NOTHING for s in grid.shape))
    if isinstance(rule, (AnyOf, AllOf)):
        return type(rule)(tuple(_bounded(r, grid, most) for r in rule.rules))
    return rule


@dataclass(frozen=True)
class CrossAnalysis:
    """What :func:`analyze_cross` found: the kept pairs of ``heads`` x ``Nq`` queries on
    ``q_grid`` by ``Nk`` keys on ``grid``; the most any data keep and the fewest (Note
    [Data-dependent analysis]), equal for a pattern without data given at call time."""

    q_grid: Grid
    grid: Grid
    heads: int
    head_dim: int
    kept_pairs: int
    min_kept_pairs: int
    runtime: tuple[str, ...] = ()

    @property
    def data_dependent(self) -> bool:
        return bool(self.runtime)

    @property
    def total_pairs(self) -> int:
        return self.heads * self.q_grid.size * self.grid.size

    @property
    def density(self) -> float:
        return self.kept_pairs / self.total_pairs

    @property
    def ideal_speedup(self) -> float:
        return math.inf if self.kept_pairs == 0 else self.total_pairs / self.kept_pairs

    @property
    def flops_kept(self) -> int:
        """Forward FLOPs of the kept pairs (QK^T and PV: 4 * head_dim each), batch 1."""
        return 4 * self.head_dim * self.kept_pairs

    @property
    def flops_dense(self) -> int:
        return 4 * self.head_dim * self.total_pairs


def analyze_cross(
    pattern: Pattern, q_grid: Grid, grid: Grid, heads: int | None = None, head_dim: int = 128
) -> CrossAnalysis:
    """Exact kept pairs of ``pattern`` for queries on ``q_grid`` over keys on ``grid`` (Note
    [Cross-attention] in attncc.runtime.cross): ``Nq`` times each head's row of
    :func:`cross_keys`, under the data that keep the most and under those that keep the fewest."""
    heads = validate_cross(pattern, q_grid, grid, heads)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise field_error(PatternError, "head_dim", head_dim, "an integer >= 1")
    most, fewest = (int(cross_keys(pattern, grid, heads, m).sum()) * q_grid.size for m in (True, False))
    runtime = tuple(leaf.NAME for leaf in pattern.runtime_leaves)
    return CrossAnalysis(q_grid, grid, heads, head_dim, most, fewest, runtime)


def cross_keys(pattern: Pattern, grid: Grid, heads: int, most: bool = True) -> np.ndarray:
    """``[heads, Nk]`` bool: the keys on ``grid`` that every query of a cross call keeps, per
    head, for a pattern :func:`attncc.ir.validate.validate_cross` took. Such a pattern keeps a
    pair from the key's flat index and the call's data alone, so under the data that keep the
    most (``most``: every key within its length, one id for all) or the fewest (no key, ids
    that never match) every query keeps the same keys; without data, always. O(Nk) per head."""
    keys = np.arange(grid.size)

    def row(node: Pattern) -> np.ndarray:
        if isinstance(node, Dense):
            return np.ones(grid.size, dtype=bool)
        if isinstance(node, (KeyLengths, Documents)):
            return np.full(grid.size, most)
        if isinstance(node, KeyRange):
            lo, hi = node.lo if node.lo is not None else 0, node.hi if node.hi is not None else grid.size
            return (keys >= lo) & (keys <= hi)
        assert isinstance(node, (Union, Intersection)), node  # validate_cross lets nothing else through
        combine = np.logical_or if isinstance(node, Union) else np.logical_and
        return functools.reduce(combine, (row(op) for op in node.operands))

    return np.stack([row(head) for head in resolve_heads(pattern, heads)])


@dataclass(frozen=True)
class HeadGroup:
    """The heads that share one head pattern (canonical), in head order."""

    heads: tuple[int, ...]
    pattern: Pattern

    @property
    def label(self) -> str:
        """``head 3``, ``heads 0-7`` (a run of more than two) or ``heads 0, 4, 8``."""
        h = self.heads
        if len(h) == 1:
            return f"head {h[0]}"
        if len(h) > 2 and h == tuple(range(h[0], h[-1] + 1)):
            return f"heads {h[0]}-{h[-1]}"
        return "heads " + ", ".join(map(str, h))


def head_groups(pattern: Pattern, grid: Grid, heads: int) -> list[HeadGroup]:
    """The distinct head patterns of ``pattern`` over ``heads`` heads, in order of their first
    head, each with the heads that use it (one group when no head differs)."""
    groups: dict[Pattern, list[int]] = {}
    for h, head_pattern in enumerate(resolve_heads(pattern, heads)):
        groups.setdefault(canonicalize(head_pattern, grid), []).append(h)
    return [HeadGroup(tuple(hs), p) for p, hs in groups.items()]


def keys_of(pattern: Pattern, grid: Grid, query: int, head: int = 0) -> np.ndarray:
    """Bool ``[N]``: the keys flat query ``query`` sees in head ``head`` (from the closed forms;
    for a pattern with data given at call time, the keys some data let it see)."""
    heads = validate(pattern, grid)
    head_pattern = resolve_heads(pattern, max(heads, head + 1))[head]
    rule = _bounded(rules(canonicalize(head_pattern, grid), grid), grid, most=True)
    qf = np.array([query], dtype=np.int64)
    kf = np.arange(grid.size, dtype=np.int64)
    coords = np.unravel_index(kf, grid.shape)
    return _keep_rows(rule, grid, qf, [c[qf] for c in coords], kf, list(coords))[0]


def tile_counts(rule: Rule, grid: Grid, q_tiling: Tiling, kv_tiling: Tiling) -> np.ndarray:
    """``[q tiles, kv tiles]`` kept pairs of a head-independent rule without data given at call
    time (:func:`analyze` bounds those: Note [Data-dependent analysis])."""
    if has_runtime(rule):
        raise TypeError("a rule that reads data given at call time has no count; bound it first")
    axes = _as_product(rule, grid)
    if axes is not None:
        return _factored_counts(axes, grid, q_tiling, kv_tiling)
    if isinstance(rule, AnyOf) and len(rule.rules) <= _MAX_UNION_TERMS:
        members = [_as_product(r, grid) for r in rule.rules]
        if all(m is not None for m in members):
            # Inclusion-exclusion: |A u B u ...| = sum over non-empty subsets S of
            # (-1)^(|S|+1) |intersection of S|, and an intersection of products is a product.
            total = np.zeros((math.prod(q_tiling.counts(grid)), math.prod(kv_tiling.counts(grid))), np.int64)
            for size in range(1, len(members) + 1):
                for subset in itertools.combinations(members, size):
                    axes = [[p for m in subset for p in m[a]] for a in range(grid.rank)]  # type: ignore[index]
                    total += (-1) ** (size + 1) * _factored_counts(axes, grid, q_tiling, kv_tiling)
            return total
    return _row_counts(rule, grid, q_tiling, kv_tiling)


# --- factored path -------------------------------------------------------------------


def _as_product(rule: Rule, grid: Grid) -> list[list[Progression]] | None:
    """Per axis, the progressions whose intersection is the key set; None if not a product."""
    if isinstance(rule, GridBox):
        return [[p] for p in rule.axes]
    if isinstance(rule, FlatRange) and grid.rank == 1:
        return [[rule.range]]
    if isinstance(rule, AllOf):
        parts = [_as_product(r, grid) for r in rule.rules]
        if any(p is None for p in parts):
            return None
        return [[p for part in parts for p in part[a]] for a in range(grid.rank)]  # type: ignore[index]
    return None


def _progression_arrays(prog: Progression, qs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return to_numpy(prog.first)(qs), to_numpy(prog.last)(qs), to_numpy(prog.step)(qs)


def _count_in(first, last, step, lo, hi) -> np.ndarray:
    """How many of ``first, first + step, ..., last`` lie in ``[lo, hi]`` (broadcasting)."""
    a = np.maximum(first, lo)
    b = np.minimum(last, hi)
    a = first + -((first - a) // step) * step  # first member >= a
    return np.where(b >= a, (b - a) // step + 1, 0)


def tile_boxes(tiling: Tiling, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every tile as boxes: ``(tile id [M], lo [M, rank], hi [M, rank])``, bounds inclusive.

    A box tile is one box; a flat run of tokens splits into at most
    ``2 * rank - 1`` boxes (a part row, whole rows, whole planes, ...).
    """
    if not tiling.flat:
        ranges = [np.arange(0, s, t) for s, t in zip(grid.shape, tiling.shape)]
        lo = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, grid.rank)
        hi = np.minimum(lo + np.array(tiling.shape) - 1, np.array(grid.shape) - 1)
        return np.arange(len(lo)), lo, hi
    strides, shape = grid.strides, grid.shape
    ids, los, his = [], [], []
    for tile, start in enumerate(range(0, grid.size, tiling.shape[0])):
        pos, end = start, min(start + tiling.shape[0], grid.size)
        while pos < end:
            coord = np.unravel_index(pos, shape)
            # The outermost axis a below which the box can span whole axes.
            a = next(
                a for a in range(grid.rank) if all(c == 0 for c in coord[a + 1 :]) and strides[a] <= end - pos
            )
            m = min(shape[a] - coord[a], (end - pos) // strides[a])
            lo = [*coord[:a], coord[a]] + [0] * (grid.rank - a - 1)
            hi = [*coord[:a], coord[a] + m - 1] + [s - 1 for s in shape[a + 1 :]]
            ids.append(tile)
            los.append(lo)
            his.append(hi)
            pos += m * strides[a]
    return np.array(ids), np.array(los), np.array(his)


def _keys_below(progs: list[Progression], qs: np.ndarray, length: int, breaks: np.ndarray) -> np.ndarray:
    """``[len(qs), len(breaks)]``: keys of each query coordinate in ``qs`` that are ``< breaks[j]``."""
    arrays = [_progression_arrays(p, qs) for p in progs]
    if len(arrays) == 1:
        first, last, step = (x[:, None] for x in arrays[0])
        return _count_in(first, last, step, 0, breaks[None] - 1)
    # Several progressions on one axis: intersect them key by key.
    ks = np.arange(length, dtype=np.int64)[None]
    keep = np.ones((len(qs), length), dtype=bool)
    for first, last, step in arrays:
        f, s = first[:, None], step[:, None]
        keep &= (ks >= f) & (ks <= last[:, None]) & ((ks - f) % s == 0)
    below = np.concatenate([np.zeros((len(qs), 1), np.int64), keep.cumsum(1)], axis=1)
    return below[:, breaks]


def _prefix_table(progs: list[Progression], length: int, edges: np.ndarray, breaks: np.ndarray) -> np.ndarray:
    """``[len(edges), len(breaks)]``: keys below ``breaks[j]`` summed over the query coordinates
    below ``edges[i]``; the axis is walked a block of queries at a time, so memory holds the
    rows asked for, not one per coordinate (Note [Analysis limits])."""
    width = length if len(progs) > 1 else len(breaks)
    _within(
        "key counts to evaluate on one axis",
        length * width,
        MAX_EVALUATIONS,
        f"an axis of {length:,} coordinates against {width:,} "
        + ("keys" if len(progs) > 1 else "KV tile borders")
        + ": take larger KV tiles or a smaller grid",
    )
    out = np.zeros((len(edges), len(breaks)), dtype=np.int64)
    total = np.zeros(len(breaks), dtype=np.int64)
    block = max(1, _ROW_BLOCK_ELEMENTS // width)
    for lo in range(0, length, block):
        qs = np.arange(lo, min(lo + block, length), dtype=np.int64)
        sums = total + _keys_below(progs, qs, length, breaks).cumsum(0)  # row r: coordinates <= lo + r
        wanted = (edges > lo) & (edges <= lo + len(qs))
        out[wanted] = sums[edges[wanted] - lo - 1]
        total = sums[-1]
    return out


def _factored_counts(
    axes: list[list[Progression]], grid: Grid, q_tiling: Tiling, kv_tiling: Tiling
) -> np.ndarray:
    """Kept pairs per tile pair of a product rule, from per-axis prefix sums.

    For boxes ``Qb``, ``Kb``: ``kept = prod_a sum_{q in Qb_a} #{keys of q in Kb_a}``;
    a tile's count is the sum over the boxes that make it up.
    """
    q_id, q_lo, q_hi = tile_boxes(q_tiling, grid)
    k_id, k_lo, k_hi = tile_boxes(kv_tiling, grid)
    hint = f"tiles of {q_tiling} (Q) and {kv_tiling} (KV) on grid {grid} split into that many boxes"
    _within("pairs of tile boxes", len(q_id) * len(k_id), MAX_TILE_PAIRS, hint)
    kept = np.ones((len(q_id), len(k_id)), dtype=np.int64)
    for a, length in enumerate(grid.shape):
        breaks, index = np.unique(np.concatenate([k_lo[:, a], k_hi[:, a] + 1]), return_inverse=True)
        j_lo, j_hi = index[: len(k_id)], index[len(k_id) :]
        edges, rows = np.unique(np.concatenate([q_lo[:, a], q_hi[:, a] + 1]), return_inverse=True)
        table = _prefix_table(axes[a], length, edges, breaks)  # [Q box edges, KV box edges]
        i0, i1 = rows[: len(q_id), None], rows[len(q_id) :, None]
        kept *= (table[i1, j_hi] - table[i0, j_hi]) - (table[i1, j_lo] - table[i0, j_lo])
    n_q, n_k = math.prod(q_tiling.counts(grid)), math.prod(kv_tiling.counts(grid))
    flat = (q_id[:, None] * n_k + k_id[None, :]).ravel()
    return np.bincount(flat, weights=kept.ravel(), minlength=n_q * n_k).astype(np.int64).reshape(n_q, n_k)


# --- rows path -------------------------------------------------------------------------


def _keep_rows(rule: Rule, grid: Grid, qf: np.ndarray, qc: list, kf: np.ndarray, kc: list) -> np.ndarray:
    """Bool ``[queries, keys]`` for the flat query indices ``qf`` (coords ``qc``)."""
    if isinstance(rule, GridBox):
        keep = np.ones((len(qf), len(kf)), dtype=bool)
        for prog, q_a, k_a in zip(rule.axes, qc, kc):
            first, last, step = _progression_arrays(prog, q_a)
            f, s = first[:, None], step[:, None]
            keep &= (k_a[None] >= f) & (k_a[None] <= last[:, None]) & ((k_a[None] - f) % s == 0)
        return keep
    if isinstance(rule, FlatRange):
        first, last, step = _progression_arrays(rule.range, qf)
        f, s = first[:, None], step[:, None]
        return (kf[None] >= f) & (kf[None] <= last[:, None]) & ((kf[None] - f) % s == 0)
    if isinstance(rule, Predicate):
        return _predicate_rows(rule, qf, kf)
    parts = [_keep_rows(r, grid, qf, qc, kf, kc) for r in rule.rules]
    return np.logical_or.reduce(parts) if isinstance(rule, AnyOf) else np.logical_and.reduce(parts)


def _predicate_rows(rule: Predicate, qf: np.ndarray, kf: np.ndarray) -> np.ndarray:
    tables = {name: np.asarray(values) for name, values in rule.tables}
    env = {symbolic.q: qf[:, None], symbolic.k: kf[None]}
    return np.broadcast_to(_evaluate(rule.expr, env, tables), (len(qf), len(kf)))


def _evaluate(expr: sympy.Basic, env: dict, tables: dict[str, np.ndarray]) -> np.ndarray:
    """Evaluate a predicate's sympy tree on int64 arrays, lookups included."""
    if isinstance(expr, sympy.floor):  # floor(a / b) is integer division, never a float
        num, den = sympy.fraction(sympy.together(expr.args[0]))
        return _evaluate(num, env, tables) // _evaluate(den, env, tables)
    args = [_evaluate(a, env, tables) for a in expr.args]
    if expr in env:
        return env[expr]
    if expr.is_Integer:
        return np.int64(int(expr))
    if isinstance(expr, sympy.core.function.AppliedUndef):
        return tables[expr.func.__name__][tuple(args)]
    ops = {
        sympy.Or: np.logical_or.reduce,
        sympy.And: np.logical_and.reduce,
        sympy.Add: sum,
        sympy.Mul: np.prod,
    }
    for kind, fn in ops.items():
        if isinstance(expr, kind):
            return fn(np.broadcast_arrays(*args)) if kind in (sympy.Or, sympy.And) else fn(args)
    if isinstance(expr, sympy.Eq):
        return args[0] == args[1]
    if isinstance(expr, sympy.Mod):
        return args[0] % args[1]
    raise TypeError(f"cannot evaluate {expr} in a predicate")


def _row_counts(rule: Rule, grid: Grid, q_tiling: Tiling, kv_tiling: Tiling) -> np.ndarray:
    n = grid.size
    hint = (
        f"a pattern without per-axis closed forms is counted pair by pair, here on {n:,} tokens: "
        "take a smaller grid"
    )
    _within("query-key pairs to evaluate", n * n, MAX_EVALUATIONS, hint)
    q_tile_id = q_tiling.tile_of_token(grid)
    kv_tile_id = kv_tiling.tile_of_token(grid)
    q_order = np.argsort(q_tile_id, kind="stable")
    kv_order = np.argsort(kv_tile_id, kind="stable")
    kv_starts = np.searchsorted(kv_tile_id[kv_order], np.arange(kv_tile_id.max() + 1))
    coords = np.unravel_index(np.arange(n), grid.shape)
    kc = [c[kv_order] for c in coords]
    out = np.zeros((q_tile_id.max() + 1, len(kv_starts)), dtype=np.int64)
    block = max(1, _ROW_BLOCK_ELEMENTS // n)
    for lo in range(0, n, block):
        qf = q_order[lo : lo + block]
        keep = _keep_rows(rule, grid, qf, [c[qf] for c in coords], kv_order, kc)
        per_query = np.add.reduceat(keep, kv_starts, axis=1, dtype=np.int64)
        np.add.at(out, q_tile_id[qf], per_query)
    return out


# --- token spaces of segments ----------------------------------------------------------

# Note [Segment tile maps]: a space of segments (Note [Segment spaces] in attncc.ir.segments) is
# tiled segment by segment, each with a tiling of its own grid (box tiles in a grid, flat runs in
# a text), so no tile straddles two segments; the space's tiles are the first segment's, then the
# second's, ... and its tile map is one block per (query segment, key segment) pair. A
# same-segment pair's block is :func:`analyze` of its pattern on that segment's grid; a pair of
# two segments keeps a pair from the key alone (attncc.ir.validate.validate_cross), so every
# query of its segment has the same keys and the block is the outer product of the Q tiles'
# sizes with the kept keys per KV tile; unlisted pairs' blocks are empty.

SegmentTile = int | tuple[int, ...]


@dataclass(frozen=True)
class SegmentTiling:
    """One :class:`Tiling` per segment of ``space``, in segment order (Note [Segment tile maps])."""

    space: Segments
    tilings: tuple[Tiling, ...]

    @staticmethod
    def of(tile: SegmentTile | Sequence[SegmentTile], space: Segments, name: str = "tile") -> SegmentTiling:
        """One size (flat runs of that many tokens in every segment), or one tile per segment
        (each a size or a box of the segment's rank)."""
        if isinstance(tile, int) and not isinstance(tile, bool):
            per_segment: Sequence[SegmentTile] = [tile] * len(space.names)
        elif isinstance(tile, (list, tuple)) and len(tile) == len(space.names):
            per_segment = tile
        else:
            allowed = f"one size, or {len(space.names)} tiles (one per segment: {', '.join(space.names)})"
            raise field_error(PatternError, name, tile, allowed)
        tilings = tuple(
            Tiling.of(t, g, f"{name}[{n}]") for t, g, n in zip(per_segment, space.grids, space.names)
        )
        return SegmentTiling(space, tilings)

    def counts(self) -> tuple[int, ...]:
        """Tiles per segment."""
        return tuple(math.prod(t.counts(g)) for t, g in zip(self.tilings, self.space.grids))

    def starts(self) -> tuple[int, ...]:
        """The index of each segment's first tile among the space's tiles."""
        return tuple(int(x) for x in np.cumsum((0, *self.counts()))[:-1])

    def sizes(self) -> np.ndarray:
        """Number of real tokens in each tile of the space."""
        return np.concatenate([t.sizes(g) for t, g in zip(self.tilings, self.space.grids)])

    def tile_of_token(self) -> np.ndarray:
        """Tile index (among the space's tiles) of every flat token of the space."""
        parts = [t.tile_of_token(g) for t, g in zip(self.tilings, self.space.grids)]
        return np.concatenate([p + s for p, s in zip(parts, self.starts())])

    def __str__(self) -> str:
        return ", ".join(f"{n} {t}" for n, t in zip(self.space.names, self.tilings))


@dataclass(frozen=True, eq=False)
class SegmentsAnalysis(_TileMapCounts):
    """What :func:`analyze_segments` found: :class:`Analysis` over a space of segments (Note
    [Segment tile maps]); no pattern of segments reads data given at call time."""

    space: Segments
    heads: int
    head_dim: int
    q_tiling: SegmentTiling
    kv_tiling: SegmentTiling
    kept_pairs: int
    tile_counts: np.ndarray = field(repr=False)  # [H or 1, q tiles, kv tiles] kept pairs
    tile_classes: np.ndarray = field(repr=False)  # [H or 1, q tiles, kv tiles] EMPTY/PARTIAL/FULL
    runtime: tuple[str, ...] = ()

    @property
    def tokens(self) -> int:
        return self.space.size

    @property
    def min_kept_pairs(self) -> int:
        return self.kept_pairs


def analyze_segments(
    pattern: BySegments,
    q_tile: SegmentTile | Sequence[SegmentTile] = 128,
    kv_tile: SegmentTile | Sequence[SegmentTile] = 128,
    heads: int | None = None,
    head_dim: int = 128,
) -> SegmentsAnalysis:
    """Exact density, FLOPs and tile map of a pattern per pair of segments over its whole space
    (Note [Segment tile maps]). ``q_tile``/``kv_tile``: one size (flat runs in every segment) or
    one tile per segment, a size or a box of that segment's rank."""
    if not isinstance(pattern, BySegments):
        raise field_error(PatternError, "pattern", str(pattern), "by_segments(...)")
    heads = validate_segments(pattern, heads)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise field_error(PatternError, "head_dim", head_dim, "an integer >= 1")
    space = pattern.space
    q_tiling = SegmentTiling.of(q_tile, space, "q_tile")
    kv_tiling = SegmentTiling.of(kv_tile, space, "kv_tile")
    shared = required_heads(pattern) is None
    maps = 1 if shared else heads
    q_tiles, kv_tiles = sum(q_tiling.counts()), sum(kv_tiling.counts())
    hint = f"{space} in tiles of {q_tiling} (Q) and {kv_tiling} (KV): take larger tiles"
    _within("Q tiles", q_tiles, MAX_TILES, hint)
    _within("KV tiles", kv_tiles, MAX_TILES, hint)
    _within("tile map entries", maps * q_tiles * kv_tiles, MAX_TILE_PAIRS, hint)
    counts = np.zeros((maps, q_tiles, kv_tiles), np.int64)
    q_starts, kv_starts = q_tiling.starts(), kv_tiling.starts()
    for i, j, pair in pattern.listed():
        q_grid, k_grid = space.grids[i], space.grids[j]
        q_t, kv_t = q_tiling.tilings[i], kv_tiling.tilings[j]
        rows = slice(q_starts[i], q_starts[i] + q_tiling.counts()[i])
        cols = slice(kv_starts[j], kv_starts[j] + kv_tiling.counts()[j])
        if i == j:
            block = analyze(pair, q_grid, q_t.argument, kv_t.argument, heads, head_dim).tile_counts
        else:  # the keys of a pair of two segments do not depend on the query: any query's
            kv_of_key = kv_t.tile_of_token(k_grid)
            keys = [keys_of(pair, k_grid, 0, h) for h in range(maps)]
            per_tile = np.stack([np.bincount(kv_of_key, k, len(kv_t.sizes(k_grid))) for k in keys])
            block = q_t.sizes(q_grid)[None, :, None] * per_tile.astype(np.int64)[:, None, :]
        counts[:, rows, cols] = block
    capacity = np.outer(q_tiling.sizes(), kv_tiling.sizes())
    classes = np.where(counts == 0, EMPTY, np.where(counts == capacity, FULL, PARTIAL))
    return SegmentsAnalysis(
        space=space,
        heads=heads,
        head_dim=head_dim,
        q_tiling=q_tiling,
        kv_tiling=kv_tiling,
        kept_pairs=int(counts.sum()) * (heads if shared else 1),
        tile_counts=counts,
        tile_classes=classes.astype(np.int8),
    )

"""Lowering of a pattern per pair of segments to one set of kernels (issue 16 part 4).

Note [Segment kernels]: a space of segments (Note [Segment spaces] in attncc.ir.segments) runs
as one forward kernel, one dQ and one dK/dV kernel over the whole space, not a kernel per pair
and a merge. Each segment keeps its own tiling (a box of ``block_m`` query tokens and one of
``block_n`` key tokens on its grid, padded to rank 3; a run in a 1-D segment), so a Q or KV tile
never straddles two segments, and the space's tiles are each segment's in turn (Note [Segment
tile maps] in attncc.ir.analysis: the analysis and the kernels count the same tiles). A forward
or dQ program takes one Q tile of the space and finds its segment by comparing its program id
with the segments' first tiles, constants the template unrolls; it then walks, for each key
segment its query segment lists, in segment order, that pair's KV tiles, with one online-softmax
state across all of them, and writes its rows of out and lse once. The dK/dV program does the
same per KV tile with the roles swapped, summing the query heads of its KV head (GQA) and every
query segment that lists its key segment, so no output is written twice and there are no
atomics. Rows and keys are offset by their segment's first token in the space.

Every pair is walked from tile lists (``table`` iteration, Note [KV iteration] in
attncc.lower.plan), built from :func:`attncc.ir.analysis.analyze_segments` with the plan's
tiles: per Q tile (forward, dQ) or KV tile (dK/dV), the pair's full tiles, walked with no mask,
then its partial ones, which evaluate the pair's rule per element (its closed forms spelled by
:func:`attncc.lower.lowering.spell_rule` on the segment's grid, or on the key segment's for a
pair of two segments, whose rule reads the key alone). A tile pair is full only when both tiles
are whole (no padding), so full loops load without bounds checks. The closed-form KV ranges of
the one-grid kernels (Note [KV iteration]) are not used here yet: for a same-segment pair they
would save the lists' loads, not tiles.

Each segment's boxes are those the one-grid lowering picks for its same-segment pair (Note [Box
choice] in attncc.lower.lowering: the fewest visited tiles among the power-of-two boxes that fit
its grid), or, for a segment smaller than a tile, one box that holds it all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from attncc.errors import PatternError, field_error
from attncc.ir.analysis import FULL, analyze_segments
from attncc.ir.canonical import canonicalize
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.ir.segments import BySegments
from attncc.ir.symbolic import rules
from attncc.ir.validate import required_heads
from attncc.lower.lowering import (
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    LaunchConfig,
    boxes,
    lower,
    spell_rule,
    split_table,
    table_values,
)
from attncc.lower.plan import RANK, pad3

Box = tuple[int, int, int]


@dataclass(frozen=True)
class SegmentPart:
    """One segment as the kernels see it: its first token in the space, its grid padded to
    rank 3, its Q and KV boxes, and its first Q and KV tile among the space's."""

    name: str
    offset: int
    shape: Box
    q_box: Box
    kv_box: Box
    q_start: int
    kv_start: int

    def q_tiles(self) -> Box:
        """Q tiles per axis."""
        return tuple(math.ceil(s / t) for s, t in zip(self.shape, self.q_box))  # type: ignore[return-value]

    def kv_tiles(self) -> Box:
        return tuple(math.ceil(s / t) for s, t in zip(self.shape, self.kv_box))  # type: ignore[return-value]

    @property
    def q_count(self) -> int:
        return math.prod(self.q_tiles())

    @property
    def kv_count(self) -> int:
        return math.prod(self.kv_tiles())


@dataclass(frozen=True)
class PairPart:
    """A listed (query segment, key segment) pair: indices into the plan's segments, its rule
    per element as a Triton expression of ``qf``/``kf`` (flat in their segments) and
    ``qc0..2``/``kc0..2`` (coordinates on their segments' grids, rank 3) that may read
    ``TABLES`` (its lookups, at ``lookups_at`` of the rule buffer), and where its lists' offsets
    start in the buffers of :func:`segment_tables`: ``2 * Q tiles + 1`` of them by Q tile
    (forward, dQ) and ``2 * KV tiles + 1`` by KV tile (dK/dV)."""

    q: int
    k: int
    keep: str
    lookups_at: int
    fwd_at: int
    bwd_at: int


@dataclass(frozen=True)
class SegmentPlan:
    """The three kernels of a pattern per pair of segments (Note [Segment kernels])."""

    segments: tuple[SegmentPart, ...]
    pairs: tuple[PairPart, ...]
    head_dim: int
    head_dim_padded: int
    dtype: str
    block_m: int
    block_n: int
    num_warps: int  # the forward's and dQ's
    num_stages: int
    dkdv_warps: int  # Note [Segment backward warps]
    softcap: float | None = None  # the cap c of c * tanh(s / c) on the scaled score, or None
    fast_tanh: bool = False  # tanh.approx on a GPU (16-bit inputs), as the one-grid kernels

    @property
    def q_tiles(self) -> int:
        """Q tiles of the whole space: the forward's and dQ's programs per batch element and head."""
        return sum(s.q_count for s in self.segments)

    @property
    def kv_tiles(self) -> int:
        return sum(s.kv_count for s in self.segments)

    @property
    def tokens(self) -> int:
        return sum(math.prod(s.shape) for s in self.segments)


def lower_segments(
    pattern: BySegments,
    head_dim: int,
    dtype: str,
    block_m: int,
    block_n: int,
    num_warps: int = 4,
    num_stages: int = 2,
    dkdv_warps: int = 4,
    softcap: float | None = None,
    device_type: str = "cuda",
) -> SegmentPlan:
    """Plan the kernels of ``pattern`` for ``[B, H, N, D]`` tensors of its whole space;
    ``softcap``: the score's cap (attncc.ir.score.softcap), if any."""
    if not isinstance(pattern, BySegments):
        raise field_error(PatternError, "pattern", str(pattern), "by_segments(...)")
    if dtype not in SUPPORTED_DTYPES:
        raise field_error(PatternError, "dtype", dtype, ", ".join(SUPPORTED_DTYPES))
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise field_error(PatternError, "head_dim", head_dim, f"1..{MAX_HEAD_DIM} (padded to a power of two)")
    if required_heads(pattern) is not None:
        allowed = "one pattern for every head (attncc.reference.attention and the analysis take per_head)"
        raise field_error(PatternError, "by_segments pairs", "per_head", allowed)
    space = pattern.space
    parts, q_start, kv_start = [], 0, 0
    for s, (name, grid) in enumerate(zip(space.names, space.grids)):
        same = pattern.pattern_of(name, name)
        q_box, kv_box = _boxes(same, grid, (head_dim, dtype, block_m, block_n))
        part = SegmentPart(name, space.offsets[s], pad3(grid.shape, 1), q_box, kv_box, q_start, kv_start)
        parts.append(part)
        q_start, kv_start = q_start + part.q_count, kv_start + part.kv_count
    pairs, lookups_at, fwd_at, bwd_at = [], 0, 0, 0
    for i, j, pair in pattern.listed():
        grid = space.grids[j]
        keep, _ = spell_rule(rules(canonicalize(pair, grid), grid), grid)
        pairs.append(PairPart(i, j, keep, lookups_at, fwd_at, bwd_at))
        lookups_at += table_values(pair, grid).size
        fwd_at += 2 * parts[i].q_count + 1
        bwd_at += 2 * parts[j].kv_count + 1
    return SegmentPlan(
        segments=tuple(parts),
        pairs=tuple(pairs),
        head_dim=head_dim,
        head_dim_padded=max(16, 1 << (head_dim - 1).bit_length()),
        dtype=dtype,
        block_m=block_m,
        block_n=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
        dkdv_warps=dkdv_warps,
        softcap=softcap,
        fast_tanh=softcap is not None and device_type == "cuda" and dtype != "float32",
    )


def _candidates(tokens: int, grid: Grid) -> list[Box]:
    """Power-of-two boxes of ``tokens`` tokens that fit ``grid`` (rank 3), or, on a grid too
    small for any, the one that spans its last axes (rounded up to powers of two) and puts the
    rest on its first: a single tile where the segment is smaller than one."""
    shape = pad3(grid.shape, 1)
    found = boxes(tokens, shape)
    if found:
        return found
    box, rest = [1, 1, 1], tokens
    first = RANK - grid.rank
    for a in range(RANK - 1, first, -1):
        box[a] = min(rest, 1 << (shape[a] - 1).bit_length())
        rest //= box[a]
    box[first] = rest
    return [tuple(box)]  # type: ignore[list-item]


def _boxes(same: Pattern | None, grid: Grid, plan_args: tuple) -> tuple[Box, Box]:
    """The Q and KV boxes of a segment (Note [Segment kernels]): those the one-grid lowering
    picks for its same-segment pair (Note [Box choice] in attncc.lower.lowering: the fewest
    visited tiles, counted in closed form) when its plan has no dilation groups (whose boxes are
    in group coordinates), else the first candidates."""
    head_dim, dtype, block_m, block_n = plan_args
    q_list, kv_list = _candidates(block_m, grid), _candidates(block_n, grid)
    if same is None or (len(q_list) == 1 and len(kv_list) == 1):
        return q_list[0], kv_list[0]
    plan = lower(same, grid, head_dim, dtype, config=LaunchConfig(block_m, block_n))
    if plan.dilation != (1, 1, 1):
        return q_list[0], kv_list[0]
    return plan.q_tile, plan.kv_tile


def segment_tables(pattern: BySegments, plan: SegmentPlan) -> tuple[np.ndarray, ...]:
    """The five int32 buffers the kernels take: every pair's rule lookups, then the tile lists
    by Q tile (offsets, entries) and by KV tile (offsets, entries). A pair's offsets start at
    its ``fwd_at``/``bwd_at`` and hold, per tile, where its full tiles start, where its partial
    ones start and where they end, as indices into the entries, which are tile indices in the
    other side's segment (:func:`attncc.lower.lowering.split_table`)."""
    space = pattern.space
    user = [RANK - g.rank for g in space.grids]
    q_tiles = [p.q_box[u:] for p, u in zip(plan.segments, user)]
    kv_tiles = [p.kv_box[u:] for p, u in zip(plan.segments, user)]
    a = analyze_segments(pattern, q_tiles, kv_tiles)
    classes = a.tile_classes[0]
    q_whole = a.q_tiling.sizes() == plan.block_m
    kv_whole = a.kv_tiling.sizes() == plan.block_n
    lookups, fwd_offsets, fwd_entries, bwd_offsets, bwd_entries = [], [], [], [], []
    for i, j, rule in pattern.listed():
        lookups.append(table_values(rule, space.grids[j]))
        qs, ks = plan.segments[i], plan.segments[j]
        rows = slice(qs.q_start, qs.q_start + qs.q_count)
        cols = slice(ks.kv_start, ks.kv_start + ks.kv_count)
        visited = classes[rows, cols] > 0
        full = (classes[rows, cols] == FULL) & q_whole[rows][:, None] & kv_whole[cols][None, :]
        for offsets, entries, by_row, full_by_row in (
            (fwd_offsets, fwd_entries, visited, full),
            (bwd_offsets, bwd_entries, visited.T, full.T),
        ):
            split, listed = _lists(by_row, full_by_row, sum(len(e) for e in entries))
            offsets.append(split)
            entries.append(listed)
    one = np.zeros(1, np.int32)  # a buffer no list reads: a pointer still needs memory
    return tuple(
        np.concatenate(parts).astype(np.int32) if parts and sum(len(p) for p in parts) else one
        for parts in (lookups, fwd_offsets, fwd_entries, bwd_offsets, bwd_entries)
    )


def _lists(visited: np.ndarray, full: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``visited`` ``[rows, tiles]``, its full tiles, then its partial ones, as
    :func:`attncc.lower.lowering.split_table` lays them out, the offsets shifted by ``base``
    (where these entries start among all pairs')."""
    offsets = np.concatenate([[0], np.cumsum(visited.sum(1))]).astype(np.int32)
    entries = (2 * np.nonzero(visited)[1] + full[visited]).astype(np.int32)
    split, listed = split_table(offsets, entries)
    return split + base, listed

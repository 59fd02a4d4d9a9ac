"""Lowering: a head-independent pattern on a grid -> :class:`KernelPlan`.

Decides the dilation grouping, the tile boxes, and how KV tiles are visited
(closed-form ranges where the pattern is a product of monotone per-axis
windows, else a table of non-empty tiles), and spells the per-element rule
for partial tiles as a Triton expression. See the notes in :mod:`.plan`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np
import sympy

from attncc.errors import PatternError, field_error
from attncc.ir import symbolic
from attncc.ir.analysis import analyze
from attncc.ir.canonical import canonicalize
from attncc.ir.grid import Grid
from attncc.ir.nodes import (
    Axial,
    Band,
    BlockDiagonal,
    Causal,
    Congruent,
    Dense,
    Intersection,
    KeyRange,
    Neighborhood,
    Pattern,
    SlidingWindow,
    Strided,
    Union,
)
from attncc.ir.score import INPUTS, Score, as_score, table_units
from attncc.ir.symbolic import (
    RUNTIME_KINDS,
    AllOf,
    AnyOf,
    FlatRange,
    GridBox,
    Predicate,
    Progression,
    Rule,
    Runtime,
    offset_reach,
    rules,
)
from attncc.ir.text import format_pattern
from attncc.ir.validate import neighborhood_axes
from attncc.lower.plan import RANK, RUNTIME_ARGS, AxisForm, Congruence, KernelPlan, Lookup, RuntimeLeaf, pad3

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")
MAX_HEAD_DIM = 256
_MIN_BLOCK = 16

_i = sympy.Symbol("i", integer=True, nonnegative=True)
_lg = sympy.Symbol("Lg", integer=True, positive=True)


def lower(
    pattern: Pattern,
    grid: Grid,
    head_dim: int,
    dtype: str,
    q_tile: tuple[int, ...] | None = None,
    kv_tile: tuple[int, ...] | None = None,
    score: str | Score = "softmax",
    config: LaunchConfig | None = None,
    device_type: str = "cuda",
    region: tuple[int, ...] | None = None,
) -> KernelPlan:
    """Plan the forward kernel of a head-independent ``pattern`` on ``grid``.

    Explicit ``q_tile``/``kv_tile`` boxes override the config's token counts. ``score`` is a
    score or its text form (``"softmax"``, ``"sigmoid"``, ``"softcap(30.0) + key_bias"``, ...:
    attncc.ir.score); only its form counts (term values are kernel inputs). ``device_type``
    is where the kernel runs ("cuda", or "cpu" for Triton's interpreter). ``region``: the shape
    of the box of the grid the queries cover, if not all of it (Note [Query regions]).
    """
    config = config or LaunchConfig()
    if dtype not in SUPPORTED_DTYPES:
        raise field_error(PatternError, "dtype", dtype, ", ".join(SUPPORTED_DTYPES))
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise field_error(PatternError, "head_dim", head_dim, f"1..{MAX_HEAD_DIM} (padded to a power of two)")
    scored = as_score(score)
    scored.check(grid)
    canon = canonicalize(pattern, grid)
    ranged = _range_terms(canon, grid)
    dilation = ranged[0] if ranged else (1, 1, 1)
    group0 = tuple((s + d - 1) // d for s, d in zip(pad3(grid.shape, 1), dilation))
    q_box = _config_box(config.q_box, grid, "q_box") if q_tile is None and config.q_box else None
    kv_box = _config_box(config.kv_box, grid, "kv_box") if kv_tile is None and config.kv_box else None
    leaves = () if ranged else runtime_leaves(canon, grid)
    q_block, kv_block = _block_aligned(leaves, grid, config.q_block, config.kv_block)
    q_box = q_box or _box(q_tile, grid, group0, q_block, "q_tile")
    kv_box = kv_box or _box(kv_tile, grid, group0, kv_block, "kv_tile")
    head_dim_padded = max(16, 1 << (head_dim - 1).bit_length())
    common = dict(
        grid=pad3(grid.shape, 1),
        q_tile=q_box,
        kv_tile=kv_box,
        head_dim=head_dim,
        head_dim_padded=head_dim_padded,
        dtype=dtype,
        **_term_fields(scored, canon, grid, dilation, dtype, device_type),
        q_region=_region(region, grid, dilation),
        num_warps=config.num_warps,
        num_stages=config.num_stages or DEEP_PIPELINE,
    )
    if ranged:
        terms = ranged[1]
        full_terms = tuple(t for t, term in enumerate(terms) if not any(ax.congruences for ax in term))
        plan = KernelPlan(
            dilation=dilation,
            iteration="range",
            terms=terms,
            full_terms=full_terms,
            split_full=full_terms == (0,) and len(terms) == 1,
            mask_expr="",
            lookups=(),
            **common,
        )
        if q_tile is None and kv_tile is None and config.q_box is None and config.kv_box is None:
            plan = _fewest_visits(plan, group0)
        plan = with_full_loops(plan)
        if config.num_stages is None:
            plan = dataclasses.replace(plan, num_stages=_pipeline_depth(plan))
        return plan
    mask_expr, lookups = spell_rule(rules(canon, grid), grid)
    common["num_stages"] = config.num_stages or DEEP_PIPELINE
    if leaves:  # Note [Runtime plans] in attncc.lower.plan
        common.update(runtime=leaves, program=_program(canon))
    return KernelPlan(
        dilation=(1, 1, 1),
        iteration="runtime" if leaves else "table",
        terms=(),
        full_terms=(),
        split_full=False,
        mask_expr=mask_expr,
        lookups=lookups,
        **common,
    )


def _term_fields(
    score: Score, canon: Pattern, grid: Grid, dilation: tuple, dtype: str, device_type: str
) -> dict:
    """The plan's score fields (Note [Score terms] in attncc.ir.score): the kernel's form of
    ``score``, with the relative position table checked against the offsets ``canon`` keeps."""
    table = None
    if score.rel_pos_bias is not None:
        table = pad3(score.rel_pos_bias, 1)
        units = table_units(canon, grid)
        if units != dilation[RANK - grid.rank :]:
            raise field_error(
                PatternError, "rel_pos_bias pattern", format_pattern(canon),
                "a pattern without dilation, or one that lowers to closed-form ranges",
                "the table counts offsets in units of the dilation, which a tile table does not keep",
            )  # fmt: skip
        reach = offset_reach(rules(canon, grid), grid)
        needed = tuple(2 * -(-r // d) + 1 for r, d in zip(reach, units))
        if any(s < n for s, n in zip(score.rel_pos_bias, needed)):
            raise field_error(
                PatternError, "rel_pos_bias sizes", score.rel_pos_bias,
                f"at least {needed}: the pattern keeps offsets up to {reach} (in units of dilation {units})",
                "Note [Table gradient] in attncc.lower.plan",
            )  # fmt: skip
        entries = math.prod(score.rel_pos_bias)
        if "rel_pos_bias" in score.grads and grid.size * entries >= 2**31:
            raise field_error(
                PatternError, "rel_pos_bias gradient", f"{grid.size} tokens x {entries} entries",
                "under 2^31 (Note [Table gradient] in attncc.lower.plan: a float32 row of entries per query)",
            )  # fmt: skip
    return dict(
        score=score.kind,
        softcap=score.softcap,
        temperature=score.temperature,
        alibi="flat" if score.alibi == "axes" and grid.rank == 1 else score.alibi,
        rel_pos_bias=table,
        query_bias=score.query_bias,
        key_bias=score.key_bias,
        bias=score.bias,
        dropout=score.dropout,
        # Every tile of a sequence without dilation starts at a multiple of 4 keys: 4 keys share
        # one Philox call, in the forward's tiles and in dK/dV's alike.
        dropout_packed=score.dropout and grid.rank == 1 and dilation == (1, 1, 1),
        grads=tuple(name for name in INPUTS if name in score.grads),
        fast_tanh=score.softcap is not None and device_type == "cuda" and dtype != "float32",
    )


BACKENDS = ("triton", "cutlass")


@dataclass(frozen=True)
class LaunchConfig:
    """Tokens per Q and KV tile and the launch knobs: what the autotuner chooses.

    ``q_box``/``kv_box`` (rank 3, group coordinates, powers of two) fix the tile
    shapes; without them lowering spreads ``q_block``/``kv_block`` tokens into
    the boxes that visit the fewest tiles (Note [Box choice]).
    """

    q_block: int = 64
    kv_block: int = 64
    num_warps: int = 4
    num_stages: int | None = 2  # None: lowering picks (Note [Pipeline depth])
    q_box: tuple[int, int, int] | None = None
    kv_box: tuple[int, int, int] | None = None
    backend: str = "triton"

    def __post_init__(self) -> None:
        for name in ("q_block", "kv_block"):
            _check_pow2(name, getattr(self, name), _MIN_BLOCK, 1024)
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise field_error(PatternError, "num_warps", self.num_warps, "1, 2, 4, 8, 16")
        if self.num_stages is not None and (
            isinstance(self.num_stages, bool)
            or not isinstance(self.num_stages, int)
            or not 1 <= self.num_stages <= 8
        ):
            raise field_error(PatternError, "num_stages", self.num_stages, "1..8 (or None: lowering picks)")
        for name, block in (("q_box", self.q_block), ("kv_box", self.kv_block)):
            box = getattr(self, name)
            if box is None:
                continue
            if not isinstance(box, tuple) or len(box) != RANK:
                raise field_error(PatternError, name, box, f"{RANK} powers of two (a rank-3 box) or None")
            for v in box:
                _check_pow2(name, v, 1, 1024)
            if math.prod(box) != block:
                raise field_error(PatternError, name, box, f"a box of {name[:-4]}_block = {block} tokens")
        if self.backend not in BACKENDS:
            raise field_error(PatternError, "backend", self.backend, ", ".join(BACKENDS))

    @staticmethod
    def default(device_type: str, head_dim: int, dtype: str = "bfloat16") -> LaunchConfig:
        """A sound starting point: large tiles on a GPU, small ones for the interpreter.

        fp32 dots run in IEEE fp32 on the FMA pipes, each thread holding its share of both
        operands: 64 x 32 tiles on 8 warps, which fit up to D = 64 (128 x 64 spills at every
        head dim; at D = 128 every fp32 config spills: fp32 is the exact path, not a fast one).
        """
        if device_type != "cuda":
            return LaunchConfig()
        if dtype == "float32":
            return LaunchConfig(64, 32, 8, 2)
        return LaunchConfig(128, 64, 8 if head_dim >= 128 else 4, None if head_dim <= 128 else 2)

    @staticmethod
    def default_dkdv(device_type: str, head_dim: int, dtype: str = "bfloat16") -> LaunchConfig:
        """The tiles of the dK/dV kernel, which holds a KV tile and walks Q tiles.

        Note [Backward tiles]: dK/dV keeps two fp32 accumulators of ``kv_block x D`` and
        the transposed scores of ``kv_block x q_block``. With the forward's tiles (64 keys
        on 8 warps) Triton gives both warpgroups the same 64 rows (twice the work) and the
        kernel spills; 128 keys fill both warpgroups. With D = 128, 32 queries still spill
        (255 registers) and 16 fit; with D = 64 the accumulators are half as large and 32
        queries fit (the sm_90 static profile: benchmarks/STATIC.md). The interpreter takes
        small tiles that differ from the forward's, so the CPU tests walk a second tiling.
        """
        if device_type != "cuda":
            return LaunchConfig(32, 64)
        if dtype == "float32":
            return LaunchConfig(16, 64, 4, 2)
        if head_dim > 128:
            return LaunchConfig(16, 64, 4, 2)
        return LaunchConfig(32 if head_dim <= 64 else 16, 128, 8, 2)


def _check_pow2(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi or value & (value - 1):
        raise field_error(PatternError, name, value, f"a power of two in {lo}..{hi}")


# --- tiles ---------------------------------------------------------------------------


def boxes(tokens: int, group0: tuple) -> list[tuple[int, int, int]]:
    """Power-of-two boxes of ``tokens`` tokens that fit the group (rank-3)."""
    caps = [max(0, (lg - 1).bit_length()) for lg in group0]
    out = []
    for exps in itertools.product(*(range(c + 1) for c in caps)):
        box = tuple(1 << e for e in exps)
        if math.prod(box) == tokens:
            out.append(box)
    return out


def _fewest_visits(plan: KernelPlan, group0: tuple) -> KernelPlan:
    """The Q and KV boxes (same token counts) whose kernel visits the fewest KV tiles.

    Note [Box choice]: the visit count is exact for range plans and cheap to
    evaluate, so lowering picks the box shape that maximises the plan's own
    tile-level bound; the first candidate (the round-robin default) wins ties.
    """
    from attncc.lower.visits import visited_tiles

    best, best_visits = plan, visited_tiles(plan)[0]
    for q_box in boxes(plan.block_m, group0):
        for kv_box in boxes(plan.block_n, group0):
            candidate = dataclasses.replace(plan, q_tile=q_box, kv_tile=kv_box)
            visits = visited_tiles(candidate)[0]
            if visits < best_visits:
                best, best_visits = candidate, visits
    return best


# Note [Pipeline depth]: a software-pipelined loop of S stages loads S - 1 tiles ahead,
# so each walk starts with a prologue of S - 1 tiles' loads and runs S - 1 iterations
# whose loads are predicated off; with few tiles per program that is per-program work
# the tiles cannot hide, and the deeper pipeline's smem (a KV stage is 2 x BLOCK_N x D)
# keeps a second program off the SM. A default config (num_stages None) gets the deep
# pipeline when the walk averages at least SHORT_WALK tiles per program, else two
# stages; table plans, whose walks are known only from their tables, get the deep one.
DEEP_PIPELINE, SHORT_WALK = 3, 8


def _pipeline_depth(plan: KernelPlan) -> int:
    from attncc.lower.visits import tile_counts

    visited = tile_counts(plan)[0]
    return DEEP_PIPELINE if visited.mean() >= SHORT_WALK else 2


def with_full_loops(plan: KernelPlan) -> KernelPlan:
    """``plan`` with a full-tile loop only in the walks that have full tiles (the dilated
    neighborhoods of a small window, say, have none: the loop's set-up would be wasted)."""
    from attncc.lower.visits import inverse_walk, walk

    if 0 not in plan.full_terms:
        return plan
    probe = dataclasses.replace(plan, full_walk=True, full_inverse=True)
    forward, inverse = walk(probe)[0], inverse_walk(probe)[0]
    return dataclasses.replace(plan, full_walk=forward.total > 0, full_inverse=inverse.total > 0)


# --- explicit or default tiles -----------------------------------------------------


def _box(tile, grid: Grid, group0: tuple, block: int, name: str) -> tuple[int, int, int]:
    """A rank-3 box of power-of-two sizes; by default ``block`` tokens spread from the last axis."""
    if tile is not None:
        t = tuple(tile) if isinstance(tile, (tuple, list)) else (tile,)
        if len(t) != grid.rank or any(not isinstance(v, int) or v < 1 or v & (v - 1) for v in t):
            raise field_error(PatternError, name, t, f"{grid.rank} powers of two (a box, one per axis)")
        return pad3(t, 1)  # type: ignore[return-value]
    sizes = [1, 1, 1]
    caps = [1 << max(0, (lg - 1).bit_length()) for lg in group0]
    while math.prod(sizes) < block and any(s < c for s, c in zip(sizes, caps)):
        for a in (2, 1, 0):  # grow the fastest axis first, round-robin
            if sizes[a] < caps[a] and math.prod(sizes) < block:
                sizes[a] *= 2
    while math.prod(sizes) < _MIN_BLOCK:  # tl.dot needs 16 rows; extra rows are masked
        sizes[2] *= 2
    return tuple(sizes)  # type: ignore[return-value]


def _config_box(box: tuple[int, int, int], grid: Grid, name: str) -> tuple[int, int, int]:
    """A config's rank-3 box, which must not extend along the axes the grid lacks."""
    if any(v != 1 for v in box[: RANK - grid.rank]):
        raise field_error(
            PatternError, name, box, f"1 on the first {RANK - grid.rank} axes of a rank-{grid.rank} grid"
        )
    return box


# --- range plans ----------------------------------------------------------------------


_MAX_TERMS = 2  # a union of more range terms uses a table (Note [Loops]: walks skip one box)


def _range_terms(p: Pattern, grid: Grid) -> tuple[tuple[int, int, int], tuple] | None:
    """Dilation and the range terms of ``p``, or None when it needs a table.

    ``p`` must be a union (possibly of one) of products of: neighborhoods,
    single-axis axials (a multi-axis axial is a union of those), one-axis bands,
    blocks, congruences and key ranges, and, on 1-D grids, bands, causal and
    strided. On a dilated axis every term must be a neighborhood of that
    dilation (group coordinates cannot name other groups).
    """
    products: list[Pattern] = []
    for op in p.operands if isinstance(p, Union) else (p,):
        if isinstance(op, Axial) and op.axes is not None and len(op.axes) > 1:
            products.extend(Axial((a,)) for a in op.axes)
        else:
            products.append(op)
    if len(products) > _MAX_TERMS:
        return None
    per_term = [_product(prod, grid) for prod in products]
    if any(t is None for t in per_term):
        return None
    dilation = []
    for a in range(RANK):
        ds = {t[a][0] for t in per_term}  # type: ignore[index]
        if len(ds) > 1 and ds != {1}:
            return None
        dilation.append(ds.pop())
    terms = [tuple(axis[1] for axis in t) for t in per_term]  # type: ignore[union-attr]
    # Congruence-free terms first: the first term's full tiles get the unmasked loop.
    terms.sort(key=lambda term: any(axis.congruences for axis in term))
    return tuple(dilation), tuple(terms)  # type: ignore[return-value]


def _product(p: Pattern, grid: Grid) -> list[tuple[int, AxisForm]] | None:
    """Per axis ``(dilation, form)`` of a product, or None if ``p`` is not one."""
    off = RANK - grid.rank
    firsts: list[list] = [[] for _ in range(RANK)]
    lasts: list[list] = [[] for _ in range(RANK)]
    congruences: list[list[Congruence]] = [[] for _ in range(RANK)]
    dilations: list[set[int]] = [set() for _ in range(RANK)]

    def window(a: int, prog: Progression, d: int = 1) -> None:
        dilations[a].add(d)
        firsts[a].append(prog.first.subs(symbolic.q, _i))
        lasts[a].append(prog.last.subs(symbolic.q, _i))

    for factor in p.operands if isinstance(p, Intersection) else (p,):
        if isinstance(factor, Dense):
            continue
        if isinstance(factor, Neighborhood):
            for a, (w, d, s, c) in enumerate(neighborhood_axes(factor, grid.rank)):
                window(off + a, symbolic.neighborhood_progression(_lg, w, 1, s, c), d)
        elif isinstance(factor, SlidingWindow) and grid.rank == 1:
            window(off, symbolic.band_progression(_lg, factor.left, factor.right))
        elif isinstance(factor, Causal) and grid.rank == 1:
            window(off, Progression(sympy.Integer(0), symbolic.q, sympy.Integer(1)))
        elif isinstance(factor, Strided) and grid.rank == 1:
            dilations[off].add(1)
            anchor = to_triton((symbolic.q - factor.offset).subs(symbolic.q, _i))
            congruences[off].append(Congruence(anchor, factor.stride))
        elif isinstance(factor, Band):
            window(off + factor.axis, symbolic.offset_progression(_lg, factor.lo, factor.hi))
        elif isinstance(factor, BlockDiagonal):
            window(off + factor.axis, symbolic.block_progression(_lg, factor.block))
        elif isinstance(factor, KeyRange):
            window(off + factor.axis, symbolic.key_progression(_lg, factor.lo, factor.hi))
        elif isinstance(factor, Congruent):
            dilations[off + factor.axis].add(1)
            anchor = to_triton(_i - factor.offset)
            congruences[off + factor.axis].append(Congruence(anchor, factor.modulus))
        elif isinstance(factor, Axial) and factor.axes is not None and len(factor.axes) == 1:
            for a in range(grid.rank):
                whole = a == factor.axes[0]
                window(off + a, symbolic.full_progression(_lg) if whole else symbolic.point_progression())
        else:
            return None
    out = []
    sizes = pad3(grid.shape, 1)
    for a in range(RANK):
        if len(dilations[a]) > 1:
            return None  # two groupings on one axis
        first = sympy.Max(*firsts[a]) if firsts[a] else sympy.Integer(0)
        last = sympy.Min(*lasts[a]) if lasts[a] else _lg - 1
        d = dilations[a].pop() if dilations[a] else 1
        lengths = {(sizes[a] - g + d - 1) // d for g in range(d)}
        guarded = _guard_empty_rows(first, last, lengths)
        if guarded is None:
            return None
        bounds = _bounded(*guarded, lengths)
        if bounds is None:
            return None
        form = AxisForm(to_triton(guarded[0]), to_triton(guarded[1]), tuple(congruences[a]), *bounds)
        out.append((d, form))
    return out


def _bounded(first: sympy.Expr, last: sympy.Expr, lengths: set[int]) -> tuple[bool, bool] | None:
    """Whether some row's keys start after 0 (``low``) and end before ``Lg - 1`` (``high``);
    None when a kept row's keys leave ``[0, Lg)``.

    Note [Masks imply validity]: a partial tile tests a key against its row's
    ``first`` where ``low`` and ``last`` where ``high``; a bound that holds for
    every row needs no test. Kept keys lie in ``[0, Lg)``, so the ``last`` test
    alone keeps the padding keys of a ragged tile out: only an axis without it
    tests validity (and only in the forward: padding keys load as zeros, which
    add nothing to the gradients).
    """
    low = high = False
    for length in lengths:
        i = np.arange(length, dtype=np.int64)
        f, l_ = (symbolic.to_numpy(e.subs({_lg: length, _i: symbolic.q}))(i) for e in (first, last))
        kept = f <= l_
        if np.any(f[kept] < 0) or np.any(l_[kept] > length - 1):
            return None
        low |= bool(np.any(f != 0))
        high |= bool(np.any(l_ != length - 1))
    return low, high


# Note [Empty rows]: the kernel visits KV tiles ``first(i0) // TK .. last(i1) // TK``
# of a Q tile ``[i0, i1]``. That is exactly the tiles its rows' keys touch when
# first and last are non-decreasing and each row's keys start at most one past
# where the previous row's end. A row with no key on an axis (a band that
# leaves the diagonal, cut at a border) has ``first > last``, which alone does
# not make a tile range empty (both may fall in one tile; and Triton's ``//``
# truncates toward zero). When the empty rows are a prefix ``i < a`` and a
# suffix ``i > b`` of the axis, ``first`` is raised to at least ``first(a)``
# and ``last`` lowered to at most ``last(b)`` (no kept row changes, and a
# tile's range starts and ends at its kept rows), then ``last`` is moved down
# by ``_NO_ROW`` on the prefix and ``first`` up by it on the suffix: both stay
# monotone and a tile of empty rows visits no tile (``_NO_ROW`` exceeds any
# tile). Other shapes of empty rows, or gaps between rows, need a table.
_NO_ROW = 1 << 24


def _guard_empty_rows(
    first: sympy.Expr, last: sympy.Expr, lengths: set[int]
) -> tuple[sympy.Expr, sympy.Expr] | None:
    """``first``/``last`` with Note [Empty rows] applied, or None when ranges would not be exact."""
    guards = []
    for length in sorted(lengths):
        i = np.arange(length, dtype=np.int64)
        f, l_ = (symbolic.to_numpy(e.subs({_lg: length, _i: symbolic.q}))(i) for e in (first, last))
        if np.any(np.diff(f) < 0) or np.any(np.diff(l_) < 0):
            return None
        rows = np.flatnonzero(f <= l_)
        if len(rows) and (rows[-1] - rows[0] + 1 != len(rows) or np.any(f[rows[1:]] > l_[rows[:-1]] + 1)):
            return None  # empty rows between kept ones, or a gap between rows' keys
        a, b = (int(rows[0]), int(rows[-1])) if len(rows) else (length, length - 1)
        if (a, b) != (0, length - 1):
            guards.append((a, b, length))
    if not guards:
        return first, last
    if len(lengths) > 1:
        return None  # the guards would differ between dilation groups
    a, b, length = guards[0]
    if a > 0:
        if a < length:
            first = sympy.Max(first, first.subs({_lg: length, _i: a}))
        last = last - _NO_ROW * sympy.Min(sympy.Max(a - _i, 0), 1)
    if b < length - 1:
        last = sympy.Min(last, last.subs({_lg: length, _i: b}))
        first = first + _NO_ROW * sympy.Min(sympy.Max(_i - b, 0), 1)
    return first, last


def to_triton(expr: sympy.Expr) -> str:
    return symbolic.to_code(expr, min_name="tl.minimum", max_name="tl.maximum")


# --- table plans ----------------------------------------------------------------------


class _FloorPrinter(symbolic._IntegerPrinter):
    """Prints a rule's integer expressions for a kernel, rounding down as sympy does.

    Note [Floor division in kernels]: Triton's integer ``//`` and ``%`` truncate toward zero
    (C's semantics), sympy's floor and Mod round down. A rule's numerators can be negative (a
    dilated neighbourhood on an axis whose length is not a multiple of the dilation gives
    ``(-(q % 2)) // 2``), so a rule per element spells both rounding down: with ``m = ((a % b)
    + b) % b`` (in [0, b) for b > 0, as every divisor of a rule is), ``a - m`` is a multiple of
    b, which ``//`` divides exactly. (Range plans' closed forms, in group coordinates, divide
    no negative number.)
    """

    def __init__(self) -> None:
        super().__init__("tl.minimum", "tl.maximum")

    def _print_floor(self, expr: sympy.Expr) -> str:
        num, den = sympy.fraction(sympy.together(expr.args[0]))
        if den == 1:
            return self._print(num)
        a, b = self._operand(num), self._operand(den, strict=True)
        return f"(({a} - ((({a} % {b}) + {b}) % {b})) // {b})"

    def _print_Mod(self, expr: sympy.Expr) -> str:
        a, b = self._operand(expr.args[0]), self._operand(expr.args[1], strict=True)
        return f"((({a} % {b}) + {b}) % {b})"


class _RulePrinter(_FloorPrinter):
    """Prints predicates with lookups as Triton loads from the plan's table buffer."""

    def __init__(self, lookups: dict[str, Lookup]) -> None:
        super().__init__()
        self.lookups = lookups

    def _print_Symbol(self, expr: sympy.Symbol) -> str:
        return {"q": "qf", "k": "kf"}.get(expr.name, expr.name)

    def _print_Function(self, expr: sympy.Expr) -> str:
        lk = self.lookups[expr.func.__name__]
        index = [self._print(a) for a in expr.args]
        flat = index[0] if len(index) == 1 else f"({index[0]}) * {lk.row} + ({index[1]})"
        return f"tl.load(TABLES + {lk.offset} + ({flat}))"

    def _print_Equality(self, expr: sympy.Expr) -> str:
        return f"({self._print(expr.lhs)} == {self._print(expr.rhs)})"

    def _print_Or(self, expr: sympy.Expr) -> str:
        return "(" + " | ".join(self._print(a) for a in expr.args) + ")"

    def _print_And(self, expr: sympy.Expr) -> str:
        return "(" + " & ".join(self._print(a) for a in expr.args) + ")"


def _spell_progression(prog: Progression, qname: str, kname: str) -> str:
    sub = {symbolic.q: sympy.Symbol(qname)}
    printer = _FloorPrinter()  # Note [Floor division in kernels]
    f = printer.doprint(prog.first.subs(sub))
    last = printer.doprint(prog.last.subs(sub))
    keep = f"(({kname}) >= ({f})) & (({kname}) <= ({last}))"
    if prog.step != 1:  # k - first >= 0 on every kept key, so C's % tests the congruence
        keep += f" & ((({kname}) - ({f})) % ({printer.doprint(prog.step)}) == 0)"
    return f"({keep})"


def spell_rule(rule: Rule, grid: Grid) -> tuple[str, tuple[Lookup, ...]]:
    """``keep`` as a Triton expression of ``qf``/``kf`` (flat) and ``qc0..2``/``kc0..2``."""
    lookups: list[Lookup] = []
    offset = 0

    def spell(r: Rule) -> str:
        nonlocal offset
        if isinstance(r, GridBox):
            off = RANK - grid.rank
            return (
                "("
                + " & ".join(
                    _spell_progression(p, f"qc{off + a}", f"kc{off + a}") for a, p in enumerate(r.axes)
                )
                + ")"
            )
        if isinstance(r, FlatRange):
            return _spell_progression(r.range, "qf", "kf")
        if isinstance(r, Runtime):
            return _spell_runtime(r.node, grid)
        if isinstance(r, Predicate):
            local = {}
            for name, values in r.tables:
                arr = np.asarray(values)
                lk = Lookup(f"{name}_{len(lookups)}", offset, arr.shape[1] if arr.ndim == 2 else 0)
                lookups.append(lk)
                local[name] = lk
                offset += arr.size
            return _RulePrinter(local).doprint(r.expr)
        joiner = " | " if isinstance(r, AnyOf) else " & "
        return "(" + joiner.join(spell(x) for x in r.rules) + ")"

    return spell(rule), tuple(lookups)


# --- runtime plans (Note [Runtime plans] in attncc.lower.plan) ----------------------------


def _runtime_nodes(p: Pattern) -> list[Pattern]:
    if getattr(p, "NAME", None) in RUNTIME_KINDS:
        return [p]
    return [n for op in getattr(p, "operands", ()) for n in _runtime_nodes(op)]


def _leaf(node: Pattern, grid: Grid) -> RuntimeLeaf:
    if node.NAME not in ("block_mask", "topk_blocks"):
        return RuntimeLeaf(node.NAME)
    block = node.block  # type: ignore[attr-defined]
    if isinstance(block, int):
        return RuntimeLeaf(node.NAME, (1, 1, block), flat=True)
    return RuntimeLeaf(node.NAME, pad3(tuple(block), 1))


def runtime_leaves(canon: Pattern, grid: Grid) -> tuple[RuntimeLeaf, ...]:
    """The runtime leaves of a canonical pattern, one per kind, in ``RUNTIME_KINDS`` order."""
    leaves = {}
    for node in _runtime_nodes(canon):
        if node.NAME in leaves:
            allowed = "one leaf of each kind whose data come with the call"
            raise field_error(PatternError, f"{node.NAME} leaves", 2, allowed)
        leaves[node.NAME] = _leaf(node, grid)
    return tuple(leaves[k] for k in RUNTIME_KINDS if k in leaves)


def _region(region: tuple[int, ...] | None, grid: Grid, dilation: tuple) -> tuple[int, int, int] | None:
    """The plan's ``q_region`` (Note [Query regions]): None for the whole grid."""
    if region is None or tuple(region) == grid.shape:
        return None
    if len(region) != grid.rank or any(not 1 <= r <= g for r, g in zip(region, grid.shape)):
        allowed = f"{grid.rank} sizes, each from 1 to the grid's {grid.shape}"
        raise field_error(PatternError, "q region", tuple(region), allowed)
    padded = pad3(tuple(region), 1)
    for a, (r, g, d) in enumerate(zip(padded, pad3(grid.shape, 1), dilation)):
        if r < g and d > 1:
            axis = a - (RANK - grid.rank)
            allowed = f"the whole axis ({g} tokens)"
            why = "the pattern is dilated there: a dilation group's tiles would not line up with q's rows"
            raise field_error(PatternError, f"q region on axis {axis}", r, allowed, why)
    return padded  # type: ignore[return-value]


def _block_aligned(
    leaves: tuple[RuntimeLeaf, ...], grid: Grid, q_block: int, kv_block: int
) -> tuple[int, int]:
    """Tile sizes that lie inside the blocks of a runtime layout on a sequence: tiles of the
    block's size or a divisor of it are each full or empty under the layout, never partial
    (the partial loop tests the layout per score: a gather per score). A block of fewer than 32
    tokens, or not a power of two, keeps the config's tiles."""
    for leaf in leaves:
        size = leaf.block[2]
        if leaf.flat and grid.rank == 1 and size >= 32 and size & (size - 1) == 0:
            q_block, kv_block = min(q_block, size), min(kv_block, size)
    return q_block, kv_block


def _program(p: Pattern) -> tuple:
    """How ``p`` combines its runtime leaves and its static parts (Note [Runtime plans]); the
    static operands of one union or intersection form one static part (exact classes)."""
    if not _runtime_nodes(p):
        return ("static", format_pattern(p))
    if getattr(p, "NAME", None) in RUNTIME_KINDS:
        return ("leaf", p.NAME)
    if not isinstance(p, (Union, Intersection)):
        allowed = "unions and intersections of primitives"
        raise field_error(PatternError, "pattern with data given per call", format_pattern(p), allowed)
    static = [op for op in p.operands if not _runtime_nodes(op)]
    children = [_program(op) for op in p.operands if _runtime_nodes(op)]
    if static:
        part = static[0] if len(static) == 1 else type(p)(tuple(static))
        children.insert(0, ("static", format_pattern(part)))
    return ("or" if isinstance(p, Union) else "and", tuple(children))


def _spell_runtime(node: Pattern, grid: Grid) -> str:
    """A runtime leaf's test of (q, k) as a load of its data (Note [Runtime plans])."""
    leaf = _leaf(node, grid)
    ptr, strides, _ = RUNTIME_ARGS[leaf.kind]
    if leaf.kind in ("block_mask", "topk_blocks"):
        if leaf.flat:
            qb, kb = f"(qf // {leaf.block[2]})", f"(kf // {leaf.block[2]})"
        else:
            sizes = pad3(grid.shape, 1)
            counts = [-(-g // b) for g, b in zip(sizes, leaf.block)]

            def index(c: str) -> str:
                b0, b1, b2 = leaf.block
                return f"((({c}0 // {b0}) * {counts[1]} + {c}1 // {b1}) * {counts[2]} + {c}2 // {b2})"

            qb, kb = index("qc"), index("kc")
        return (
            f"(tl.load({ptr} + b.to(tl.int64) * {strides}0 + h.to(tl.int64) * {strides}1 + "
            f"{qb} * {strides}2 + {kb} * {strides}3) != 0)"
        )
    if leaf.kind == "documents":
        base = f"{ptr} + b.to(tl.int64) * {strides}0"
        return f"(tl.load({base} + qf * {strides}1) == tl.load({base} + kf * {strides}1))"
    if leaf.kind == "key_mask":
        base = f"{ptr} + b.to(tl.int64) * {strides}0 + h.to(tl.int64) * {strides}1"
        return f"(tl.load({base} + kf * {strides}2) != 0)"
    return f"(kf < tl.load({ptr} + b.to(tl.int64) * {strides}0))"  # key_lengths


def static_classes(pattern: Pattern, grid: Grid, plan: KernelPlan) -> np.ndarray:
    """``[H or 1, Q tiles, KV tiles]`` int8 tile classes of a static ``pattern`` in ``plan``'s tiles."""
    q_box = plan.q_tile[RANK - grid.rank :]
    kv_box = plan.kv_tile[RANK - grid.rank :]
    return analyze(pattern, grid, q_box, kv_box).tile_classes.astype(np.int8)


def table_values(pattern: Pattern, grid: Grid) -> np.ndarray:
    """The int32 lookup buffer of a table plan, in the order ``spell_rule`` assigned."""
    parts: list[np.ndarray] = []

    def walk(r: Rule) -> None:
        if isinstance(r, Predicate):
            parts.extend(np.asarray(v, dtype=np.int32).ravel() for _, v in r.tables)
        elif isinstance(r, (AnyOf, AllOf)):
            for x in r.rules:
                walk(x)

    walk(rules(canonicalize(pattern, grid), grid))
    return np.concatenate(parts) if parts else np.zeros(1, np.int32)


def tile_table(pattern: Pattern, grid: Grid, plan: KernelPlan) -> tuple[np.ndarray, np.ndarray]:
    """CSR table of a table plan: ``offsets [q tiles + 1]`` and entries ``kv_tile * 2 + full``."""
    q_box = plan.q_tile[RANK - grid.rank :]
    kv_box = plan.kv_tile[RANK - grid.rank :]
    a = analyze(pattern, grid, q_box, kv_box)
    classes = a.tile_classes[0]
    offsets = np.concatenate([[0], np.cumsum((classes > 0).sum(1))]).astype(np.int32)
    q_idx, kv_idx = np.nonzero(classes)
    # The kernel loads a full tile without bounds checks: a ragged border tile is never full.
    whole = a.kv_tiling.sizes(grid) == math.prod(kv_box)
    full = (classes[q_idx, kv_idx] == 2) & whole[kv_idx]
    entries = (kv_idx * 2 + full).astype(np.int32)
    return offsets, entries


def tile_table_by_kv(
    offsets: np.ndarray, entries: np.ndarray, kv_tiles: int
) -> tuple[np.ndarray, np.ndarray]:
    """The CSR of :func:`tile_table` transposed: per KV tile, entries ``q_tile * 2 + full``."""
    q_idx = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    kv_idx, full = entries // 2, entries % 2
    order = np.argsort(kv_idx, kind="stable")  # Q tiles in increasing order per KV tile
    counts = np.bincount(kv_idx, minlength=kv_tiles)
    kv_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return kv_offsets, (q_idx[order] * 2 + full[order]).astype(np.int32)


def split_table(offsets: np.ndarray, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A CSR of ``tile * 2 + full`` entries as the kernels walk it: per row, the full tiles,
    then the partial ones, and ``2 * rows + 1`` offsets (row r's full tiles are
    ``[off[2r], off[2r + 1])``, its partial ones ``[off[2r + 1], off[2r + 2])``)."""
    rows = len(offsets) - 1
    row_of = np.repeat(np.arange(rows), np.diff(offsets))
    order = np.lexsort((entries % 2 == 0, row_of))  # per row (CSR order kept), full tiles first
    fulls = np.bincount(row_of, weights=entries % 2, minlength=rows).astype(np.int64)
    split = np.empty(2 * rows + 1, np.int64)
    split[0::2] = offsets
    split[1::2] = offsets[:-1] + fulls
    return split.astype(np.int32), (entries[order] // 2).astype(np.int32)


def kernel_tables(pattern: Pattern, grid: Grid, plan: KernelPlan) -> tuple[np.ndarray, ...]:
    """The five int32 buffers a plan's kernels take: rule tables, then the tile lists by Q
    tile and by KV tile (:func:`split_table`; placeholders for range plans, which read none).

    A tile pair is walked unmasked only when both tiles are whole: the forward loads a
    full KV tile, and dK/dV a full Q tile, without bounds checks.
    """
    if plan.iteration == "range":
        return (np.zeros(1, np.int32),) * 5
    if plan.iteration == "runtime":  # the call builds its lists (Note [Runtime plans])
        return table_values(pattern, grid), *(np.zeros(1, np.int32),) * 4
    offsets, entries = tile_table(pattern, grid, plan)
    q_idx = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    q_whole = _whole_tiles(plan, grid, plan.q_tile)
    entries = entries - (entries % 2) * ~q_whole[q_idx]  # a ragged Q tile's pairs are partial
    by_kv = tile_table_by_kv(offsets, entries, math.prod(plan.kv_tiles()))
    return table_values(pattern, grid), *split_table(offsets, entries), *split_table(*by_kv)


def _whole_tiles(plan: KernelPlan, grid: Grid, tile: tuple[int, int, int]) -> np.ndarray:
    """Per tile (row-major over group 0's tiles) of box ``tile``: whether it holds no padding."""
    per_axis = [
        (np.arange(math.ceil(lg / t)) + 1) * t <= lg for lg, t in zip(plan.group_lengths((0, 0, 0)), tile)
    ]
    return np.logical_and.outer(np.logical_and.outer(per_axis[0], per_axis[1]), per_axis[2]).ravel()

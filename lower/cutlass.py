"""The CUTLASS backend's side of lowering: which plans it takes, its token order, its source.

A :class:`CutlassPlan` is a :class:`KernelPlan` the Hopper templates
(``templates/cutlass``) can spell, with the index forms respelled in C++ and
the tile counts the token order needs. Plans it cannot take are refused with
the reason (:func:`refusal`), so the autotuner keeps Triton for them.

Note [Baked tables]: a table plan's KV tiles per Q tile (from the exact
analysis, as the Triton kernel reads them) and its rule's lookup values are
written into the CUDA source as constant arrays, full tiles first in each Q
tile's list so the kernel's unmasked loop takes them. The tables then need no
device buffers or arguments, and the cache key (the source's hash) covers
them: two patterns with one plan but different layouts build two kernels.

Note [Tile order]: the example FMHA loads a Q tile and each KV tile with one
TMA box of consecutive rows, so the host permutes tokens into tile order
before the kernel and back after it (both are part of the op and of every
timing). Row ``r`` of the permuted Q holds, for dilation group ``g``, Q tile
``t`` (row-major over the group-0 tile counts, as the Triton launch grid) and
offset ``u`` inside the tile's box (row-major),
``r = (g * Q_TILES + t) * BLOCK_M + u``; K and V the same with the KV box.
Rows whose group coordinate lies past the group's length are pads: zero in
K/V, masked out by the element rule, their outputs dropped. In the kernel's
masked phase the cursor walks the box row-major and skips the full sub-box
a run at a time: the sub-box is a box, so the cursor first meets a run of
it at the run's start on the last axis, and a jump of the run's length
leaves it (onto the next row's start only when the run spans the whole row).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import jinja2
import numpy as np

from attncc.errors import PatternError, field_error
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.lower.cxx import rule_to_cxx, to_cxx
from attncc.lower.lowering import table_values, tile_table
from attncc.lower.plan import KernelPlan

ELEMENTS = {"float16": "cutlass::half_t", "bfloat16": "cutlass::bfloat16_t"}
HEAD_DIMS = (64, 128)
BLOCK_M = 128  # two consumer warpgroups of 64 rows: the example's cooperative schedule
BLOCK_NS = (64, 128)
MAX_TABLE = 1 << 20  # baked-in table entries (Note [Baked tables]): a larger source compiles too slowly

ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("attncc.templates", "cutlass"),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def refusal(plan: KernelPlan) -> str | None:
    """Why the CUTLASS templates cannot spell ``plan``, or None when they can."""
    if plan.dtype not in ELEMENTS:
        return f"dtype {plan.dtype}: the Hopper FMHA takes float16 or bfloat16"
    if plan.head_dim not in HEAD_DIMS:
        return f"head_dim {plan.head_dim}: instantiated for {', '.join(map(str, HEAD_DIMS))}"
    if plan.score != "softmax":
        return f"score {plan.score}: the example's epilogue is softmax's"
    if plan.score_terms:
        return "score terms (softcap, biases, dropout, ...): the example's epilogue is plain softmax's"
    if plan.region:
        return "queries over a part of the grid: the CUTLASS kernel's tiles cover its own queries"
    if plan.iteration == "runtime":
        return "data given with each call: the CUTLASS kernel bakes its tile list in"
    if plan.iteration == "range" and not plan.split_full:
        return "a union of window terms or a strided (congruence) term: C++ spells one window term or a table"
    if plan.block_m != BLOCK_M or plan.block_n not in BLOCK_NS:
        takes = f"{BLOCK_M}x{'/'.join(map(str, BLOCK_NS))}"
        return f"tiles of {plan.block_m}x{plan.block_n} tokens: the kernel takes {takes}"
    return None


@dataclass(frozen=True)
class TileList:
    """A table plan's tiles and rule for the source (Note [Baked tables])."""

    starts: tuple[int, ...]  # Q tile t's KV tiles are tiles[starts[t]:starts[t + 1]]
    fulls: tuple[int, ...]  # how many of them, first in the list, are full
    tiles: tuple[int, ...]  # KV tile indices (row-major over the KV tiles)
    values: tuple[int, ...]  # the rule's lookup tables (RULE_TABLE)
    rule: str  # keep as a C++ bool of qf, kf, qc0..2, kc0..2


@dataclass(frozen=True)
class CutlassPlan:
    """A plan the CUTLASS templates spell: the C++ index forms and tile counts (Note [Tile order])."""

    plan: KernelPlan
    element: str
    first: tuple[str, ...]  # range plans: the window term per axis; empty for table plans
    last: tuple[str, ...]
    q_tiles: tuple[int, int, int]
    kv_tiles: tuple[int, int, int]
    table: TileList | None = None  # table plans

    @property
    def rows_q(self) -> int:
        return self.plan.group_count * math.prod(self.q_tiles) * self.plan.block_m

    @property
    def rows_k(self) -> int:
        return self.plan.group_count * math.prod(self.kv_tiles) * self.plan.block_n

    @property
    def label(self) -> str:
        p = self.plan
        return (
            f"cutlass {p.dtype} d{p.head_dim} grid {'x'.join(map(str, p.grid))}"
            f" q {'x'.join(map(str, p.q_tile))} kv {'x'.join(map(str, p.kv_tile))}"
        )


def cutlass_plan(plan: KernelPlan, pattern: Pattern, grid: Grid) -> CutlassPlan:
    """``plan`` (lowered from ``pattern`` on ``grid``) for the CUTLASS backend; a PatternError
    naming the reason when it is refused. The pattern gives a table plan its tables."""
    reason = refusal(plan)
    if reason is not None:
        raise field_error(PatternError, "backend", "cutlass", "triton for this plan", reason)
    common = dict(plan=plan, element=ELEMENTS[plan.dtype], q_tiles=plan.q_tiles(), kv_tiles=plan.kv_tiles())
    if plan.iteration == "table":
        return CutlassPlan(first=(), last=(), table=_tile_list(plan, pattern, grid), **common)
    (term,) = plan.terms
    first = tuple(to_cxx(axis.first) for axis in term)
    return CutlassPlan(first=first, last=tuple(to_cxx(axis.last) for axis in term), **common)


def _tile_list(plan: KernelPlan, pattern: Pattern, grid: Grid) -> TileList:
    offsets, entries = tile_table(pattern, grid, plan)
    values = table_values(pattern, grid)
    if len(entries) + len(values) > MAX_TABLE:
        why = f"{len(entries) + len(values)} table entries to bake into the source"
        raise field_error(PatternError, "backend", "cutlass", f"tables of at most {MAX_TABLE} entries", why)
    q_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    order = np.lexsort((entries % 2 == 0, q_of))  # per Q tile (CSR order kept), full tiles first
    fulls = np.bincount(q_of, weights=entries % 2, minlength=len(offsets) - 1).astype(int)
    return TileList(
        starts=tuple(offsets.tolist()),
        fulls=tuple(fulls.tolist()),
        tiles=tuple((entries[order] // 2).tolist()),
        values=tuple(values.tolist()),
        rule=rule_to_cxx(plan.mask_expr),
    )


def _order(plan: KernelPlan, tile: tuple[int, int, int], tiles: tuple[int, int, int]) -> np.ndarray:
    """Flat token index of each permuted row, -1 for a pad (Note [Tile order])."""
    t = np.indices(tiles).reshape(3, -1)  # tile coordinates, row-major
    u = np.indices(tile).reshape(3, -1)  # offsets inside the box, row-major
    i = t[:, :, None] * np.array(tile)[:, None, None] + u[:, None, :]  # (3, tiles, block)
    rows = []
    for g in itertools.product(*(range(d) for d in plan.dilation)):
        lg = plan.group_lengths(g)  # type: ignore[arg-type]
        valid = np.all(i < np.array(lg)[:, None, None], axis=0)
        x = np.array(g)[:, None, None] + np.array(plan.dilation)[:, None, None] * i
        flat = (x[0] * plan.grid[1] + x[1]) * plan.grid[2] + x[2]
        rows.append(np.where(valid, flat, -1).reshape(-1))
    return np.concatenate(rows)


def q_order(cplan: CutlassPlan) -> np.ndarray:
    return _order(cplan.plan, cplan.plan.q_tile, cplan.q_tiles)


def kv_order(cplan: CutlassPlan) -> np.ndarray:
    return _order(cplan.plan, cplan.plan.kv_tile, cplan.kv_tiles)


def render(cplan: CutlassPlan) -> str:
    """The CUDA source of ``cplan``'s forward kernel and its C entry point."""
    return ENV.get_template("attention_fwd.cu.j2").render(cplan=cplan)


def render_plan_header(cplan: CutlassPlan) -> str:
    """Only the plan's host+device header (token order, walk, rule): what a CPU check compiles."""
    return ENV.get_template("_plan.cuh.j2").render(cplan=cplan)


def render_example(dtype: str, head_dim: int, causal: bool) -> str:
    """The example's own dense (``ResidualFusion``) or causal forward kernel behind a C entry point:
    the yardstick the benchmark times beside the rendered kernels."""
    return ENV.get_template("example_fmha.cu.j2").render(
        element=ELEMENTS[dtype],
        head_dim=head_dim,
        block_n=128 if head_dim >= 128 else 64,
        fusion="CausalFusion" if causal else "ResidualFusion",
    )

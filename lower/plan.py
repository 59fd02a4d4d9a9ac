"""KernelPlan: everything a template needs to spell the kernels of one head pattern, as plain data.

Lowering decides here; the template only spells what the plan says.

Note [Dilation groups]: every grid is padded to rank 3 (leading axes of size
1) and split into dilation groups ``g`` (one per residue ``coord % dilation``
per axis). Inside a group, axis ``a`` has ``Lg_a = ceil((L_a - g_a) / d_a)``
tokens at coordinates ``g_a + d_a * i``; a kernel program works on a box of
group coordinates ``i``. A neighborhood is then dilation-free inside the
group, so its closed forms are those of dilation 1 on an axis of length ``Lg``.

Note [KV iteration]: a ``range`` plan is a union of at most two terms; a term gives,
per axis, closed forms ``first(i, Lg)``/``last(i, Lg)`` of the group coordinates a
query ``i`` sees, both non-decreasing in ``i``, and optional congruences
``(k - anchor(i)) % step == 0`` (strided patterns). The keys of a Q tile spanning
``[i0, i1]`` under a term lie in ``[first(i0), last(i1)]`` per axis: a box of KV
tiles. A KV tile ``[k0, k1]`` is full under a congruence-free term when ``first(i1)
<= k0`` and ``last(i0) >= k1`` on every axis (and the tile is whole), and those full
tiles form a sub-box of the first term's box. ``table`` plans carry, per Q tile, the
lists of its full and of its partial KV tiles, computed by the exact analysis;
partial tiles evaluate the rule per element.

Note [Loops]: every walk is a loop over the full tiles, which it runs unmasked, then
loops over the partial ones, and no loop has a branch in its body, so Triton
software-pipelines them all (a loop body under a data-dependent branch is not
pipelined: its loads come out synchronous). A range walk steps to the next tile by
counting (no division): the full loop walks the full sub-box in row-major order; the
partial loop walks the first term's box and steps over the full sub-box's run on each
of its rows, which is why, on a box of more than one row, the sub-box is kept off the
row's first tile (a row never starts inside the run: the border tiles this moves to
the partial loop are under 2% of the full ones in the benchmark cases); the second
term's loop walks its own box less the first term's box (``_outside`` in the
template), masking by the union of both terms. A table walk reads its two lists.
Partial tiles test each key against per-row bounds hoisted out of the loop
(Note [Row tests] at KernelPlan.mask, Note [Masks imply validity] in attncc.lower.lowering).

Note [Inverse iteration]: the dK/dV kernel walks, per KV tile, the Q tiles that see
it. For a range plan the queries of a term that see a key in
``[k0, k1]`` on an axis are, since first/last are non-decreasing, the
interval ``[lo, hi)`` with ``lo`` the first ``i`` where ``last(i) >= k0`` and
``hi`` the first where ``first(i) > k1``. The kernel finds both by bisection
over ``[0, Lg)`` on the same closed forms (``search_steps(axis)`` scalar steps per
axis and term, once per program: no table, no set-up pass), and in the same way the
queries that see every key of the tile (full Q tiles) and, per key row, the queries
that see that key (its partial tiles' mask). A KV tile lies in a Q tile's box exactly
when that Q tile lies in the KV tile's inverse box, so both directions visit the same
tile pairs; the walk is that of Note [Loops] over Q tiles. Table plans use the lists
transposed (``tile_table_by_kv``).

Note [Term inputs]: the kernels take each tensor term of the score as a pointer followed by
its strides, in the order of :attr:`KernelPlan.inputs`: temperature ``[H]``, alibi's slopes
``[H, A]`` (A = 1, or 3 for the 'axes' distance, padded like the grid), the relative
position table ``[Ht, S0, S1, S2]`` (padded like the grid, each head's table contiguous, so
only its head stride is passed: 0 for a table shared by the heads), and the biases as
broadcast views ``[B, H, N]`` and ``[B, H, N, N]`` (stride 0 on a broadcast dimension),
then, with dropout, the seed (``[1]`` int64), the drop threshold on 32 random bits and
``1 / (1 - p)``, and the number of query heads. The backward kernels take, after those,
one float32 buffer per learned input they differentiate, in the same order (dQ takes the
temperature's, the slopes', the query bias's and the dense bias's, dK/dV the table's and
the key bias's: Note [Term gradients] in attncc.runtime.terms). Term values are read in
the tensor's own dtype and widened to float32.

Note [Runtime plans]: a pattern with primitives whose data come with each call (a block
layout or top-k block indices per batch element and head, document ids, key lengths, key masks:
``RUNTIME_KINDS``) lowers to a ``runtime`` plan: a table plan (box tiles, no dilation, the
rule per element in partial tiles) whose tile lists are built on the device for every call
from its data (attncc.runtime.tables) instead of once on the host. ``runtime`` lists those
leaves; ``program`` says how the pattern combines them with its static parts, as nested
tuples: ``("leaf", kind)``, ``("static", text)`` for a part with no such leaf (its tile
classes come from the analysis, once per plan), ``("or" | "and", (children...))``. The
kernels take, per leaf, its data and strides (``RT_BM``/``RT_TK`` the int8 layouts ``[B', H',
QB, KB]``, ``RT_DC`` the ids ``[B', N]``, ``RT_KL`` the lengths ``[B]``, ``RT_KM`` the int8
key flags ``[B', H', N]``), then the call's lists: counts ``[B', H', tiles, 2]`` (full,
partial) and indices ``[B', H', tiles, other tiles]``, each with its strides (B', H' are 1
where the data broadcast: stride 0). Changing the data never re-lowers, re-renders or
recompiles a kernel.

Note [Query regions]: the queries may cover a box of the grid (a KV cache's last tokens, a
video's last frames, a prefill chunk: ``q_region``, its shape), at offsets each batch element
gives at run time (an int32 ``[B, 3]`` tensor: new offsets, as a cache grows, never recompile).
The kernels keep the grid's tiling: a forward or dQ program takes the grid's Q tile its box
reaches (``q_launch_tiles`` of them per axis, one more than the box holds, as it may straddle
a tile border), its rows outside the box are padding, and the dK/dV walk clips its Q tiles
to the box and masks the rest; the pattern and the scores see each row's place in the grid
(``qf``), q's own tensors (q, out, lse, dO, dQ, per-query terms) its place in the box
(``qr``). A box is shorter than the grid only on axes without dilation (lowering refuses
others): a dilation group's tiles would not line up with the box's rows.

Note [Table gradient]: the gradient of a relative position table's entry at offset ``o``
sums the score gradients of the kept pairs ``(q, q + o)``. Summing them inside a tile would
reduce along its diagonals (a pair's entry depends on both its row and its column), which
register tiles do not do cheaply: a gather of each row's offsets (``tl.gather``) costs a
tile's worth of shuffles per offset box and spilled 40 KB on sm_90, and atomics would make
the sum depend on the order threads arrive in. Instead the dK/dV kernel (whose tiles are
the smaller: the same stores spilled in dQ's) stores each kept pair's score gradient at
``[b, h, q, entry]`` of a zeroed float32 buffer ``[B, H, N, entries]``: for one query each
entry has at most one key, so every element has one writer (deterministic, no atomics),
and the host sums over the queries in a fixed order. The
buffer is ``N x entries``, not ``N x N`` (``4 N x entries`` bytes per batch element and
head: 41 MB for a 128 x 128 grid and a 25 x 25 table). Only kept pairs are stored: lowering
refuses a table that does not reach every kept pair's offset, so none is clamped onto an
edge entry another pair of its row owns.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from attncc.ir.grid import Grid
from attncc.ir.score import INPUTS

RANK = 3
LOG2E = 1.4426950408889634
SHARED_PER_BLOCK = 227 * 1024  # sm_90 (H100, H200): the most shared memory one block may use


def pad3(values: tuple, fill) -> tuple:
    """Pad per-axis values to rank 3 with leading ``fill`` entries."""
    return (fill,) * (RANK - len(values)) + tuple(values)


@dataclass(frozen=True)
class Congruence:
    """Keep keys with ``(k - anchor(i, Lg)) % step == 0``."""

    anchor: str
    step: int


@dataclass(frozen=True)
class AxisForm:
    """One axis of a term in group coordinates: Triton expressions of ``i`` and ``Lg``."""

    first: str
    last: str
    congruences: tuple[Congruence, ...] = ()
    # Note [Masks imply validity]: some row's keys start after 0 / end before Lg - 1.
    low: bool = True
    high: bool = True


@dataclass(frozen=True)
class Lookup:
    """A lookup table stored at ``offset`` in the plan's int32 table buffer."""

    name: str
    offset: int
    row: int  # row length for 2-D tables (0 for 1-D)


@dataclass(frozen=True)
class Mask:
    """One term's mask in a partial tile (:meth:`KernelPlan.mask`): tests ``(axis, kind)``
    evaluated per row, the element test whose per-row bound absorbs them (None: they
    mask the row directly), and the tests evaluated per element."""

    row: tuple[tuple[int, str], ...]
    fold: tuple[int, str] | None
    element: tuple[tuple[int, str], ...]


# Per runtime kind: the kernels' parameter for its data, the prefix of its strides, and their
# count (Note [Runtime plans]).
RUNTIME_ARGS = {
    "block_mask": ("RT_BM", "rbm", 4),
    "topk_blocks": ("RT_TK", "rtk", 4),
    "documents": ("RT_DC", "rdc", 2),
    "key_lengths": ("RT_KL", "rkl", 1),
    "key_mask": ("RT_KM", "rkm", 3),
}


@dataclass(frozen=True)
class RuntimeLeaf:
    """A primitive whose data a call gives (Note [Runtime plans]): its kind, and for block
    layouts their block, a box padded to rank 3, or ``(1, 1, b)`` with ``flat`` for blocks of
    ``b`` flat tokens."""

    kind: str
    block: tuple[int, int, int] = (1, 1, 1)
    flat: bool = False


@dataclass(frozen=True)
class KernelPlan:
    """One forward kernel for one head-independent pattern (see the module notes)."""

    grid: tuple[int, int, int]  # padded to rank 3
    dilation: tuple[int, int, int]
    q_tile: tuple[int, int, int]  # a box of group coordinates; product is BLOCK_M
    kv_tile: tuple[int, int, int]
    head_dim: int  # real head dim
    head_dim_padded: int  # power of two the kernel computes with
    dtype: str
    iteration: str  # "range", "table" (Note [KV iteration]) or "runtime" (Note [Runtime plans])
    terms: tuple[tuple[AxisForm, AxisForm, AxisForm], ...]  # range plans: union of terms
    full_terms: tuple[int, ...]  # range plans: terms that can mark a tile full (no congruence)
    split_full: bool  # one such term: its full tiles form a sub-box, walked in an unmasked loop
    mask_expr: str  # table plans: keep(q, k) as a Triton expression, see spell_rule
    lookups: tuple[Lookup, ...]
    score: str = "softmax"  # the normaliser, or "sigmoid"
    # Score terms (Note [Score terms] in attncc.ir.score, Note [Term inputs] below): the cap c
    # of the scaled score; the terms whose data the kernels read at run time (temperature,
    # alibi's distance, the relative position table's sizes padded to rank 3, the biases);
    # dropout; the learned inputs whose gradients the backward computes; and whether tanh is
    # the GPU's tanh.approx (else 2 sigmoid(2x) - 1: the interpreter, and float32's exact path).
    softcap: float | None = None
    temperature: bool = False
    alibi: str | None = None
    rel_pos_bias: tuple[int, int, int] | None = None
    query_bias: bool = False
    key_bias: bool = False
    bias: bool = False
    dropout: bool = False
    dropout_packed: bool = False  # one Philox call per 4 keys (Note [Dropout] in the template)
    grads: tuple[str, ...] = ()
    fast_tanh: bool = False
    # Runtime plans: the leaves whose data come with each call, and how the pattern combines
    # them with its static parts (Note [Runtime plans]).
    runtime: tuple[RuntimeLeaf, ...] = ()
    program: tuple = ()
    # The box of the grid the queries cover, padded to rank 3; None: all of it (Note [Query regions]).
    q_region: tuple[int, int, int] | None = None
    num_warps: int = 4
    num_stages: int = 2
    # Range plans whose first term can mark tiles full: whether some Q tile's walk (forward,
    # dQ) and some KV tile's (dK/dV) has one. A walk with none has no full-tile loop.
    full_walk: bool = True
    full_inverse: bool = True

    @property
    def score_terms(self) -> bool:
        """Whether the kernels apply score terms between the dot and the normaliser."""
        return self.softcap is not None or bool(self.inputs) or self.dropout

    def has(self, name: str) -> bool:
        """Whether the tensor term ``name`` (attncc.ir.score.INPUTS) is in the plan."""
        return getattr(self, name) not in (None, False)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The tensor terms the kernels read, in the order the ops pass them (Note [Term inputs])."""
        return tuple(name for name in INPUTS if self.has(name))

    @property
    def table_entries(self) -> int:
        """Entries of the relative position table (0 without one)."""
        return math.prod(self.rel_pos_bias) if self.rel_pos_bias else 0

    @property
    def score_units(self) -> float:
        """What the kernels multiply a natural-unit score by: log2(e) for softmax, which works
        in base 2, 1 for sigmoid."""
        return LOG2E if self.score == "softmax" else 1.0

    @property
    def softcap_in_units(self) -> float:
        """The soft-cap c in the kernels' units (:attr:`score_units`)."""
        assert self.softcap is not None, "a plan without a soft-cap has no cap to spell"
        return self.softcap * self.score_units

    @property
    def region(self) -> bool:
        """Whether the queries cover a part of the grid only (Note [Query regions])."""
        return self.q_region is not None

    @property
    def region_axes(self) -> tuple[int, ...]:
        """The axes on which q's box is shorter than the grid (never a dilated one)."""
        if self.q_region is None:
            return ()
        return tuple(a for a in range(RANK) if self.q_region[a] < self.grid[a])

    @property
    def region_shape(self) -> tuple[int, int, int]:
        return self.q_region or self.grid

    def q_launch_tiles(self) -> tuple[int, int, int]:
        """Q tiles per axis a launch runs: the grid's (group 0's), or on an axis of q's box the
        tiles a box of that length can touch wherever it lies (one more than it holds)."""
        tiles = list(self.q_tiles())
        for a in self.region_axes:
            tiles[a] = min(tiles[a], math.ceil(self.region_shape[a] / self.q_tile[a]) + 1)
        return tuple(tiles)  # type: ignore[return-value]

    def full_loop(self, inverse: bool) -> bool:
        """Whether the walk (dK/dV's with ``inverse``) has a full-tile loop (Note [Loops])."""
        return 0 in self.full_terms and (self.full_inverse if inverse else self.full_walk)

    @property
    def dq_warps(self) -> int:
        """Warps of the dQ kernel: it holds three fp32 tiles of a Q tile's rows (scores, their
        gradients, dQ) where the forward holds two, so with 128 or more rows it takes 8 warps
        (with 4, D = 64 spills: benchmarks/STATIC.md)."""
        return max(self.num_warps, 8) if self.block_m >= 128 else self.num_warps

    @property
    def dq_stages(self) -> int:
        """Pipeline stages of the dQ kernel: the forward's, fewer where its Q and dO tiles and
        its stages of K and V tiles would pass the 227 KiB of shared memory an sm_90 block may
        use (at D = 256: one stage)."""
        tile = self.head_dim_padded * (4 if self.dtype == "float32" else 2)
        fit = (SHARED_PER_BLOCK // tile - 2 * self.block_m) // (2 * self.block_n)
        return max(1, min(self.num_stages, fit))

    @property
    def block_m(self) -> int:
        return math.prod(self.q_tile)

    @property
    def block_n(self) -> int:
        return math.prod(self.kv_tile)

    def search_steps(self, axis: int) -> int:
        """Bisection steps that cover axis ``axis`` of every group (Note [Inverse iteration])."""
        return ((self.grid[axis] + self.dilation[axis] - 1) // self.dilation[axis]).bit_length()

    @property
    def group_count(self) -> int:
        return math.prod(self.dilation)

    def group_lengths(self, group: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple((size - g + d - 1) // d for size, g, d in zip(self.grid, group, self.dilation))  # type: ignore[return-value]

    def q_tiles(self) -> tuple[int, int, int]:
        """Q tiles per axis of the largest group (group 0), which sets the launch grid."""
        return tuple(math.ceil(lg / t) for lg, t in zip(self.group_lengths((0, 0, 0)), self.q_tile))  # type: ignore[return-value]

    def kv_tiles(self) -> tuple[int, int, int]:
        return tuple(math.ceil(lg / t) for lg, t in zip(self.group_lengths((0, 0, 0)), self.kv_tile))  # type: ignore[return-value]

    def _ragged(self, tile: tuple[int, int, int]) -> tuple[bool, bool, bool]:
        groups = list(itertools.product(*(range(d) for d in self.dilation)))
        return tuple(any(self.group_lengths(g)[a] % tile[a] for g in groups) for a in range(RANK))  # type: ignore[return-value]

    @property
    def ragged_kv(self) -> tuple[bool, bool, bool]:
        """Per axis: whether some group's last KV tile holds padding."""
        return self._ragged(self.kv_tile)

    @property
    def ragged_kv_any(self) -> bool:
        return any(self.ragged_kv)

    @property
    def ragged_q_any(self) -> bool:
        return any(self._ragged(self.q_tile))

    def walk_order(self, inverse: bool) -> tuple[int, int, int]:
        """The axes a walk steps, outermost first (the dK/dV walk's, over Q tiles, with
        ``inverse``): axes with one tile in every group first (never stepped), then the rest
        in grid order; the last, innermost, holds each row's run of full tiles (Note [Loops])."""
        tiles = self.q_tiles() if inverse else self.kv_tiles()
        live = [a for a in range(RANK) if tiles[a] > 1]
        return (*(a for a in range(RANK) if tiles[a] == 1), *live) if live else (0, 1, 2)  # type: ignore[return-value]

    def walk_live(self, inverse: bool) -> tuple[bool, bool]:
        """Whether the walk's two outer axes are stepped."""
        tiles = self.q_tiles() if inverse else self.kv_tiles()
        order = self.walk_order(inverse)
        return tiles[order[0]] > 1, tiles[order[1]] > 1

    def walk_rows(self, inverse: bool) -> bool:
        """Whether the walk's boxes may have more than one row (then a row's full run is kept off
        its first tile: Note [Loops])."""
        return any(self.walk_live(inverse))

    def ragged_kv_checks(self, name: str, bound: str) -> list[str]:
        """``name_a < bound_a`` on the axes with ragged KV tiles: a partial tile's valid keys."""
        return [f"({name}{a} < {bound}{a})" for a in range(RANK) if self.ragged_kv[a]]

    def tests(self, term: int, backward: bool) -> tuple[tuple[str, ...], ...]:
        """Per axis, what a partial tile tests of term ``term`` (Note [Masks imply validity] in
        attncc.lower.lowering): ``"low"`` (the key against its row's first), ``"high"``
        (against its last), and, in the forward on an axis with ragged tiles and no ``high``
        test, ``"valid"`` (the key inside the axis)."""
        out = []
        for a, axis in enumerate(self.terms[term]):
            tests = ("low",) * axis.low + ("high",) * axis.high
            if not (backward or axis.high) and self.ragged_kv[a]:
                tests += ("valid",)
            out.append(tests)
        return tuple(out)

    def mask(self, term: int, kind: str) -> Mask:
        """How a partial tile of kernel ``kind`` ("fwd", "dq" or "dkdv") spells term ``term``.

        Note [Row tests]: the columns of a tile are keys (queries in dK/dV); on an axis where
        the tile holds one coordinate (a box size of 1) every test compares that one
        coordinate with a per-row bound, so it is a per-row condition. Such tests are
        folded into the per-row bound of another tested axis (a row that fails them gets
        an empty range there), which leaves fewer per-element predicates: on sm_90 three
        kinds of them (per row, per column group, per column) made ptxas spill predicates.
        """
        box = self.q_tile if kind == "dkdv" else self.kv_tile
        axes = self.tests(term, kind != "fwd")
        row, element = [], []
        for a, tests in enumerate(axes):
            parts = [(a, t) for t in tests] + [
                (a, f"congruence{c}") for c in range(len(self.terms[term][a].congruences))
            ]
            (row if box[a] == 1 else element).extend(parts)
        fold = None
        if row:
            fold = next((t for t in element if t[1] == "high"), None) or next(
                (t for t in element if t[1] == "low"), None
            )
        return Mask(tuple(row), fold, tuple(element))

    @property
    def grid_obj(self) -> Grid:
        return Grid(self.grid)

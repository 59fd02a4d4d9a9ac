"""KernelPlan: everything a template needs to spell one forward kernel, as plain data.

Lowering decides here; the template only spells what the plan says.

Note [Dilation groups]: every grid is padded to rank 3 (leading axes of size
1) and split into dilation groups ``g`` (one per residue ``coord % dilation``
per axis). Inside a group, axis ``a`` has ``Lg_a = ceil((L_a - g_a) / d_a)``
tokens at coordinates ``g_a + d_a * i``; a kernel program works on a box of
group coordinates ``i``. A neighborhood is then dilation-free inside the
group, so its closed forms are those of dilation 1 on an axis of length ``Lg``.

Note [KV iteration]: a ``range`` plan is a union of terms; a term gives, per
axis, closed forms ``first(i, Lg)``/``last(i, Lg)`` of the group coordinates a
query ``i`` sees, both non-decreasing in ``i``, and optional congruences
``(k - anchor(i)) % step == 0`` (strided patterns). The keys of a Q tile
spanning ``[i0, i1]`` under a term lie in ``[first(i0), last(i1)]`` per axis;
the kernel walks each term's box of KV tiles, skipping tiles an earlier term's
box already held. A KV tile ``[k0, k1]`` is full under a term with no
congruence when ``first(i1) <= k0`` and ``last(i0) >= k1`` on every axis, and
full when it is full under any term. With a single congruence-free term the
full tiles form a sub-box of the term's box, so the kernel walks it first in
a loop with no masking and no branch, then the rest of the box masked.
``table`` plans carry, per Q tile, the
list of non-empty KV tiles and whether each is full, computed by the exact
analysis; partial tiles evaluate the rule per element.

Note [Inverse iteration]: the dK/dV kernel walks, per KV tile, the Q tiles
that see it. For a range plan the queries of a term that see a key in
``[k0, k1]`` on an axis are, since first/last are non-decreasing, the
interval ``[lo, hi)`` with ``lo`` the first ``i`` where ``last(i) >= k0`` and
``hi`` the first where ``first(i) > k1``. The kernel finds both by bisection
over ``[0, Lg)`` on the same closed forms (``search_steps`` scalar steps per
axis and term, once per program: no table, no set-up pass). A KV tile lies in
a Q tile's box exactly when that Q tile lies in the KV tile's inverse box, so
both directions visit the same tile pairs. Table plans use the CSR table
transposed (``tile_table_by_kv``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attncc.ir.grid import Grid

RANK = 3


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


@dataclass(frozen=True)
class Lookup:
    """A lookup table stored at ``offset`` in the plan's int32 table buffer."""

    name: str
    offset: int
    row: int  # row length for 2-D tables (0 for 1-D)


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
    iteration: str  # "range" or "table" (Note [KV iteration])
    terms: tuple[tuple[AxisForm, AxisForm, AxisForm], ...]  # range plans: union of terms
    full_terms: tuple[int, ...]  # range plans: terms that can mark a tile full (no congruence)
    split_full: bool  # one such term: its full tiles form a sub-box, walked in an unmasked loop
    mask_expr: str  # table plans: keep(q, k) as a Triton expression, see spell_rule
    lookups: tuple[Lookup, ...]
    score: str = "softmax"  # or "sigmoid"
    num_warps: int = 4
    num_stages: int = 2

    @property
    def block_m(self) -> int:
        return math.prod(self.q_tile)

    @property
    def block_n(self) -> int:
        return math.prod(self.kv_tile)

    @property
    def search_steps(self) -> int:
        """Bisection steps that cover any axis of a group (Note [Inverse iteration])."""
        return max(self.grid).bit_length() + 1

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

    @property
    def grid_obj(self) -> Grid:
        return Grid(self.grid)

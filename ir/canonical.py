"""Canonical form, stable hash, the pattern DAG, and per-head resolution.

Two patterns that keep the same pairs on a grid because of a rule we know
(operand order, nesting, duplicates, a window as large as its axis, a causal
band written as a neighborhood, ...) canonicalise to the same node, so they
share one hash, one plan and one cache entry. Canonicalisation never changes
the mask: a property test compares masks before and after.

Note [Runtime leaves survive]: a primitive whose data are given at call time
(Note [Runtime data] in attncc.ir.nodes) stays a leaf of the canonical form, even
where the static operands make it irrelevant (``dense() | block_mask(64)``,
an empty band ``& documents()``): the canonical form is what a call's data are
checked against (attncc.runtime.data), and the data a user gives must not
depend on what canonicalisation found. Such a union or intersection keeps its
simplified static part and the leaves beside it, which leaves its mask as it is.
"""

from __future__ import annotations

import hashlib
import math

import networkx as nx

from attncc.ir.grid import Grid
from attncc.ir.nodes import (
    Axial,
    Band,
    BlockDiagonal,
    BlockMask,
    BlockSparse,
    Causal,
    Congruent,
    Dense,
    Document,
    GlobalTokens,
    Intersection,
    KeyRange,
    Neighborhood,
    Pattern,
    PerHead,
    SlidingWindow,
    Strided,
    TopkBlocks,
    Union,
)
from attncc.ir.text import format_pattern
from attncc.ir.validate import neighborhood_axes, validate


def to_graph(p: Pattern) -> nx.DiGraph:
    """The pattern as a DAG: equal sub-patterns are one node; edges point to operands."""
    g = nx.DiGraph()
    stack = [p]
    while stack:
        node = stack.pop()
        if node in g and g.nodes[node].get("seen"):
            continue
        g.add_node(node, seen=True)
        for child in node.children:
            g.add_edge(node, child)
            stack.append(child)
    return g


def canonicalize(p: Pattern, grid: Grid) -> Pattern:
    """Validate ``p`` on ``grid`` and return its canonical form."""
    validate(p, grid)
    memo: dict[Pattern, Pattern] = {}
    # Operands first, so each shared sub-pattern is rewritten once.
    for node in reversed(list(nx.topological_sort(to_graph(p)))):
        memo[node] = _rewrite(node, grid, memo)
    return memo[p]


def pattern_hash(p: Pattern, grid: Grid) -> str:
    """A hash of the canonical form on ``grid``, stable across processes and machines."""
    text = f"grid={tuple(grid.shape)};pattern={format_pattern(canonicalize(p, grid))}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def resolve_heads(p: Pattern, heads: int) -> tuple[Pattern, ...]:
    """The head-independent pattern of each head (per_head and per-head layouts resolved)."""
    return tuple(_head(p, h) for h in range(heads))


def _head(p: Pattern, h: int) -> Pattern:
    if isinstance(p, PerHead):
        return _head(p.patterns[h], h)
    if isinstance(p, BlockSparse) and p.per_head:
        return BlockSparse(p.layout[h], p.block)
    if isinstance(p, Union):
        return Union(tuple(_head(op, h) for op in p.operands))
    if isinstance(p, Intersection):
        return Intersection(tuple(_head(op, h) for op in p.operands))
    return p


# --- rewriting rules -----------------------------------------------------------


def _rewrite(node: Pattern, grid: Grid, memo: dict[Pattern, Pattern]) -> Pattern:
    n = grid.size
    if isinstance(node, Causal):
        return Dense() if n == 1 else node
    if isinstance(node, Neighborhood):
        return _neighborhood(node, grid)
    if isinstance(node, SlidingWindow):
        return _band(min(node.left, n - 1), min(node.right, n - 1), n)
    if isinstance(node, Strided):
        if grid.rank == 1:  # the flat index is axis 0
            return _congruent(Congruent(0, node.stride, node.offset), grid)
        return _flat_strided(node, grid)
    if isinstance(node, Band):
        return _axis_band(node.axis, *_interval(node, grid)[1:], grid)  # type: ignore[misc]
    if isinstance(node, KeyRange):
        return _key_range(node.axis, *_interval(node, grid)[1:], grid)  # type: ignore[misc]
    if isinstance(node, BlockDiagonal):
        if node.block >= grid.shape[node.axis]:
            return Dense()
        return _axis_band(node.axis, 0, 0, grid) if node.block == 1 else node
    if isinstance(node, Congruent):
        return _congruent(node, grid)
    if isinstance(node, Axial):
        axes = tuple(sorted(set(node.axes if node.axes is not None else range(grid.rank))))
        others = [[s for b, s in enumerate(grid.shape) if b != a] for a in axes]
        if any(all(s == 1 for s in rest) for rest in others):
            return Dense()
        return Axial(axes)
    if isinstance(node, BlockSparse):
        return _block_sparse(node)
    if isinstance(node, (BlockMask, TopkBlocks)):
        return _blocks(node, grid)
    if isinstance(node, GlobalTokens):
        idx = tuple(sorted(set(node.indices)))
        return Dense() if len(idx) == n else GlobalTokens(idx)
    if isinstance(node, Document):
        first_seen: dict[int, int] = {}
        ids = tuple(first_seen.setdefault(i, len(first_seen)) for i in node.ids)
        return Dense() if len(first_seen) == 1 else Document(ids)
    if isinstance(node, Union):
        return _union([memo[op] for op in node.operands], grid)
    if isinstance(node, Intersection):
        return _intersection([memo[op] for op in node.operands], grid)
    if isinstance(node, PerHead):
        pats = tuple(memo[op] for op in node.patterns)
        return pats[0] if all(q == pats[0] for q in pats) else PerHead(pats)
    return node


def _band(left: int, right: int, n: int) -> Pattern:
    if left >= n - 1 and right >= n - 1:
        return Dense()
    if left >= n - 1 and right == 0:
        return Causal()
    return SlidingWindow(left, right)


def _neighborhood(node: Neighborhood, grid: Grid) -> Pattern:
    rank = grid.rank
    window, dilation, stride, causal = (list(v) for v in zip(*neighborhood_axes(node, rank)))
    for a, size in enumerate(grid.shape):
        if dilation[a] == 1 and window[a] == size:
            stride[a] = 1  # a whole-axis window is the same for every stride group
        if size == 1:
            causal[a] = False
    trivial = [window[a] == size and dilation[a] == 1 for a, size in enumerate(grid.shape)]
    if all(t and not c for t, c in zip(trivial, causal)):
        return Dense()
    if rank == 1 and causal[0] and dilation[0] == 1 and stride[0] == 1:
        # A causal 1-D neighborhood is the band [q - window + 1, q].
        return _band(window[0] - 1, 0, grid.size)
    return Neighborhood(tuple(window), tuple(dilation), tuple(stride), tuple(causal))


def _block_sparse(node: BlockSparse) -> Pattern:
    if node.per_head and all(m == node.layout[0] for m in node.layout):
        node = BlockSparse(node.layout[0], node.block)
    if not node.per_head and all(v == 1 for row in node.layout for v in row):
        return Dense()
    return node


def _blocks(node: BlockMask | TopkBlocks, grid: Grid) -> Pattern:
    """Note [Canonical blocks]: sizes past the grid are cut to it, and a box whose blocks number
    the tokens as flat blocks do is written flat: ``(1, .., 1, b_a, whole axes)`` keeps the
    numbering of flat blocks of ``b_a`` times the whole axes' tokens when ``a`` is the first
    axis or ``b_a`` divides axis ``a`` (so a row of blocks ends where a row of the axis does).
    The number of blocks, and so the data, is the same."""
    cls = type(node)
    if not isinstance(node.block, tuple):
        return cls(min(node.block, grid.size))
    sizes = [min(b, s) for b, s in zip(node.block, grid.shape)]
    for a, size in enumerate(grid.shape):
        inner = all(b == 1 for b in sizes[:a])
        whole = all(b == s for b, s in zip(sizes[a + 1 :], grid.shape[a + 1 :]))
        if inner and whole and (a == 0 or size % sizes[a] == 0):
            return cls(sizes[a] * math.prod(grid.shape[a + 1 :]))
    return cls(tuple(sizes))


def _keeping_leaves(result: Pattern, dropped: list[Pattern], combinator: type[Pattern]) -> Pattern:
    """``result``, with the runtime leaves of the operands it replaced beside it, joined by
    ``combinator`` (Note [Runtime leaves survive])."""
    leaves = [leaf for op in dropped for leaf in op.runtime_leaves]
    if not leaves:
        return result
    return combinator(tuple(_sorted_unique([result, *leaves])))  # type: ignore[call-arg]


def _sorted_unique(ops: list[Pattern]) -> list[Pattern]:
    unique = {format_pattern(op): op for op in ops}
    return [unique[k] for k in sorted(unique)]


# Note [Bands]: flat bands (sliding_window, causal) and one-axis bands are
# intervals of the offset ``k - q``, on the flat index or on one axis; on a
# 1-D grid the two are the same. Intervals with one key merge in unions and
# intersections, and a band that holds the diagonal on a 1-D grid is written
# as the flat band, so the two spellings share one canonical form. Key ranges
# are intervals of the key coordinate itself (key ``("keys", axis)``) and merge
# in the same way.
_FLAT = -1
Key = int | tuple[str, int]


def _interval(op: Pattern, grid: Grid) -> tuple[Key, int, int] | None:
    """``(key, lo, hi)``: ``op`` keeps ``lo <= k - q <= hi`` on axis ``key`` (``_FLAT``: flat),
    or ``lo <= k <= hi`` on ``axis`` when ``key`` is ``("keys", axis)``."""
    n = grid.size
    flat = 0 if grid.rank == 1 else _FLAT
    if isinstance(op, SlidingWindow):
        return flat, -op.left, op.right
    if isinstance(op, Causal):
        return flat, -(n - 1), 0
    if isinstance(op, Band):
        length = grid.shape[op.axis]
        lo = -(length - 1) if op.lo is None else max(op.lo, -(length - 1))
        hi = length - 1 if op.hi is None else min(op.hi, length - 1)
        return op.axis, lo, hi
    if isinstance(op, KeyRange):
        length = grid.shape[op.axis]
        lo = 0 if op.lo is None else max(op.lo, 0)
        hi = length - 1 if op.hi is None else min(op.hi, length - 1)
        return ("keys", op.axis), lo, hi
    return None


def _axis_band(axis: int, lo: int, hi: int, grid: Grid) -> Pattern:
    """The canonical pattern of ``lo <= k - q <= hi`` on ``axis``, bounds already cut to the axis."""
    length = grid.shape[axis]
    if lo > hi:
        return Band(axis, lo=length)  # keeps nothing
    if grid.rank == 1 and lo <= 0 <= hi:
        return _band(-lo, hi, length)
    if lo == -(length - 1) and hi == length - 1:
        return Dense()
    return Band(axis, None if lo == -(length - 1) else lo, None if hi == length - 1 else hi)


def _key_range(axis: int, lo: int, hi: int, grid: Grid) -> Pattern:
    """The canonical pattern of ``lo <= k <= hi`` on ``axis``, bounds already cut to the axis."""
    length = grid.shape[axis]
    if lo > hi:
        return Band(axis, lo=length)  # keeps nothing
    if lo == 0 and hi == length - 1:
        return Dense()
    return KeyRange(axis, None if lo == 0 else lo, None if hi == length - 1 else hi)


def _emit(key: Key, lo: int, hi: int, grid: Grid) -> Pattern:
    if isinstance(key, tuple):
        return _key_range(key[1], lo, hi, grid)
    return _band(-lo, hi, grid.size) if key == _FLAT else _axis_band(key, lo, hi, grid)


def _congruent(node: Congruent, grid: Grid) -> Pattern:
    if node.modulus == 1:
        return Dense()
    length = grid.shape[node.axis]
    if node.modulus < length:
        return Strided(node.modulus, node.offset) if grid.rank == 1 else node
    # A modulus at least the axis length allows at most two offsets k - q on it.
    offsets = [d for d in range(-(length - 1), length) if (-d) % node.modulus == node.offset]
    if not offsets:
        return Band(node.axis, lo=length)
    return _union([_axis_band(node.axis, d, d, grid) for d in offsets], grid)


def _flat_strided(node: Strided, grid: Grid) -> Pattern:
    """Note [Huge strides]: on a 2-D or 3-D grid the flat offset ``k - q`` takes the ``2n - 1``
    values ``-(n - 1)..n - 1``; a stride larger than that keeps at most one of them, and
    ``strided(2n - 1, ...)`` keeps the same one. The kernels compute the stride in int32, so
    a stride of 2**31 would overflow there; rewritten, it never reaches them."""
    if node.stride == 1:
        return Dense()
    n = grid.size
    span = 2 * n - 1
    if node.stride <= span:
        return node
    kept = [d for d in (-node.offset, node.stride - node.offset) if -(n - 1) <= d <= n - 1]
    if not kept:
        return Band(0, lo=grid.shape[0])  # keeps nothing (as _axis_band writes it)
    return Dense() if span == 1 else Strided(span, (-kept[0]) % span)


def _is_empty(op: Pattern, grid: Grid) -> bool:
    return isinstance(op, Band) and op.lo is not None and op.lo >= grid.shape[op.axis]


def _union(ops: list[Pattern], grid: Grid) -> Pattern:
    flat = [x for op in ops for x in (op.operands if isinstance(op, Union) else (op,))]
    if any(isinstance(op, Dense) for op in flat):
        return _keeping_leaves(Dense(), flat, Union)
    if all(_is_empty(op, grid) for op in flat):
        return flat[0]
    rest, intervals, globals_ = [], {}, set()
    for op in flat:
        interval = _interval(op, grid)
        if _is_empty(op, grid):
            continue
        if interval is not None:
            intervals.setdefault(interval[0], []).append(interval[1:])
        elif isinstance(op, GlobalTokens):
            globals_.update(op.indices)
        else:
            rest.append(op)
    for key, spans in intervals.items():
        merged: list[list[int]] = []
        for lo, hi in sorted(spans):
            if merged and lo <= merged[-1][1] + 1:  # overlapping or touching: one band
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        rest.extend(_emit(key, lo, hi, grid) for lo, hi in merged)
    if globals_:
        rest.append(Dense() if len(globals_) == grid.size else GlobalTokens(tuple(sorted(globals_))))
    if any(isinstance(op, Dense) for op in rest):
        return _keeping_leaves(Dense(), rest, Union)
    rest = _sorted_unique(rest)
    return rest[0] if len(rest) == 1 else Union(tuple(rest))


def _intersection(ops: list[Pattern], grid: Grid) -> Pattern:
    flat = [x for op in ops for x in (op.operands if isinstance(op, Intersection) else (op,))]
    empty = [op for op in flat if _is_empty(op, grid)]
    if empty:
        return _keeping_leaves(empty[0], flat, Intersection)
    rest, intervals = [], {}
    for op in flat:
        interval = _interval(op, grid)
        if interval is not None:
            lo, hi = intervals.get(interval[0], (-grid.size, grid.size))
            intervals[interval[0]] = (max(lo, interval[1]), min(hi, interval[2]))
        elif not isinstance(op, Dense):
            rest.append(op)
    for key, (lo, hi) in intervals.items():
        merged = _emit(key, lo, hi, grid)
        if _is_empty(merged, grid):
            return _keeping_leaves(merged, flat, Intersection)
        if not isinstance(merged, Dense):
            rest.append(merged)
    rest = _sorted_unique(rest)
    if not rest:
        return Dense()
    return rest[0] if len(rest) == 1 else Intersection(tuple(rest))

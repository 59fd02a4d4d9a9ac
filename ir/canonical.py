"""Canonical form, stable hash, the pattern DAG, and per-head resolution.

Two patterns that keep the same pairs on a grid because of a rule we know
(operand order, nesting, duplicates, a window as large as its axis, a causal
band written as a neighborhood, ...) canonicalise to the same node, so they
share one hash, one plan and one cache entry. Canonicalisation never changes
the mask: a property test compares masks before and after.
"""

from __future__ import annotations

import hashlib

import networkx as nx

from attncc.ir.grid import Grid
from attncc.ir.nodes import (
    Axial,
    BlockSparse,
    Causal,
    Dense,
    Document,
    GlobalTokens,
    Intersection,
    Neighborhood,
    Pattern,
    PerHead,
    SlidingWindow,
    Strided,
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
        return Dense() if node.stride == 1 else node
    if isinstance(node, Axial):
        axes = tuple(sorted(set(node.axes if node.axes is not None else range(grid.rank))))
        others = [[s for b, s in enumerate(grid.shape) if b != a] for a in axes]
        if any(all(s == 1 for s in rest) for rest in others):
            return Dense()
        return Axial(axes)
    if isinstance(node, BlockSparse):
        return _block_sparse(node)
    if isinstance(node, GlobalTokens):
        idx = tuple(sorted(set(node.indices)))
        return Dense() if len(idx) == n else GlobalTokens(idx)
    if isinstance(node, Document):
        first_seen: dict[int, int] = {}
        ids = tuple(first_seen.setdefault(i, len(first_seen)) for i in node.ids)
        return Dense() if len(first_seen) == 1 else Document(ids)
    if isinstance(node, Union):
        return _union([memo[op] for op in node.operands], n)
    if isinstance(node, Intersection):
        return _intersection([memo[op] for op in node.operands], n)
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


def _sorted_unique(ops: list[Pattern]) -> list[Pattern]:
    unique = {format_pattern(op): op for op in ops}
    return [unique[k] for k in sorted(unique)]


def _as_band(op: Pattern, n: int) -> tuple[int, int] | None:
    if isinstance(op, SlidingWindow):
        return op.left, op.right
    if isinstance(op, Causal):
        return n - 1, 0
    return None


def _union(ops: list[Pattern], n: int) -> Pattern:
    flat = [x for op in ops for x in (op.operands if isinstance(op, Union) else (op,))]
    if any(isinstance(op, Dense) for op in flat):
        return Dense()
    rest, bands, globals_ = [], [], set()
    for op in flat:
        band = _as_band(op, n)
        if band is not None:
            bands.append(band)  # bands all contain the diagonal: their union is a band
        elif isinstance(op, GlobalTokens):
            globals_.update(op.indices)
        else:
            rest.append(op)
    if bands:
        rest.append(_band(max(b[0] for b in bands), max(b[1] for b in bands), n))
    if globals_:
        rest.append(Dense() if len(globals_) == n else GlobalTokens(tuple(sorted(globals_))))
    if any(isinstance(op, Dense) for op in rest):
        return Dense()
    rest = _sorted_unique(rest)
    return rest[0] if len(rest) == 1 else Union(tuple(rest))


def _intersection(ops: list[Pattern], n: int) -> Pattern:
    flat = [x for op in ops for x in (op.operands if isinstance(op, Intersection) else (op,))]
    rest, bands = [], []
    for op in flat:
        band = _as_band(op, n)
        if band is not None:
            bands.append(band)
        elif not isinstance(op, Dense):
            rest.append(op)
    if bands:
        merged = _band(min(b[0] for b in bands), min(b[1] for b in bands), n)
        if not isinstance(merged, Dense):
            rest.append(merged)
    rest = _sorted_unique(rest)
    if not rest:
        return Dense()
    return rest[0] if len(rest) == 1 else Intersection(tuple(rest))

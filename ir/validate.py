"""Checks that need the grid: does this pattern fit this grid and head count?"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from attncc.errors import PatternError, field_error, form_error
from attncc.ir.grid import Grid
from attncc.ir.nodes import (
    Axial,
    Band,
    BlockDiagonal,
    BlockMask,
    BlockSparse,
    Congruent,
    Dense,
    Document,
    Documents,
    GlobalTokens,
    Intersection,
    KeyLengths,
    KeyRange,
    Neighborhood,
    Pattern,
    PerHead,
    TopkBlocks,
    Union,
)

if TYPE_CHECKING:
    from attncc.ir.segments import BySegments


def per_axis(value: int | bool | tuple, rank: int, name: str) -> tuple:
    """Broadcast an int (or bool) to every axis; a tuple must name every axis."""
    if not isinstance(value, tuple):
        return (value,) * rank
    if len(value) != rank:
        raise field_error(PatternError, name, value, f"one value or a tuple of {rank} (the grid's rank)")
    return value


def neighborhood_axes(p: Neighborhood, rank: int) -> list[tuple[int, int, int, bool]]:
    """``(window, dilation, stride, causal)`` of each axis, ints broadcast to every axis."""
    fields = ("window", "dilation", "stride", "causal")
    values = [per_axis(getattr(p, f), rank, f"neighborhood.{f}") for f in fields]
    return list(zip(*values))


def block_count(p: BlockMask | TopkBlocks, grid: Grid) -> int:
    """The number of blocks of a runtime block primitive on ``grid`` (its data's ``QB`` and
    ``KB``): ``ceil(N / block)`` for flat blocks, the product of ``ceil(axis / block)`` for boxes."""
    if isinstance(p.block, tuple):
        return math.prod(math.ceil(size / b) for size, b in zip(grid.shape, p.block))
    return math.ceil(grid.size / p.block)


def required_heads(p: Pattern) -> int | None:
    """The head count a pattern fixes (per_head lists, per-head layouts), if any."""
    if isinstance(p, PerHead):
        # An entry may itself vary by head (a 3-D layout), but only with the per_head's count.
        inner = {c for c in (required_heads(e) for e in p.patterns) if c is not None} - {len(p.patterns)}
        if inner:
            raise field_error(
                PatternError,
                "per-head pattern inside per_head",
                f"{sorted(inner)[0]} heads",
                f"{len(p.patterns)} heads (one head count for the whole pattern)",
            )
        return len(p.patterns)
    if isinstance(p, BlockSparse) and p.per_head:
        return len(p.layout)
    counts = {c for c in (required_heads(ch) for ch in p.children) if c is not None}
    if len(counts) > 1:
        raise field_error(
            PatternError, "per-head pattern", sorted(counts), "one head count for the whole pattern"
        )
    return counts.pop() if counts else None


def _shown(value: object) -> object:
    """``value`` as an error quotes it: short texts whole, anything else by its type."""
    if value is None or (isinstance(value, str) and len(value) <= 200):
        return value
    return f"<{type(value).__name__}>"


def _pattern_hint(value: object) -> str:
    if isinstance(value, str):
        return "text is read with attncc.ir.parse(text)"
    if callable(value):
        return "a predicate function becomes one with @attncc.jit; a builder such as causal must be called"
    return "build one with attncc.ir (causal(), neighborhood(7), ...) or attncc.ir.parse(text)"


def validate(p: Pattern, grid: Grid, heads: int | None = None) -> int:
    """Raise a :class:`PatternError` if ``p`` does not fit; return the head count.

    The head count is ``heads`` if given, else what the pattern fixes, else 1.
    """
    if not isinstance(p, Pattern):
        raise form_error(PatternError, "pattern", _shown(p), "an attncc pattern", _pattern_hint(p))
    if p.ROOT_ONLY:  # Note [Root-only nodes] in attncc.ir.nodes
        why = (
            "it carries its own token space, which only attncc.attention, attncc.reference.attention, "
            "attncc.ir.mask and attncc.ir.analysis.analyze_segments take so far (Note [Segment spaces] in "
            "attncc.ir.segments)"
        )
        raise field_error(PatternError, "pattern", p.NAME, f"a pattern on one grid ({grid})", why)
    heads = _heads(p, heads)
    _check(p, grid)
    return heads


def _heads(p: Pattern, heads: int | None) -> int:
    """``heads`` if given, else what the pattern fixes, else 1; a given count must match."""
    fixed = required_heads(p)
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise field_error(PatternError, "heads", heads, "an integer >= 1")
    if fixed is not None and heads is not None and heads != fixed:
        raise field_error(
            PatternError, "heads", heads, f"{fixed} (the pattern gives {fixed} per-head entries)"
        )
    return heads or fixed or 1


def validate_segments(p: BySegments, heads: int | None = None) -> int:
    """:func:`validate` for a pattern per pair of segments (Note [Segment spaces] in
    attncc.ir.segments), whose pairs were checked against its space when it was built: the head
    count, one for every pair."""
    return _heads(p, heads)


def check_segment_pairs(p: BySegments) -> None:
    """Each listed pair's pattern fits its segments: a same-segment pair as a pattern on that
    segment's grid, a pair of two segments as one across two grids (:func:`validate_cross`).
    Errors name the pair."""
    space = p.space
    for i, j, pattern in p.listed():
        q_grid, k_grid = space.grids[i], space.grids[j]
        try:
            if i == j:
                validate(pattern, k_grid)
            else:
                validate_cross(pattern, q_grid, k_grid)
        except PatternError as e:
            pair = (space.names[i], space.names[j])
            raise PatternError(f"by_segments.pairs[{pair!r}]: {e}") from None


CROSS_ALLOWED = (
    "dense(), key_lengths(), documents() (ids per query and per key), key_range(0, ...) on a 1-D k, "
    "and their unions, intersections and per_head"
)
"""What a pattern across two grids may hold (Note [Cross-attention] in attncc.runtime.cross)."""


def validate_cross(p: Pattern, q_grid: Grid, grid: Grid, heads: int | None = None) -> int:
    """:func:`validate` for queries on ``q_grid`` over keys on another grid ``grid``: the pattern
    fits ``grid`` and compares no query's place with a key's (Note [Cross-attention] in
    attncc.runtime.cross); returns the head count. A geometric primitive raises a
    :class:`PatternError` naming it."""
    heads = validate(p, grid, heads)
    stack = [p]
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if isinstance(node, (Dense, KeyLengths, Documents, Union, Intersection, PerHead)):
            continue
        if isinstance(node, KeyRange) and grid.rank == 1:
            continue
        if isinstance(node, KeyRange):
            why = f"the kernels read k's grid {grid.shape} flat across grids: key_range takes a 1-D k"
        else:
            why = (
                f"q_grid {q_grid.shape} is not the keys' grid {grid.shape}, and {node.NAME} compares "
                "a query's place with a key's"
            )
        raise field_error(PatternError, "pattern", str(node), CROSS_ALLOWED, why)
    return heads


def _check(p: Pattern, grid: Grid) -> None:
    n = grid.size
    if isinstance(p, Neighborhood):
        window, dilation, stride, _ = zip(*neighborhood_axes(p, grid.rank))
        for a, size in enumerate(grid.shape):
            if window[a] > size:
                raise field_error(
                    PatternError, f"neighborhood.window[{a}]", window[a], f"1..{size} (grid axis {a})"
                )
            if window[a] * dilation[a] > size:
                raise field_error(
                    PatternError,
                    f"neighborhood.dilation[{a}]",
                    dilation[a],
                    f"1..{size // window[a]} (window {window[a]} x dilation must fit axis {a}, size {size})",
                )
            if stride[a] > window[a]:
                raise field_error(
                    PatternError, f"neighborhood.stride[{a}]", stride[a], f"1..{window[a]} (the window)"
                )
    elif isinstance(p, Axial):
        axes = p.axes or ()
        for i, a in enumerate(axes):
            if a >= grid.rank:
                raise field_error(PatternError, f"axial.axes[{i}]", a, f"0..{grid.rank - 1} (grid rank)")
        if len(set(axes)) != len(axes):
            raise field_error(PatternError, "axial.axes", axes, "distinct axes")
    elif isinstance(p, (Band, BlockDiagonal, Congruent, KeyRange)):
        if p.axis >= grid.rank:
            raise field_error(PatternError, f"{p.NAME}.axis", p.axis, f"0..{grid.rank - 1} (grid rank)")
    elif isinstance(p, BlockSparse):
        blocks = math.ceil(n / p.block)
        mat = p.layout[0] if p.per_head else p.layout
        if (len(mat), len(mat[0])) != (blocks, blocks):
            raise field_error(
                PatternError,
                "block_sparse.layout shape",
                (len(mat), len(mat[0])),
                f"({blocks}, {blocks}): ceil({n} tokens / block {p.block}) per side",
            )
    elif isinstance(p, (BlockMask, TopkBlocks)):
        if isinstance(p.block, tuple) and len(p.block) != grid.rank:
            allowed = f"an integer (flat blocks) or a tuple of {grid.rank} sizes (one per grid axis)"
            raise field_error(PatternError, f"{p.NAME}.block", p.block, allowed)
    elif isinstance(p, GlobalTokens):
        for i, v in enumerate(p.indices):
            if v >= n:
                raise field_error(PatternError, f"global_tokens.indices[{i}]", v, f"0..{n - 1}")
    elif isinstance(p, Document):
        if len(p.ids) != n:
            raise field_error(PatternError, "document.ids length", len(p.ids), f"{n} (one id per token)")
    for child in p.children:
        _check(child, grid)

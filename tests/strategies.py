"""Hypothesis strategies: random grids, patterns that fit them, and tiles."""

import math

from hypothesis import strategies as st

from attncc.ir import (
    Grid,
    axial,
    band,
    block_diagonal,
    block_sparse,
    causal,
    congruent,
    dense,
    document,
    global_tokens,
    intersection,
    key_range,
    neighborhood,
    per_head,
    sliding_window,
    strided,
    union,
)


@st.composite
def grids(draw, max_tokens=220):
    rank = draw(st.integers(1, 3))
    cap = {1: max_tokens, 2: 15, 3: 6}[rank]
    shape = tuple(draw(st.integers(1, cap)) for _ in range(rank))
    return Grid(shape)


@st.composite
def neighborhoods(draw, grid):
    windows, dilations, strides, causals = [], [], [], []
    for size in grid.shape:
        w = draw(st.integers(1, size))
        d = draw(st.integers(1, max(1, size // w)))
        windows.append(w)
        dilations.append(d)
        strides.append(draw(st.integers(1, w)))
        causals.append(draw(st.booleans()))
    return neighborhood(tuple(windows), tuple(dilations), tuple(strides), tuple(causals))


@st.composite
def axis_bands(draw, grid):
    """A band on one axis: open or bounded sides, holding the diagonal or not, past the borders."""
    axis = draw(st.integers(0, grid.rank - 1))
    reach = grid.shape[axis] + 1
    lo = draw(st.none() | st.integers(-reach, reach))
    hi = draw(st.integers(-reach, reach) if lo is None else st.none() | st.integers(lo, reach))
    return band(axis, lo, hi)


@st.composite
def primitives(draw, grid, heads):
    n = grid.size
    kind = draw(
        st.sampled_from(
            [
                "dense",
                "neighborhood",
                "neighborhood",
                "band",
                "causal",
                "axial",
                "strided",
                "block",
                "global",
                "doc",
                "axis-band",
                "axis-band",
                "block-diagonal",
                "congruent",
                "key-range",
            ]
        )
    )
    if kind == "dense":
        return dense()
    if kind == "neighborhood":
        return draw(neighborhoods(grid))
    if kind == "band":
        return sliding_window(draw(st.integers(0, n)), draw(st.integers(0, n)))
    if kind == "causal":
        return causal()
    if kind == "axis-band":
        return draw(axis_bands(grid))
    if kind == "key-range":
        b = draw(axis_bands(grid))  # the same bounds: open sides, past the borders
        return key_range(b.axis, b.lo, b.hi)
    if kind == "block-diagonal":
        axis = draw(st.integers(0, grid.rank - 1))
        return block_diagonal(axis, draw(st.integers(1, grid.shape[axis] + 1)))
    if kind == "congruent":
        axis = draw(st.integers(0, grid.rank - 1))
        m = draw(st.integers(1, grid.shape[axis] + 2))
        return congruent(axis, m, draw(st.integers(0, m - 1)))
    if kind == "axial":
        axes = draw(st.lists(st.integers(0, grid.rank - 1), min_size=1, max_size=grid.rank, unique=True))
        return axial(tuple(axes))
    if kind == "strided":
        s = draw(st.integers(1, 9))
        return strided(s, draw(st.integers(0, s - 1)))
    if kind == "block":
        block = draw(st.integers(1, max(1, n // 2)))
        nb = math.ceil(n / block)
        layers = heads if draw(st.booleans()) and heads > 1 else 0
        cell = st.integers(0, 1)
        if layers:
            layout = draw(
                st.lists(
                    st.lists(st.lists(cell, min_size=nb, max_size=nb), min_size=nb, max_size=nb),
                    min_size=layers,
                    max_size=layers,
                )
            )
        else:
            layout = draw(st.lists(st.lists(cell, min_size=nb, max_size=nb), min_size=nb, max_size=nb))
        return block_sparse(layout, block)
    if kind == "global":
        return global_tokens(draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4)))
    ids = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    return document(ids)


@st.composite
def patterns(draw, grid, heads=1, depth=2):
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(primitives(grid, heads))
    combinator = draw(
        st.sampled_from(["union", "intersection", "per_head"] if heads > 1 else ["union", "intersection"])
    )
    if combinator == "per_head":
        return per_head([draw(patterns(grid, 1, depth - 1)) for _ in range(heads)])
    ops = [draw(patterns(grid, heads, depth - 1)) for _ in range(draw(st.integers(2, 3)))]
    return union(*ops) if combinator == "union" else intersection(*ops)


@st.composite
def tiles(draw, grid):
    if draw(st.booleans()):
        return draw(st.integers(1, max(1, grid.size // 2)))
    return tuple(draw(st.integers(1, max(1, s))) for s in grid.shape)

"""Lowering decisions and the tile-visit count behind the tile-level bound."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import axis_bands, grids

from attncc import PatternError
from attncc.ir import (
    Grid,
    analyze,
    axial,
    band,
    block_diagonal,
    causal,
    congruent,
    dense,
    global_tokens,
    intersection,
    key_range,
    neighborhood,
    sliding_window,
    strided,
    union,
)
from attncc.lower.lowering import LaunchConfig, lower, tile_table
from attncc.lower.visits import tile_counts, visited_tiles


@pytest.mark.parametrize(
    "pattern,grid,iteration,dilation",
    [
        (neighborhood(7, dilation=2), Grid((30, 31)), "range", (1, 2, 2)),
        (
            neighborhood((3, 5), causal=(True, False)) & neighborhood((5, 3)),
            Grid((20, 20)),
            "range",
            (1, 1, 1),
        ),
        (sliding_window(31, 0), Grid((500,)), "range", (1, 1, 1)),
        (causal(), Grid((500,)), "range", (1, 1, 1)),
        (causal(), Grid((20, 25)), "table", (1, 1, 1)),  # flat causal on a 2-D grid is no product
        (axial(), Grid((20, 25)), "range", (1, 1, 1)),  # a union of two single-axis terms
        ((sliding_window(31, 0) | strided(64)) & causal(), Grid((500,)), "table", (1, 1, 1)),
        (sliding_window(31, 0) | (strided(64) & causal()), Grid((500,)), "range", (1, 1, 1)),
        (neighborhood(3, dilation=2) | axial(), Grid((20, 25)), "table", (1, 1, 1)),  # groups differ
        (sliding_window(8) | global_tokens([0]), Grid((300,)), "table", (1, 1, 1)),
        (band(0, -2, 2) & band(1, -7, 7) & band(2, -7, 7), Grid((8, 20, 20)), "range", (1, 1, 1)),
        (block_diagonal(0, 4) & congruent(1, 3), Grid((8, 20)), "range", (1, 1, 1)),
        (block_diagonal(1, 8) & band(1, hi=-1), Grid((8, 20)), "table", (1, 1, 1)),  # empty row per block
        (neighborhood(3, dilation=2) & band(1, hi=0), Grid((20, 25)), "table", (1, 1, 1)),
    ],
    ids=[
        "na2d-dilated",
        "na-intersection",
        "band",
        "causal-1d",
        "causal-2d",
        "axial",
        "strided-union-under-intersection",
        "strided-union",
        "dilated-or-axial",
        "band-or-global",
        "axis-bands",
        "block-diagonal-congruent",
        "block-diagonal-strict-causal",
        "dilated-and-axis-band",
    ],
)
def test_iteration_choice(pattern, grid, iteration, dilation):
    plan = lower(pattern, grid, 64, "float16")
    assert (plan.iteration, plan.dilation) == (iteration, dilation)


@pytest.mark.parametrize(
    "pattern,grid",
    [
        (neighborhood(7), Grid((45, 50))),
        (neighborhood((3, 9, 5), stride=(1, 3, 2)), Grid((6, 20, 21))),
        (neighborhood(9, causal=True, stride=2), Grid((300,))),
        (sliding_window(40, 3), Grid((700,))),
        (axial(), Grid((30, 41))),
        (neighborhood(5) | axial(0), Grid((30, 41))),
        (band(0, -2, 2) & band(1, -7, 7) & band(2, -7, 7), Grid((9, 21, 30))),
        (band(0, hi=-1) & band(1, 3, 9), Grid((21, 30))),  # empty first rows, empty last columns
        (band(1, lo=40), Grid((21, 30))),  # keeps nothing
        (block_diagonal(0, 6) & band(1, -2, 2), Grid((21, 30))),
        (band(1, 2, 3) | band(1, hi=-5), Grid((21, 30))),
    ],
    ids=[
        "na2d",
        "gna3d",
        "na1d-causal-strided",
        "band",
        "axial",
        "na-or-axial",
        "axis-bands",
        "off-diagonal-bands",
        "empty",
        "block-diagonal",
        "two-bands-one-axis",
    ],
)
def test_range_plans_visit_exactly_the_non_empty_tiles(pattern, grid):
    # Without dilation, group coordinates are grid coordinates and the closed-form range
    # of a product of monotone windows holds no empty tile: compare with the exact analysis.
    plan = lower(pattern, grid, 64, "float16", config=LaunchConfig(64, 32))
    rank = grid.rank
    a = analyze(pattern, grid, plan.q_tile[3 - rank :], plan.kv_tile[3 - rank :])
    visited, _ = visited_tiles(plan)
    assert visited == a.partial_tiles + a.full_tiles


@st.composite
def _products_of_windows(draw, grid):
    """Unions of products of one-axis bands, block diagonals, key ranges and (causal) neighborhoods."""

    def factor():
        kind = draw(st.sampled_from(["band", "band", "block", "keys", "neighborhood"]))
        if kind == "band":
            return draw(axis_bands(grid))
        if kind == "keys":
            b = draw(axis_bands(grid))
            return key_range(b.axis, b.lo, b.hi)
        if kind == "block":
            axis = draw(st.integers(0, grid.rank - 1))
            return block_diagonal(axis, draw(st.integers(1, grid.shape[axis] + 1)))
        windows = tuple(draw(st.integers(1, s)) for s in grid.shape)
        return neighborhood(windows, causal=tuple(draw(st.booleans()) for _ in grid.shape))

    terms = [
        intersection(*[factor() for _ in range(draw(st.integers(1, 3)))])
        for _ in range(draw(st.integers(1, 3)))
    ]
    return union(*terms)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_range_plans_of_bands_visit_exactly_the_non_empty_tiles(data):
    # Bands that leave the diagonal give rows with no key at the borders: see Note [Empty rows].
    grid = data.draw(grids(max_tokens=300))
    pattern = data.draw(_products_of_windows(grid))
    q_block, kv_block = data.draw(st.sampled_from([16, 32, 64])), data.draw(st.sampled_from([16, 32, 64]))
    plan = lower(pattern, grid, 16, "float32", config=LaunchConfig(q_block, kv_block))
    if plan.iteration != "range":
        return  # empty rows inside the axis: a table, exact by construction
    rank = grid.rank
    a = analyze(pattern, grid, plan.q_tile[3 - rank :], plan.kv_tile[3 - rank :])
    assert visited_tiles(plan)[0] == a.partial_tiles + a.full_tiles
    if plan.split_full:  # Note [Loops]: the unmasked loop runs full whole tiles, not always all of them
        whole = a.kv_tiling.sizes(grid) == np.prod(plan.kv_tile)
        per_q_tile = ((a.tile_classes[0] == 2) & whole[None, :]).sum(1)
        assert np.all(tile_counts(plan)[1] <= per_q_tile)


def test_dense_visits_every_tile_and_table_counts_entries():
    plan = lower(dense(), Grid((300,)), 64, "float16")
    visited, total = visited_tiles(plan)
    assert visited == total == 5 * 5
    p, g = axial() | global_tokens([3]), Grid((20, 25))
    plan = lower(p, g, 64, "float16")
    offsets, entries = tile_table(p, g, plan)
    classes = analyze(p, g, plan.q_tile[1:], plan.kv_tile[1:]).tile_classes[0]
    assert offsets[-1] == len(entries) == int((classes > 0).sum())
    kv_whole = _kv_whole(plan, g)
    expected_full = (classes == 2) & kv_whole[None, :]
    assert np.array_equal(entries % 2 == 1, expected_full[classes > 0])


def _kv_whole(plan, grid):
    """Which KV tiles hold a whole box of real tokens."""
    sizes = analyze(axial(), grid, plan.q_tile[1:], plan.kv_tile[1:]).kv_tiling.sizes(grid)  # any pattern
    return sizes == np.prod(plan.kv_tile)


def test_ragged_border_tiles_are_never_full_in_tables():
    p, g = axial() | global_tokens([0]), Grid((7, 9))
    plan = lower(p, g, 64, "float16")  # 8x8 boxes: the second KV tile holds 7x1 real tokens
    _, entries = tile_table(p, g, plan)
    assert not any(e % 2 and e // 2 == 1 for e in entries)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dtype": "float64"}, r"dtype = 'float64'.*float16, bfloat16, float32"),
        ({"head_dim": 300}, r"head_dim = 300.*1..256"),
        ({"q_tile": (8, 12)}, r"q_tile = \(8, 12\).*powers of two"),
    ],
    ids=["dtype", "head-dim", "tile-not-pow2"],
)
def test_bad_plans_are_refused(kwargs, match):
    args = {"dtype": "float16", "head_dim": 64, **kwargs}
    with pytest.raises(PatternError, match=match):
        lower(neighborhood(3), Grid((16, 16)), **args)


@pytest.mark.parametrize(
    "pattern,grid",
    [
        (neighborhood(13), Grid((20, 24))),
        (neighborhood((5, 9, 9), causal=(True, False, False)), Grid((6, 20, 21))),
        (sliding_window(100, 0), Grid((700,))),
        (dense(), Grid((300,))),
    ],
    ids=["na2d", "na3d-causal-t", "band", "dense"],
)
def test_unmasked_loop_walks_only_whole_full_tiles(pattern, grid):
    # Note [Loops]: on a box of more than one row a row's full run starts after its first
    # tile, so the unmasked loop leaves that tile to the masked one: on these small grids up
    # to a third of the full tiles (under 2% in the benchmark cases, benchmarks/STATIC.md).
    plan = lower(pattern, grid, 64, "float16", config=LaunchConfig(64, 32))
    assert plan.split_full
    rank = grid.rank
    a = analyze(pattern, grid, plan.q_tile[3 - rank :], plan.kv_tile[3 - rank :])
    whole = a.kv_tiling.sizes(grid) == np.prod(plan.kv_tile)
    exact = ((a.tile_classes[0] == 2) & whole[None, :]).sum(1)
    full = tile_counts(plan)[1]
    assert np.all(full <= exact) and full.sum() >= 0.6 * exact.sum()


def test_default_boxes_visit_fewest_tiles():
    # 3-D window (7, 15, 15): round-robin boxes (4, 4, 8)/(4, 4, 4) visit 17920 tiles per head,
    # (2, 8, 8)/(1, 8, 8) visit 15360; see Note [Box choice].
    p, g = neighborhood((7, 15, 15)), Grid((16, 48, 48))
    plan = lower(p, g, 128, "bfloat16", config=LaunchConfig(128, 64))
    fixed = lower(p, g, 128, "bfloat16", q_tile=(4, 4, 8), kv_tile=(4, 4, 4), config=LaunchConfig(128, 64))
    assert (plan.q_tile, plan.kv_tile) == ((2, 8, 8), (1, 8, 8))
    assert visited_tiles(plan)[0] == 15360 < visited_tiles(fixed)[0] == 17920


def test_config_boxes_fix_the_tiles():
    p, g = neighborhood(7), Grid((32, 32))
    config = LaunchConfig(64, 32, q_box=(1, 4, 16), kv_box=(1, 2, 16))
    plan = lower(p, g, 64, "float16", config=config)
    assert (plan.q_tile, plan.kv_tile) == ((1, 4, 16), (1, 2, 16))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"q_block": 48}, r"q_block = 48.*power of two in 16..1024"),
        ({"num_warps": 3}, r"num_warps = 3.*1, 2, 4, 8, 16"),
        ({"num_stages": 0}, r"num_stages = 0.*1..8"),
        ({"q_box": (1, 4, 8)}, r"q_box = \(1, 4, 8\).*64 tokens"),
        ({"kv_box": (1, 8)}, r"kv_box = \(1, 8\).*rank-3 box"),
        ({"backend": "cuda"}, r"backend = 'cuda'.*triton, cutlass"),
    ],
    ids=["block", "warps", "stages", "box-size", "box-rank", "backend"],
)
def test_bad_launch_configs_are_refused(kwargs, match):
    with pytest.raises(PatternError, match=match):
        LaunchConfig(**kwargs)


def test_config_box_must_fit_the_grid_rank():
    with pytest.raises(PatternError, match=r"q_box = \(2, 1, 32\).*1 on the first 2 axes"):
        lower(causal(), Grid((100,)), 64, "float16", config=LaunchConfig(64, 64, q_box=(2, 1, 32)))


@pytest.mark.parametrize("head_dim,dtype,stages", [(64, "bfloat16", 3), (128, "bfloat16", 3), (256, "bfloat16", 1),
                                                   (128, "float32", 1)])  # fmt: skip
def test_dq_stages_fit_the_shared_memory_of_a_block(head_dim, dtype, stages):
    # The dQ kernel keeps Q and dO tiles beside its stages of K and V tiles: at D = 256 (and fp32
    # D = 128) three stages would pass sm_90's 227 KiB, so it runs with one.
    plan = lower(dense(), Grid((1024,)), head_dim, dtype, config=LaunchConfig(128, 64, 8, 3))
    width = plan.head_dim_padded * (4 if dtype == "float32" else 2)
    assert plan.dq_stages == stages
    assert (2 * plan.block_m + 2 * plan.block_n * plan.dq_stages) * width <= 227 * 1024

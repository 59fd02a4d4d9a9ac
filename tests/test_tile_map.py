"""The kernel's tile map (attncc.lower.visits.tile_map): the picture of what a plan runs.

It must be the walks' own count, tile by tile: per Q tile, as many visited and unmasked KV
tiles as the kernel's loops run; and, without dilation, held to the exact analysis in the
same boxes: every tile with a kept pair visited, only tiles keeping every pair unmasked.
"""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import grids, patterns

from attncc.ir import Grid, analyze, axial, global_tokens, neighborhood
from attncc.ir.analysis import EMPTY, FULL
from attncc.lower.lowering import LaunchConfig, kernel_tables, lower
from attncc.lower.visits import dense_tiles, tile_counts, tile_map, tiles_per_group


def _check(pattern, grid, plan):
    classes = tile_map(plan, kernel_tables(pattern, grid, plan))
    assert classes.size == dense_tiles(plan)
    if plan.iteration == "range":
        visited, full = tile_counts(plan)
        assert np.array_equal((classes != EMPTY).sum(1), visited)
        assert np.array_equal((classes == FULL).sum(1), full)
    if plan.dilation == (1, 1, 1):  # tiles are grid boxes: hold it to the exact analysis
        rank = grid.rank
        exact = analyze(pattern, grid, plan.q_tile[3 - rank :], plan.kv_tile[3 - rank :]).tile_classes[0]
        assert np.all(classes[exact != EMPTY] != EMPTY)  # every tile with a kept pair is visited
        assert np.all(exact[classes == FULL] == FULL)  # and only tiles keeping every pair run unmasked
    return classes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_map_is_what_the_kernel_walks(data):
    grid = data.draw(grids(max_tokens=300))
    pattern = data.draw(patterns(grid))
    q_block, kv_block = (data.draw(st.sampled_from([16, 32, 64])) for _ in range(2))
    plan = lower(pattern, grid, 16, "float32", config=LaunchConfig(q_block, kv_block))
    _check(pattern, grid, plan)


def test_a_dilated_plan_visits_only_its_own_group():
    pattern, grid = neighborhood(3, dilation=(2, 4)), Grid((24, 20))
    plan = lower(pattern, grid, 64, "float16", config=LaunchConfig(16, 16))
    assert plan.dilation == (1, 2, 4)
    classes = _check(pattern, grid, plan)
    group_of_q = np.repeat(np.arange(8), tiles_per_group(plan, plan.q_tile))
    group_of_kv = np.repeat(np.arange(8), tiles_per_group(plan, plan.kv_tile))
    rows, cols = np.nonzero(classes)
    assert len(rows) and np.array_equal(group_of_q[rows], group_of_kv[cols])


def test_a_table_plan_maps_its_tables():
    pattern, grid = axial() | global_tokens([3]), Grid((20, 25))
    plan = lower(pattern, grid, 64, "float16")
    assert plan.iteration == "table"
    classes = _check(pattern, grid, plan)
    assert (classes != EMPTY).sum() == len(kernel_tables(pattern, grid, plan)[2])  # its entries

"""Property tests: the symbolic analysis and the canonical form agree exactly with brute force."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import grids, patterns, tiles

from attncc.ir import Tiling, analyze, canonicalize, parse, resolve_heads
from attncc.ir.mask import mask
from attncc.ir.validate import required_heads

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    grid = draw(grids())
    heads = draw(st.integers(1, 3))
    pattern = draw(patterns(grid, heads))
    heads = required_heads(pattern) or heads
    return grid, heads, pattern


def _tile_counts(m: np.ndarray, grid, q_tile, kv_tile) -> np.ndarray:
    q_id = Tiling.of(q_tile, grid).tile_of_token(grid)
    k_id = Tiling.of(kv_tile, grid).tile_of_token(grid)
    out = np.zeros((q_id.max() + 1, k_id.max() + 1), dtype=np.int64)
    np.add.at(out, (q_id[:, None].repeat(grid.size, 1), k_id[None, :].repeat(grid.size, 0)), m)
    return out


@SETTINGS
@given(data=st.data())
def test_analysis_matches_brute_force(data):
    grid, heads, pattern = data.draw(cases())
    q_tile, kv_tile = data.draw(tiles(grid)), data.draw(tiles(grid))
    a = analyze(pattern, grid, q_tile, kv_tile, heads=heads)
    m = mask(pattern, grid, heads).expand(heads, grid.size, grid.size).numpy()
    assert a.kept_pairs == int(m.sum())
    assert a.density == m.sum() / m.size
    capacity = np.outer(a.q_tiling.sizes(grid), a.kv_tiling.sizes(grid))
    for h in range(a.tile_counts.shape[0]):  # one map when heads share the pattern
        expected = _tile_counts(m[h], grid, q_tile, kv_tile)
        assert np.array_equal(a.tile_counts[h], expected)
        classes = np.where(expected == 0, 0, np.where(expected == capacity, 2, 1))
        assert np.array_equal(a.tile_classes[h], classes)
    visited = (a.tile_classes > 0).sum()
    assert a.tile_bound == (np.inf if visited == 0 else a.tile_classes.size / visited)


@SETTINGS
@given(data=st.data())
def test_canonical_form_keeps_the_mask_and_is_idempotent(data):
    grid, heads, pattern = data.draw(cases())
    m = mask(pattern, grid, heads).expand(heads, grid.size, grid.size)
    for h, head_pattern in enumerate(resolve_heads(pattern, heads)):
        canon = canonicalize(head_pattern, grid)
        assert torch.equal(mask(canon, grid)[0], m[h])
        assert canonicalize(canon, grid) == canon


@SETTINGS
@given(data=st.data())
def test_text_round_trip(data):
    pattern = data.draw(cases())[2]
    assert parse(str(pattern)) == pattern

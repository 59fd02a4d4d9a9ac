"""Tile lists built on the device from call-time data (issue 18, attncc.runtime.tables).

Each class is checked against a brute-force classification of the tile pair's token pairs
under the data (full: every pair kept; empty: none), and must be that or, where the tables
are conservative by design (Note [Tile classes from data]), partial; the lists must hold
exactly the full tiles, then the partial ones, in increasing order.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import DEVICE

from attncc.ir import Grid, sliding_window
from attncc.lower.lowering import lower
from attncc.lower.plan import RuntimeLeaf
from attncc.runtime import tables

EMPTY, PARTIAL, FULL = tables.EMPTY, tables.PARTIAL, tables.FULL


def _plan(grid, leaf, q_tile, kv_tile, program=None):
    """A runtime plan on ``grid`` reading ``leaf`` (its static part stands in for the lowering's)."""
    base = lower(sliding_window(1, 1), Grid(grid), 16, "float32", q_tile=q_tile, kv_tile=kv_tile)
    return dataclasses.replace(
        base, iteration="runtime", runtime=(leaf,), program=program or ("leaf", leaf.kind)
    )


def _brute(plan, keep):
    """Classes from a token-level mask ``keep [B, H, N, N]`` of the plan's tile pairs."""
    geo = tables.geometry(plan.grid, plan.q_tile, plan.kv_tile)
    b, h = keep.shape[:2]
    out = np.zeros((b, h, len(geo.q_tokens), len(geo.kv_tokens)), np.int8)
    for i, qt in enumerate(geo.q_tokens):
        for j, kt in enumerate(geo.kv_tokens):
            qs, ks = qt[qt >= 0], kt[kt >= 0]
            sub = keep[:, :, qs][:, :, :, ks]
            whole = (qt >= 0).all() and (kt >= 0).all()
            out[:, :, i, j] = np.where(
                sub.all((2, 3)) & whole, FULL, np.where(sub.any((2, 3)), PARTIAL, EMPTY)
            )
    return out


def _check(classes, exact, conservative=False):
    classes = classes.numpy()
    if conservative:
        assert ((classes == exact) | (classes == PARTIAL)).all()
        assert (classes[exact == EMPTY] != FULL).all() and (classes[exact == FULL] != EMPTY).all()
    else:
        np.testing.assert_array_equal(classes, np.broadcast_to(exact, classes.shape))


@pytest.mark.parametrize(
    "grid,block,q_tile,kv_tile",
    [
        ((64,), 16, (16,), (32,)),
        ((61,), 8, (16,), (16,)),
        ((6, 10), (2, 4), (2, 8), (4, 4)),
        ((6, 10), 7, (2, 8), (2, 8)),
    ],
    ids=["flat-tiles-bigger", "flat-ragged", "box-blocks", "flat-blocks-on-a-grid"],
)
def test_block_layout_classes_are_exact(grid, block, q_tile, kv_tile):
    leaf = RuntimeLeaf("block_mask", (1, 1, block) if isinstance(block, int) else (1,) * (3 - len(grid)) + block,
                       flat=isinstance(block, int))  # fmt: skip
    plan = _plan(grid, leaf, q_tile, kv_tile)
    blocks = tables.leaf_blocks(plan.grid, leaf)
    gen = torch.Generator().manual_seed(0)
    nb = int(blocks.max()) + 1
    layout = (torch.rand(2, 3, nb, nb, generator=gen) < 0.4).to(torch.int8)
    layout[0, 0] = 1  # one all-kept layout, one all-empty
    layout[1, 0] = 0
    classes = tables.tile_classes(plan, (), {"block_mask": layout}, torch.device("cpu"))
    keep = layout.bool().numpy()[:, :, blocks][:, :, :, blocks]
    _check(classes, _brute(plan, keep))


def test_document_and_length_classes():
    grid = (50,)
    ids = torch.tensor([[0] * 20 + [1] * 17 + [2] * 13, [5] * 50], dtype=torch.int32)
    plan = _plan(grid, RuntimeLeaf("documents"), (16,), (16,))
    classes = tables.tile_classes(plan, (), {"documents": ids}, torch.device("cpu"))
    keep = (ids[:, :, None] == ids[:, None, :]).numpy()[:, None]
    _check(classes, _brute(plan, keep))  # sorted (packed) ids: exact
    shuffled = ids[:, torch.randperm(50, generator=torch.Generator().manual_seed(1))]
    classes = tables.tile_classes(plan, (), {"documents": shuffled}, torch.device("cpu"))
    _check(classes, _brute(plan, (shuffled[:, :, None] == shuffled[:, None, :]).numpy()[:, None]), True)
    lengths = torch.tensor([50, 17, 0], dtype=torch.int32)
    plan = _plan(grid, RuntimeLeaf("key_lengths"), (16,), (16,))
    classes = tables.tile_classes(plan, (), {"key_lengths": lengths}, torch.device("cpu"))
    keep = (torch.arange(50)[None, None, :] < lengths[:, None, None]).expand(3, 50, 50).numpy()[:, None]
    _check(classes, _brute(plan, keep))


def test_a_union_with_the_static_part_takes_the_larger_class():
    plan = _plan(
        (64,),
        RuntimeLeaf("key_lengths"),
        (16,),
        (16,),
        ("or", (("static", "causal()"), ("leaf", "key_lengths"))),
    )
    statics = tables.static_classes_of(plan, Grid((64,)))
    lengths = torch.tensor([20, 64], dtype=torch.int32)
    classes = tables.tile_classes(plan, statics, {"key_lengths": lengths}, torch.device("cpu"))
    causal = np.tril(np.ones((64, 64), bool))
    keep = causal[None] | (np.arange(64)[None, None, :] < lengths.numpy()[:, None, None])
    _check(classes, _brute(plan, keep[:, None]))


def test_lists_hold_full_then_partial_tiles_in_order():
    gen = torch.Generator().manual_seed(2)
    classes = torch.randint(0, 3, (2, 3, 5, 7), generator=gen).to(torch.int8)
    for by_kv in (False, True):
        counts, lists = tables.tile_lists(classes, by_kv)
        c = classes.transpose(-1, -2) if by_kv else classes
        for idx in np.ndindex(*c.shape[:3]):
            row = c[idx]
            full = torch.nonzero(row == FULL).flatten().tolist()
            part = torch.nonzero(row == PARTIAL).flatten().tolist()
            assert counts[idx].tolist() == [len(full), len(part)]
            assert lists[idx][: len(full) + len(part)].tolist() == full + part


@pytest.mark.parametrize("n", [64, 1000])
def test_building_takes_no_host_sync_and_scales_with_tiles(n):
    """The lists come from torch ops only (no .item()/.tolist()/nonzero: a CUDA sync) — checked by
    running the builder under torch.cuda's sync debug mode when there is a GPU, and here by its
    shapes: [B', H', tiles, 2] and [B', H', tiles, tiles] whatever the data."""
    plan = _plan((n,), RuntimeLeaf("block_mask", (1, 1, 16), True), (16,), (16,))
    nb = math.ceil(n / 16)
    layout = torch.ones(1, 2, nb, nb, dtype=torch.int8, device=DEVICE)
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("error")
    try:
        counts, lists = tables.build(plan, (), {"block_mask": layout}, torch.device(DEVICE))
    finally:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
    tiles = plan.q_tiles()[2]
    assert counts.shape == (1, 2, tiles, 2) and lists.shape == (1, 2, tiles, tiles)

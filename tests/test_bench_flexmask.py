"""FlexAttention mask_mods derived from the IR agree with the brute-force oracle.

Every shipped spec is checked on every (head, q, k) pair through FlexAttention's
own evaluator (``create_mask``, which traces the mask_mod with vmap), on a grid
shrunk until the oracle's N x N mask is cheap.
"""

from pathlib import Path

import pytest
import torch
from conftest import SPECS
from torch.nn.attention.flex_attention import create_mask

from attncc import AttnccError
from attncc.bench.flexmask import mask_mod
from attncc.ir import Grid, block_sparse, causal, dense, load_spec, neighborhood, per_head, validate
from attncc.ir.mask import mask as oracle

_MAX_TOKENS = 2048


def _shrunk(pattern, grid: Grid) -> Grid:
    """Halve the longest axis the pattern still fits, until the grid has few tokens."""
    shape = list(grid.shape)
    while shape and grid.size > _MAX_TOKENS:
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            candidate = Grid(tuple(s // 2 if a == axis else s for a, s in enumerate(shape)))
            try:
                validate(pattern, candidate)
            except AttnccError:
                continue
            grid, shape = candidate, list(candidate.shape)
            break
        else:
            break
    return grid


def _assert_agrees(pattern, grid: Grid, heads: int) -> None:
    mod, mod_heads = mask_mod(pattern, grid, heads)
    want = oracle(pattern, grid, heads)
    if mod is None:
        assert want.all()
        return
    got = create_mask(mod, 1, mod_heads, grid.size, grid.size, device="cpu")[0]
    assert got.shape[0] in (1, heads)
    assert torch.equal(got, want.expand_as(got) if want.shape[0] == 1 else want)


@pytest.mark.parametrize("path", sorted(SPECS.iterdir()), ids=lambda p: Path(p).stem)
def test_mask_mod_matches_oracle_for_every_spec(path):
    spec = load_spec(path)
    _assert_agrees(spec.pattern, _shrunk(spec.pattern, spec.grid), spec.heads)


@pytest.mark.parametrize(
    "pattern,grid,heads",
    [
        (neighborhood((3, 5), dilation=(2, 1), stride=(1, 2), causal=(False, True)), Grid((9, 11)), 1),
        (neighborhood((2, 3, 3), stride=(2, 3, 1)), Grid((4, 7, 6)), 1),
        (per_head([causal(), dense(), neighborhood(5)]), Grid((37,)), 3),
        (block_sparse([[[1, 0], [1, 1]], [[0, 1], [1, 0]]], 20), Grid((33,)), 2),
    ],
    ids=["gna2d-dilated-causal-axis", "gna3d-strided", "per-head", "per-head-layout"],
)
def test_mask_mod_matches_oracle_on_small_grids(pattern, grid, heads):
    _assert_agrees(pattern, grid, heads)


def test_dense_has_no_mask_mod():
    assert mask_mod(dense(), Grid((64,))) == (None, 1)


def test_a_dilated_mask_mod_runs_inside_flex_attention():
    """FlexAttention traces the mask_mod with Dynamo, which cannot trace sympy: every sympy step
    happens when the mask_mod is made (Note [No sympy under tracing] in attncc.bench.flexmask)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attncc.reference import attention

    grid, pattern = Grid((7, 11)), neighborhood((3, 5), dilation=(2, 1))
    mod, _ = mask_mod(pattern, grid, 2)
    q, k, v = (torch.randn(1, 2, grid.size, 16) for _ in range(3))
    block_mask = create_block_mask(mod, None, None, grid.size, grid.size, device="cpu")
    out = flex_attention(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(out, attention(q, k, v, pattern, grid=grid), atol=1e-5, rtol=0)

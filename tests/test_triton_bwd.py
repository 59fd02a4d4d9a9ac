"""Backward kernels (dQ Q-major; dK/dV KV-major by inverse iteration) against autograd of the reference.

CPU: TRITON_INTERPRET=1 at small shapes, fp32 and fp16 (bf16 on a GPU only, see
tests/test_triton_fwd.py). The reference runs in float64 autograd.

Tolerances: fp32 runs every dot in IEEE fp32, so gradients differ from float64
only by summation order: 1e-4 absolute on O(1) gradients summed over up to a
few hundred keys. fp16 rounds P, dS, dO and the stored gradients to fp16
(~2^-11 relative each) and sums over the kept keys/queries: 2e-2 absolute,
with the inputs scaled so gradients are O(1).
"""

import pytest
import torch
from conftest import DEVICE
from test_triton_fwd import CASES

from attncc.ir import (
    Grid,
    band,
    block_diagonal,
    causal,
    congruent,
    key_range,
    neighborhood,
    per_head,
    sliding_window,
    strided,
)
from attncc.reference import attention as reference
from attncc.runtime.library import attention


def _grads(fn, q, k, v, do, dlse=None):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    if dlse is None:
        out.backward(do)
    else:
        o, lse = out
        torch.autograd.backward((o, lse), (do, dlse))
    return q.grad, k.grad, v.grad


def _check(pattern, grid, b, h, h_kv, d, dtype, atol, seed=0, **kw):
    n = grid.size
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=g) for s in ((b, h, n, d), (b, h_kv, n, d), (b, h_kv, n, d)))
    do = torch.randn(b, h, n, d, generator=g)
    dlse = torch.randn(b, h, n, generator=g) if kw.get("return_lse") else None
    ours = _grads(lambda *t: attention(*t, pattern, grid=grid, **kw), *(x.to(dtype).to(DEVICE) for x in (q, k, v)),
                  do.to(dtype).to(DEVICE), None if dlse is None else dlse.to(DEVICE))  # fmt: skip
    want = _grads(lambda *t: reference(*t, pattern, grid=grid, **kw), *(x.double() for x in (q, k, v)),
                  do.double(), None if dlse is None else dlse.double())  # fmt: skip
    for name, got, ref in zip("qkv", ours, want):
        assert got.dtype == dtype and got.shape == ref.shape
        err = (got.cpu().double() - ref).abs().max().item()
        assert err < atol, f"d{name}: max abs error {err:.3g} >= {atol}"


@pytest.mark.parametrize("name,pattern,grid", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_reference_fp32(name, pattern, grid):
    _check(pattern, grid, 1, 2, 1, 16, torch.float32, 1e-4)


@pytest.mark.parametrize(
    "name,pattern,grid",
    [c for c in CASES if c[0] in ("causal-200", "na2d-w3-d2-9x10", "global-band-150", "na3d-3x5x6")],
    ids=lambda c: c if isinstance(c, str) else "",
)
def test_backward_fp16(name, pattern, grid):
    _check(pattern, grid, 1, 2, 2, 32, torch.float16, 2e-2)


def test_backward_gqa_batch_padded_head_dim():
    _check(neighborhood(5, dilation=2), Grid((11, 12)), 2, 6, 2, 24, torch.float32, 1e-4)


def test_backward_per_head_patterns_share_kv_heads():
    """Two launches feed one KV head: they add in float32 buffers."""
    pattern = per_head([causal(), sliding_window(3, 1), causal(), neighborhood(5)])
    _check(pattern, Grid((37,)), 1, 4, 1, 16, torch.float32, 1e-4)


def test_backward_of_lse_and_scale():
    _check(neighborhood(7), Grid((30,)), 1, 2, 1, 16, torch.float32, 1e-4, return_lse=True, scale=0.3)


def test_backward_sigmoid():
    _check(neighborhood((3, 5)), Grid((6, 9)), 1, 2, 1, 16, torch.float32, 1e-4, score="sigmoid")


def test_backward_spatial_layout_and_no_key_rows():
    """Spatial layout; queries 0-2 see no key (strided & causal) and get zero dq."""
    pattern = strided(7, 3) & causal()
    grid = Grid((5, 6))
    q, k, v, do = (torch.randn(1, 5, 6, 2, 16, device=DEVICE) for _ in range(4))
    ours = _grads(lambda *t: attention(*t, pattern), q, k, v, do)
    assert ours[0][0, 0, :3].abs().max() == 0 and ours[0][0, 0, 3].abs().max() > 0
    want = _grads(lambda *t: reference(*t, pattern, grid=grid), q, k, v, do)
    for got, ref in zip(ours, want):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "name,pattern,grid",
    [
        ("band-excluding-diagonal", band(0, hi=-1) & band(1, lo=-2, hi=2), Grid((7, 9))),
        ("band-ahead-open", band(1, lo=1), Grid((4, 11))),
        ("block-diagonal-congruent", block_diagonal(0, 3) & congruent(1, 2), Grid((8, 10))),
        ("prefix-lm", causal() | key_range(0, hi=15), Grid((40,))),  # from @attncc.jit / attncc.flex
        ("key-range-causal-time", key_range(1, 2, 5) & band(0, hi=0), Grid((4, 9))),
        ("block-causal", causal() | block_diagonal(0, 8), Grid((36,))),
    ],
    ids=lambda c: c if isinstance(c, str) else "",
)
def test_backward_of_per_axis_primitives(name, pattern, grid):
    """Bands that leave rows without keys (Note [Empty rows]) keep first/last monotone: the
    dK/dV bisection relies on it."""
    _check(pattern, grid, 1, 2, 1, 16, torch.float32, 1e-4)

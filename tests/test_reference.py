"""The reference attention against torch's SDPA (an independent implementation)."""

import math

import pytest
import torch
import torch.nn.functional as F

from attncc import AttnccError
from attncc.ir import Grid, causal, dense, neighborhood, per_head, sliding_window, strided
from attncc.ir.mask import mask
from attncc.reference import attention


def _qkv(b, h, n, d, h_kv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, n, d), (b, h_kv or h, n, d), (b, h_kv or h, n, d)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


@pytest.mark.parametrize("h_kv", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_dense_matches_sdpa(h_kv, dtype):
    q, k, v = _qkv(2, 4, 37, 16, h_kv, dtype)
    out = attention(q, k, v, dense())
    rep = 4 // h_kv
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
    # fp32: both sum 37 terms in float32 (~1e-7 relative each); fp64 agrees to rounding.
    torch.testing.assert_close(out, expected, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)


@pytest.mark.parametrize(
    "pattern,grid",
    [
        (causal(), Grid((29,))),
        (neighborhood(window=(3, 5), dilation=(2, 1)), Grid((7, 9))),
        (neighborhood(window=(3, 3, 3), causal=(True, False, False)), Grid((4, 5, 6))),
        (sliding_window(4, 2), Grid((31,))),
    ],
    ids=["causal-29", "na2d-dilated-7x9", "na3d-causal-t", "band-31"],
)
def test_masked_matches_sdpa_with_bool_mask(pattern, grid):
    q, k, v = _qkv(1, 2, grid.size, 8, dtype=torch.float64)
    keep = mask(pattern, grid)
    out, lse = attention(q, k, v, pattern, grid=grid, scale=0.3, return_lse=True)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~keep, -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-12, rtol=0)


def test_spatial_layout_equals_sdpa_layout():
    grid = Grid((5, 6, 7))
    q, k, v = _qkv(2, 3, grid.size, 8)
    p = neighborhood(window=(3, 3, 5), dilation=(1, 2, 1))
    flat, lse = attention(q, k, v, p, grid=grid, return_lse=True)
    spatial = [t.transpose(1, 2).unflatten(1, grid.shape) for t in (q, k, v)]  # [B, T, H, W, heads, D]
    out, lse_s = attention(*spatial, p, return_lse=True)
    assert out.shape == (2, 5, 6, 7, 3, 8)
    torch.testing.assert_close(out, flat.transpose(1, 2).unflatten(1, grid.shape), atol=0, rtol=0)
    torch.testing.assert_close(lse_s, lse.transpose(1, 2).unflatten(1, grid.shape), atol=0, rtol=0)


def test_query_with_no_keys_gives_zeros_and_minus_inf_lse():
    # strided(2, 1) & a band of one key back: query q sees k = q - 1 only; q = 0 sees nothing.
    p = strided(2, 1) & sliding_window(1, 0)
    q, k, v = _qkv(1, 2, 9, 4)
    out, lse = attention(q, k, v, p, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[:, :, 0] == 0).all() and (lse[:, :, 0] == -math.inf).all()
    torch.testing.assert_close(out[:, :, 1:], v[:, :, :-1], atol=1e-6, rtol=0)  # one key: weight 1
    assert torch.isfinite(lse[:, :, 1:]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs_compute_in_float32(dtype):
    q, k, v = _qkv(1, 2, 20, 8, dtype=dtype)
    out, lse = attention(q, k, v, causal(), return_lse=True)
    ref, ref_lse = attention(q.float(), k.float(), v.float(), causal(), return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref.to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)


def test_per_head_patterns_apply_per_query_head():
    q, k, v = _qkv(1, 2, 16, 8, h_kv=1)
    out = attention(q, k, v, per_head([causal(), dense()]))
    kk, vv = k.expand(1, 2, 16, 8), v.expand(1, 2, 16, 8)
    torch.testing.assert_close(
        out[:, :1], F.scaled_dot_product_attention(q[:, :1], kk[:, :1], vv[:, :1], is_causal=True)
    )
    torch.testing.assert_close(out[:, 1:], F.scaled_dot_product_attention(q[:, 1:], kk[:, 1:], vv[:, 1:]))


def test_bad_shapes_are_refused():
    q, k, v = _qkv(1, 4, 10, 8, h_kv=3)
    with pytest.raises(AttnccError, match=r"k shape = \(1, 3, 10, 8\).*H_kv dividing 4"):
        attention(q, k, v, dense())
    q, k, v = _qkv(1, 2, 10, 8)
    with pytest.raises(AttnccError, match=r"grid = \(3, 4\).*10 tokens"):
        attention(q, k, v, dense(), grid=(3, 4))
    with pytest.raises(AttnccError, match=r"q.dim\(\) = 3"):
        attention(q[0], k[0], v[0], dense())

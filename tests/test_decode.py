"""Decode: a few queries over a long 1-D key sequence, split and merged (issue 16 part 2).

Every case against the float64 oracle (attncc.reference with ``q_offset``: a region's rows are
those rows of the whole problem), fp32 to 1e-5 and fp16 to 1e-2 of the largest magnitude, with
per-batch offsets (ragged caches, a query at position 0, one at the end), GQA 8:2, 1 and 5
queries, and the split count forced (``ATTNCC_DECODE_SPLITS``) so the merge runs, splits with no
kept key included. The interpreter's tiles are 16 x 16: 100 keys are 7 tiles, the last ragged,
and 5 queries of 4 heads are two programs' rows.
"""

import math

import pytest
import torch
from conftest import DEVICE

import attncc
from attncc import AttnccError
from attncc.autotune.cost import device_spec
from attncc.autotune.decode import split_count, tiles
from attncc.errors import PatternError
from attncc.ir import (
    Grid,
    alibi,
    block_mask,
    block_sparse,
    causal,
    dense,
    document,
    documents,
    global_tokens,
    key_lengths,
    key_range,
    neighborhood,
    per_head,
    query_bias,
    sliding_window,
    softcap,
    strided,
    temperature,
    topk_blocks,
)
from attncc.ir.mask import mask
from attncc.lower.decode import DecodeConfig, lower_decode
from attncc.reference import attention as reference
from attncc.runtime import data as call_data
from attncc.runtime import decode_lists, library

B, H, H_KV, N, D = 3, 8, 2, 100, 16
OFFSETS = torch.tensor([0, 41, N - 5])  # a first token, the middle of a cache, its end


def _qkv(lq, dtype=torch.float32, h_kv=H_KV, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, lq, D, generator=gen)
    k, v = (torch.randn(B, h_kv, N, D, generator=gen) for _ in range(2))
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def _check(pattern, lq, data=None, dtype=torch.float32, h_kv=H_KV, offsets=OFFSETS, **kwargs):
    q, k, v = _qkv(lq, dtype, h_kv)
    offsets = offsets if offsets is None or isinstance(offsets, int) else offsets.to(DEVICE)
    data = {key: t.to(DEVICE) for key, t in (data or {}).items()}
    out, lse = attncc.attention(q, k, v, pattern, q_offset=offsets, data=data, return_lse=True, **kwargs)
    wide = [t.double() for t in (q, k, v)]
    want, want_lse = reference(*wide, pattern, q_offset=offsets, data=data, return_lse=True, **kwargs)
    tol = (1e-5 if dtype == torch.float32 else 1e-2) * max(1.0, want.abs().max().item())
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.double() - want).abs().max().item() <= tol
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))  # rows with no key: -inf
    finite = torch.isfinite(want_lse)
    assert (lse.double() - want_lse)[finite].abs().max().item() <= tol
    return out, lse


@pytest.fixture(autouse=True)
def _three_splits(monkeypatch):
    monkeypatch.setenv("ATTNCC_DECODE_SPLITS", "3")


def _layout(p=0.4, seed=1):
    return torch.rand(B, H, 7, 7, generator=torch.Generator().manual_seed(seed)) < p


def _ids():
    return torch.sort(torch.randint(0, 4, (B, N), generator=torch.Generator().manual_seed(2)), -1).values


CASES = {
    "causal": (causal(), None),
    "sliding-window": (sliding_window(9), None),
    "sinks": (sliding_window(20) | key_range(0, hi=3), None),
    "key-lengths": (causal() & key_lengths(), {"key_lengths": torch.tensor([60, 0, 97])}),
    "dense-key-lengths": (dense() & key_lengths(), {"key_lengths": torch.tensor([1, 50, 100])}),
    "block-mask": (block_mask(16), {"block_mask": _layout()}),
    "topk-causal": (topk_blocks(16) & causal(), {"topk_blocks": torch.randint(-1, 7, (B, H, 7, 3))}),
    "documents": (documents() & causal(), {"documents": _ids()}),
    "window-documents": (sliding_window(10) & documents(), {"documents": _ids()}),
    "block-sparse": (block_sparse([[1, 0, 0, 1, 0, 1, 1]] * 7, 16), None),
    "document": (document([0] * 30 + [1] * 70) & causal(), None),
    "global-tokens": (global_tokens([0, 1, 50]) | sliding_window(5), None),
    "strided": (strided(3) & causal(), None),
    "neighborhood": (neighborhood(9), None),
}


@pytest.mark.parametrize("name", CASES)
def test_pattern_families(name):
    pattern, data = CASES[name]
    for lq in (1, 5):
        _check(pattern, lq, data)


@pytest.mark.parametrize("splits", ["1", "2", "16"])
def test_split_counts_and_splits_with_no_key(monkeypatch, splits):
    """16 splits of a 2-tile window leave most splits with no kept key (lse -inf, weight 0); a
    batch element whose keys are all cut gets zero rows and lse -inf."""
    monkeypatch.setenv("ATTNCC_DECODE_SPLITS", splits)
    _check(sliding_window(3), 5)
    out, lse = _check(causal() & key_lengths(), 1, {"key_lengths": torch.tensor([30, 0, 100])})
    assert torch.all(out[1] == 0) and torch.all(lse[1] == -math.inf)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype):
    _check(sliding_window(20) | key_range(0, hi=3), 5, dtype=dtype)


def test_score_terms():
    slopes = torch.rand(H, device=DEVICE)
    _check(causal(), 5, score_mod=softcap(5.0) + alibi(slopes))
    temps = torch.rand(H, device=DEVICE) + 0.5
    _check(sliding_window(30), 1, score_mod=temperature(temps) + alibi(slopes, distance="signed"))


@pytest.mark.parametrize("h_kv", [1, H], ids=["mqa", "mha"])
def test_kv_heads(h_kv):
    _check(causal(), 5, h_kv=h_kv)


def test_offsets_by_default_an_int_and_clamped():
    _check(causal(), 5, offsets=None)  # bottom-right: the cache's last tokens
    _check(sliding_window(7), 1, offsets=17)
    _check(causal(), 1, offsets=torch.tensor([-4, 3, 1000]))  # clamped to 0..N - 1


def test_the_spatial_layout_and_out():
    q, k, v = _qkv(5)
    spatial = [t.transpose(1, 2) for t in (q, k, v)]  # [B, L, H, D]
    given = torch.empty_like(spatial[0])
    out = attncc.attention(*spatial, causal(), layout="spatial", q_offset=OFFSETS.to(DEVICE), out=given)
    want = reference(*spatial, causal(), layout="spatial", q_offset=OFFSETS.to(DEVICE))
    assert out.data_ptr() == given.data_ptr()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_opcheck():
    q, k, v = _qkv(5)
    args = (q, k, v, "causal()", 0.25, "softmax", OFFSETS.to(DEVICE, torch.int32))
    torch.library.opcheck(torch.ops.attncc.decode_opaque.default, args)


@pytest.mark.parametrize(
    "lq,kwargs",
    [
        (10, {"grid": (10, 10), "offsets": None}),
        (65, {}),
        (1, {"score": "sigmoid"}),
        (2, {"query_bias": True}),
        (1, {"pattern": per_head([causal()] * 4 + [dense()] * 4)}),
        (3, {"grad": True}),
    ],
    ids=["grid", "queries", "sigmoid", "query-bias", "per-head", "grad"],
)
def test_calls_decode_does_not_take_run_the_general_kernels(monkeypatch, lq, kwargs):
    """Note [Decode dispatch]: the general kernels' query regions take them, backward included."""

    def refuse(*args):
        raise AssertionError("the decode kernels ran")

    monkeypatch.setattr(library, "_decode", refuse)
    kwargs = dict(kwargs)
    pattern, grad = kwargs.pop("pattern", causal()), kwargs.pop("grad", False)
    offsets = kwargs.pop("offsets", OFFSETS.to(DEVICE))
    if kwargs.pop("query_bias", False):
        kwargs["score_mod"] = query_bias(torch.linspace(-1, 1, H * lq).reshape(1, H, lq).to(DEVICE))
    q, k, v = (t.requires_grad_(grad) for t in _qkv(lq))
    wide = [t.detach().double().requires_grad_(grad) for t in (q, k, v)]
    out = attncc.attention(q, k, v, pattern, q_offset=offsets, **kwargs)
    want = reference(*wide, pattern, q_offset=offsets, **kwargs)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    if grad:
        out.sum().backward()
        want.sum().backward()
        for got, leaf in zip((q, k, v), wide):
            torch.testing.assert_close(got.grad.double(), leaf.grad, atol=1e-4, rtol=1e-4)


def test_dropout_runs_the_general_kernels(monkeypatch):
    monkeypatch.setattr(library, "_decode", lambda *args: pytest.fail("the decode kernels ran"))
    q, k, v = _qkv(1)
    out = attncc.attention(q, k, v, causal(), dropout_p=0.1, dropout_seed=3)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_a_bad_split_setting(monkeypatch):
    monkeypatch.setenv("ATTNCC_DECODE_SPLITS", "0")
    with pytest.raises(AttnccError, match="ATTNCC_DECODE_SPLITS = '0' is out of range"):
        _check(causal(), 1)


def test_plans():
    sinks = lower_decode(sliding_window(4095) | key_range(0, hi=3), 131072, 1, 8, 128, "bfloat16")
    assert sinks.iteration == "range" and len(sinks.spans) == 2 and sinks.keys_bound == 4100
    assert lower_decode(block_mask(64) & causal(), 4096, 1, 8, 128, "bfloat16").iteration == "list"
    plan = lower_decode(causal(), 4096, 5, 8, 64, "float16", config=DecodeConfig(16, 32, 4, 2))
    assert (plan.block_m, plan.m_tiles, plan.kv_tiles) == (16, 3, 128)
    with pytest.raises(PatternError, match="decode queries = 65"):
        lower_decode(causal(), 4096, 65, 8, 64, "float16")


def test_split_model():
    """Note [Split count]: a single program over 128K keys is split until the machine streams; a
    batch that fills the machine is not; a window's splits follow its keys, not the cache's."""
    h100 = device_spec("NVIDIA H100 80GB HBM3")
    causal_128k = lower_decode(causal(), 131072, 1, 8, 128, "bfloat16")
    assert split_count(causal_128k, 1, 1, h100) >= h100.sms
    assert split_count(causal_128k, 64, 8, h100) == 1
    window = lower_decode(sliding_window(4095) | key_range(0, hi=3), 131072, 1, 8, 128, "bfloat16")
    assert tiles(window) == 67 and split_count(window, 1, 1, h100) <= tiles(window)


@pytest.mark.parametrize(
    "pattern,data",
    [
        (block_mask(16) & causal(), {"block_mask": _layout()}),
        (topk_blocks(16) | sliding_window(5), {"topk_blocks": torch.randint(-1, 7, (B, H, 7, 2))}),
        (
            block_sparse([[1, 0, 0, 1, 0, 1, 1]] * 7, 16) & key_lengths(),
            {"key_lengths": torch.tensor([9, 0, 99])},
        ),
        (documents() & causal(), {"documents": _ids()}),
    ],
    ids=["block-mask", "topk-or-window", "static-layout-lengths", "sorted-documents"],
)
def test_lists_hold_exactly_the_kept_tiles(pattern, data):
    """Note [Decode lists]: per program, the tiles some row keeps (sorted ids: exactly)."""
    lq, grid = 5, Grid((N,))
    plan = lower_decode(pattern, N, lq, H // H_KV, D, "float32", device_type="cpu")
    normal = call_data.checked(pattern, grid, B, H, data, torch.device("cpu"))
    counts, lists = decode_lists.build(plan, pattern, normal, OFFSETS.to(torch.int32), H, H_KV)
    keep = mask(pattern, grid, heads=H, data=normal).expand(B, H, N, N)  # [B, H, q, k]
    rows = torch.stack([keep[b, :, o : o + lq] for b, o in enumerate(OFFSETS.tolist())])  # [B, H, lq, N]
    rows = torch.nn.functional.pad(rows, (0, plan.kv_tiles * plan.block_n - N))
    tiles_kept = rows.reshape(B, H_KV, H // H_KV, lq, plan.kv_tiles, plan.block_n).any(-1)
    by_row = tiles_kept.transpose(2, 3).reshape(B, H_KV, plan.rows, plan.kv_tiles)
    by_row = torch.nn.functional.pad(by_row, (0, 0, 0, plan.m_tiles * plan.block_m - plan.rows))
    want = by_row.reshape(B, H_KV, plan.m_tiles, plan.block_m, plan.kv_tiles).any(3)
    assert torch.equal(counts, want.sum(-1, dtype=torch.int32))
    for index in want.nonzero(as_tuple=False)[:, :3].unique(dim=0).tolist():
        b, hk, mt = index
        assert lists[b, hk, mt, : counts[b, hk, mt]].tolist() == want[b, hk, mt].nonzero()[:, 0].tolist()

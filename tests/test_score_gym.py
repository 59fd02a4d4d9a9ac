"""attention-gym's score_mods, rebuilt and matched (issue 17 part 3).

Each case is our own function for one of attention-gym's score_mods (ALiBi with slopes
computed from the head, tanh soft-capping, a relative positional bias, learned biases of its
``learnable_bias`` example, a NATTEN/Swin relative position table), written as a
FlexAttention user writes it (``score_mod(score, b, h, q_idx, kv_idx)``, through
:func:`attncc.flex.flex_attention`) or with attncc's coordinates (``q.index``, ``q.h``, through
:func:`attncc.attention`). Two computations are compared, forward (output, log-sum-exp) and
backward (q, k, v and every captured tensor):

(a) the function itself, evaluated by torch on the float64 scores of every kept (query, key)
    pair (what FlexAttention computes), softmax and the weighted sum in float64;
(b) attncc: the function traced into score terms, fused in the kernels (fp32 under the
    interpreter on the CPU).

Tolerance, as tests/test_score_inputs.py: fp32 dots and sums against float64, 1e-4 of the
largest magnitude (at least 1) of each compared tensor. Score functions with no term are
refused, naming the sub-expression (the last test).
"""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import DEVICE

import attncc
import attncc.flex
from attncc import TraceError
from attncc.ir import Grid, causal, dense, neighborhood, sliding_window
from attncc.ir.mask import coordinates, mask

H, H_KV, D = 4, 2, 16  # GQA: two query heads per KV head
W = 3  # the local window of the learned window bias


def causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window_mod(b, h, q_idx, kv_idx):
    return abs(q_idx - kv_idx) <= W


def causal_window_mod(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 8)


# Each case: (pattern, grid, form, the mask_mod for the flex form, make(gen) -> (score_mod, captured)).


def alibi_from_heads(gen):  # attention-gym's ALiBi: slopes 2^(-8 (h + 1) / H), a signed distance
    def alibi_mod(score, b, h, q_idx, kv_idx):
        slope = torch.exp2(-((h + 1) * 8.0 / H))
        return score + (kv_idx - q_idx) * slope

    return alibi_mod, []


def tanh_softcap(gen):  # Gemma-2 / Grok-1 soft-capping, a cap the scaled scores reach
    def softcap_mod(score, b, h, q_idx, kv_idx):
        return 2.5 * torch.tanh(score / 2.5)

    return softcap_mod, []


def relative_positional(gen):  # the query's offset from the key, scaled by the head dim
    def relative_mod(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx) / D

    return relative_mod, []


def global_tokens_capped(gen):  # learnable_bias's per-key bias, under a cap
    kv_bias = torch.randn(32, generator=gen, device=DEVICE).requires_grad_()

    def mod(score, b, h, q_idx, kv_idx):
        return 2.5 * torch.tanh(score / 2.5) + kv_bias[kv_idx]

    return mod, [kv_bias]


def batch_head_bias(gen):  # learnable_bias's dense [B, H, N, N] bias
    full = torch.randn(2, H, 32, 32, generator=gen, device=DEVICE).requires_grad_()

    def mod(score, b, h, q_idx, kv_idx):
        return score + full[b, h, q_idx, kv_idx]

    return mod, [full]


def local_window(gen):  # learnable_bias's window bias, indexed by the clamped offset q - k
    window = torch.randn(2 * W + 1, generator=gen, device=DEVICE).requires_grad_()

    def mod(score, b, h, q_idx, kv_idx):
        return score + window[torch.clamp(q_idx - kv_idx + W, 0, 2 * W)]

    return mod, [window]


def natten_table(gen):  # a learned per-head relative position table (NATTEN's rpb), attncc's q/k
    table = torch.randn(H, 13, generator=gen, device=DEVICE).requires_grad_()

    def mod(score, b, h, q, k):
        return score + table[h, k.index - q.index + 6]

    return mod, [table]


def head_temperature_and_bias(gen):  # a learned temperature and bias per head
    temp = (torch.rand(H, generator=gen, device=DEVICE) + 0.5).requires_grad_()
    head_bias = torch.randn(H, generator=gen, device=DEVICE).requires_grad_()

    def mod(score, b, h, q, k):
        return score * temp[h] + head_bias[h]

    return mod, [temp, head_bias]


def swin_table_and_alibi(gen):  # a 2-D Swin-style table and ALiBi on the grid distance
    table = torch.randn(H, 5, 9, generator=gen, device=DEVICE).requires_grad_()
    slopes = torch.rand(H, generator=gen, device=DEVICE).requires_grad_()

    def mod(score, b, h, q, k):
        return score + table[h, k.h - q.h + 2, k.w - q.w + 4] - slopes[h] * (abs(q.h - k.h) + abs(q.w - k.w))

    return mod, [table, slopes]


CASES = [
    ("alibi-causal", causal(), (32,), "flex", causal_mod, alibi_from_heads, 1),
    ("tanh-softcap", dense(), (32,), "flex", None, tanh_softcap, 1),
    (
        "relative-positional-window",
        sliding_window(8, 0),
        (32,),
        "flex",
        causal_window_mod,
        relative_positional,
        1,
    ),
    ("global-tokens-capped", dense(), (32,), "flex", None, global_tokens_capped, 1),
    ("batch-head-bias", causal(), (32,), "flex", causal_mod, batch_head_bias, 2),
    ("local-window", sliding_window(W, W), (32,), "flex", window_mod, local_window, 1),
    ("natten-table", neighborhood(7), (32,), "coords", None, natten_table, 1),
    ("head-temperature-bias", causal(), (32,), "coords", None, head_temperature_and_bias, 1),
    ("swin-table-alibi-2d", neighborhood((3, 5)), (5, 6), "coords", None, swin_table_and_alibi, 1),
]


def evaluated(fn, form, scores, pattern, grid):
    """``fn`` applied by torch to the scores of every kept pair, ``-inf`` elsewhere."""
    batch, heads, n, _ = scores.shape
    keep = mask(pattern, Grid(grid), heads=heads, device=scores.device).expand(heads, n, n)
    hh, qq, kk = keep.nonzero(as_tuple=True)
    coords = coordinates(Grid(grid), scores.device)
    names = {1: ("n",), 2: ("h", "w")}[len(grid)]

    def position(i):
        return SimpleNamespace(index=i, **{name: coords[i, a] for a, name in enumerate(names)})

    q, k = (qq, kk) if form == "flex" else (position(qq), position(kk))
    rows = []
    for b in range(batch):
        out = torch.full_like(scores[b], -math.inf)
        out[hh, qq, kk] = fn(scores[b, hh, qq, kk], torch.full_like(hh, b), hh, q, k).to(scores.dtype)
        rows.append(out)
    return torch.stack(rows)


def dense_attention(q, k, v, fn, form, pattern, grid):
    """(a): softmax attention of the function's scores, in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = (t.repeat_interleave(H // H_KV, dim=1) for t in (k, v))
    scores = evaluated(fn, form, q @ k.transpose(-1, -2) / math.sqrt(D), pattern, grid)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]) @ v, lse


def kernel_attention(q, k, v, fn, form, pattern, grid, mask_mod):
    """(b): attncc, through FlexAttention's front door or attncc.attention."""
    if form == "flex":
        return attncc.flex.flex_attention(q, k, v, mask_mod, score_mod=fn, enable_gqa=True, return_lse=True)
    return attncc.attention(q, k, v, pattern, grid=grid, score_mod=fn, return_lse=True)


@pytest.mark.parametrize(
    "pattern,grid,form,mask_mod,make,batch", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_score_mods_match_the_function_forward_and_backward(pattern, grid, form, mask_mod, make, batch):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    n = math.prod(grid)
    q = (2 * torch.randn(batch, H, n, D, generator=gen, device=DEVICE)).requires_grad_()
    k = (2 * torch.randn(batch, H_KV, n, D, generator=gen, device=DEVICE)).requires_grad_()
    v = torch.randn(batch, H_KV, n, D, generator=gen, device=DEVICE).requires_grad_()
    do = torch.randn(batch, H, n, D, generator=gen, device=DEVICE, dtype=torch.float64)
    fn, captured = make(gen)
    leaves = [q, k, v, *captured]
    results = []
    for run in (
        dense_attention(q, k, v, fn, form, pattern, grid),
        kernel_attention(q, k, v, fn, form, pattern, grid, mask_mod),
    ):
        out, lse = run
        loss = (out.double() * do).sum() + lse.double().sum()
        results.append([out, lse, *torch.autograd.grad(loss, leaves)])
    names = ["out", "lse", "dq", "dk", "dv", *(f"d(captured {i})" for i in range(len(captured)))]
    for name, want, got in zip(names, *results):
        assert got.shape == want.shape, name
        err = (got.double() - want.double()).abs().max().item()
        tol = 1e-4 * max(want.abs().max().item(), 1.0)
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


def checkerboard(score, b, h, q_idx, kv_idx):  # attention-gym's checkerboard: a score that branches
    score = torch.where(torch.abs(kv_idx - q_idx) % 2 == 0, score * 2.0, score)
    return score


def causal_as_a_score(score, b, h, q_idx, kv_idx):  # a mask written as a score_mod
    return torch.where(q_idx >= kv_idx, score, torch.finfo(score.dtype).min)


def sign_flip(score, b, h, q_idx, kv_idx):  # a sign that depends on the data
    return score * torch.sign(score)


MULTIPLICATIVE = torch.randn(32)
SYMMETRIC = torch.randn(64)
OFFSET = torch.randint(0, 32, (32,))


def multiplicative(score, b, h, q_idx, kv_idx):  # learnable_bias's per-query scale
    return score * MULTIPLICATIVE[q_idx]


def symmetric_relative(score, b, h, q_idx, kv_idx):  # learnable_bias's bias by |q - k|
    return score + SYMMETRIC[torch.abs(q_idx - kv_idx)]


def offset_lookup(score, b, h, q_idx, kv_idx):  # learnable_bias's bias at a looked-up position
    return score + MULTIPLICATIVE[OFFSET[q_idx]]


REFUSED = [
    (checkerboard, r"torch.where\(abs\(kv_idx - q_idx\) % 2 == 0, score \* 2.0, score\): not in the score grammar"),
    (causal_as_a_score, r"torch.where\(q_idx >= kv_idx, score, .*\): not in the score grammar"),
    (sign_flip, r"torch.sign\(score\): not in the score grammar"),
    (multiplicative, r"score \* MULTIPLICATIVE\[q_idx\]: MULTIPLICATIVE\[q_idx\] is not a factor per head"),
    (symmetric_relative, r"SYMMETRIC\[abs\(q_idx - kv_idx\)\]: the index abs\(q_idx - kv_idx\) is not"),
    (offset_lookup, r"OFFSET\[q_idx\]: OFFSET is <tensor of shape \[32\], int64>; a score reads float tensors"),
]  # fmt: skip


@pytest.mark.parametrize("fn,message", REFUSED, ids=[f.__name__ for f, _ in REFUSED])
def test_score_mods_without_a_term_are_refused_naming_the_sub_expression(fn, message):
    q = torch.randn(1, H, 32, D, device=DEVICE)
    with pytest.raises(TraceError, match=rf"attncc.flex score_mod {fn.__name__} on 32 tokens: {message}"):
        attncc.flex.flex_attention(q, q, q, score_mod=fn)

"""Dropout on attention probabilities (issue 17): the kernels' mask against the reference, and
its statistics.

Note [Reading the mask]: the kernels draw the mask themselves (Philox, regenerated in the
backward), so a test reads it back: with ``v`` the identity (``N <= D``), the output row of
query ``q`` is ``p[q, :] * keep[q, :] / (1 - p_drop)``, positive exactly where a kept pair
survives. The same seed then runs with other values, and the reference applies that mask:
outputs, log-sum-exp and gradients must match it as without dropout (fp32: 1e-4 of the
largest magnitude; bf16, on a GPU (``DEVICE``, where these tests run when there is one): 2.4e-2
of the largest magnitude on outputs, 8e-2 on gradients; see test_score_inputs.py). The mask
depends on the seed and the pair's indices, not on the dtype: it is read in fp32.
"""

import math

import pytest
import torch
import torch._dynamo.testing
from conftest import DEVICE

import attncc
from attncc import AttnccError
from attncc.ir import causal, neighborhood, sigmoid, softcap
from attncc.ir.score import as_score
from attncc.reference import attention as reference

H, H_KV, D, N = 4, 2, 64, 48
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # bf16: GPU only
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2.4e-2, 8e-2)}  # outputs, gradients


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, N, D, generator=gen)
    k = torch.randn(1, H_KV, N, D, generator=gen)
    v = torch.randn(1, H_KV, N, D, generator=gen)
    do = torch.randn(1, H, N, D, generator=gen)
    return tuple(t.to(DEVICE) for t in (q, k, v, do))


def _kept(q, k, pattern, p, seed, score="softmax"):
    """The mask the kernels draw for this call (Note [Reading the mask])."""
    eye = torch.eye(N, D, device=DEVICE).expand(1, H_KV, N, D).contiguous()
    out = attncc.attention(q, k, eye, pattern, dropout_p=p, dropout_seed=seed, score=score)
    return out[..., :N] > 0


@pytest.mark.parametrize(
    "pattern,score",
    [(causal(), "softmax"), (neighborhood(7), softcap(2.0)), (neighborhood(5), sigmoid())],
    ids=["causal", "na1d+softcap", "na1d-sigmoid"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_match_the_reference_with_the_kernels_mask(pattern, score, dtype):
    q, k, v, do = _inputs()
    p, seed = 0.3, 1234
    mask = _kept(q, k, pattern, p, seed, score)
    lse = as_score(score).kind == "softmax"

    def run(fn, work, **kw):
        leaves = [t.to(dtype).to(work).requires_grad_() for t in (q, k, v)]
        if lse:
            out, l_ = fn(*leaves, pattern, score=score, return_lse=True, dropout_p=p, **kw)
            loss = (out.double() * do.double()).sum() + l_.double().sum()
            return [out, l_, *torch.autograd.grad(loss, leaves)]
        out = fn(*leaves, pattern, score=score, dropout_p=p, **kw)
        return [out, *torch.autograd.grad((out.double() * do.double()).sum(), leaves)]

    got = run(attncc.attention, dtype, dropout_seed=seed)
    want = run(reference, torch.float64, dropout_mask=mask)
    for i, (a, b) in enumerate(zip(got, want)):
        tol = TOLERANCE[dtype][0 if i < 1 + lse else 1]  # outputs (and lse), then gradients
        assert (a.double() - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def test_a_seed_repeats_and_another_differs():
    q, k, v, _ = _inputs()
    one = attncc.attention(q, k, v, causal(), dropout_p=0.2, dropout_seed=7)
    assert torch.equal(one, attncc.attention(q, k, v, causal(), dropout_p=0.2, dropout_seed=7))
    assert not torch.equal(one, attncc.attention(q, k, v, causal(), dropout_p=0.2, dropout_seed=8))
    torch.manual_seed(3)
    drawn = attncc.attention(q, k, v, causal(), dropout_p=0.2)
    torch.manual_seed(3)
    assert torch.equal(drawn, attncc.attention(q, k, v, causal(), dropout_p=0.2))


def test_keep_rate_per_head_and_batch_element():
    """Over the kept pairs of 2 batch elements, 4 heads and 4 seeds (37632 draws), the keep rate
    is 1 - p within 5 standard deviations (0.011), and so is each head's and batch element's
    (their streams differ: no two of them draw the same mask). With the kept probabilities
    scaled by 1 / (1 - p), the output's expectation is the undropped one: the reference above
    computes exactly that with the kernels' mask."""
    q, k, _, _ = _inputs()
    q2 = torch.cat([q, torch.randn_like(q)])
    k2 = torch.cat([k, k])
    p = 0.25
    eye = torch.eye(N, D, device=DEVICE).expand(2, H_KV, N, D).contiguous()
    masks = torch.stack(
        [attncc.attention(q2, k2, eye, causal(), dropout_p=p, dropout_seed=s)[..., :N] > 0 for s in range(4)]
    )  # [seed, B, H, N, N]
    pairs = torch.ones(N, N, dtype=torch.bool, device=DEVICE).tril()
    kept = masks[..., pairs].float()  # [seed, B, H, pairs]

    def within(rates: torch.Tensor, draws: int) -> bool:
        return bool(((rates - (1 - p)).abs() <= 5 * math.sqrt(p * (1 - p) / draws)).all())

    assert within(kept.mean().reshape(1), kept.numel())
    assert within(kept.mean(dim=(0, 1, 3)), kept.numel() // H)
    assert within(kept.mean(dim=(0, 2, 3)), kept.numel() // 2)
    flat = kept.transpose(0, 2).reshape(H, -1)  # per head, every draw
    assert len({tuple(row.tolist()) for row in flat}) == H


def test_no_dropout_at_zero():
    q, k, v, _ = _inputs()
    torch.testing.assert_close(
        attncc.attention(q, k, v, causal(), dropout_p=0.0),
        attncc.attention(q, k, v, causal()),
        atol=0,
        rtol=0,
    )


def test_dropout_under_torch_compile_draws_per_call():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    pattern = causal()

    @torch.compile(fullgraph=True, backend=counter)
    def f(q, k, v):
        return attncc.attention(q, k, v, pattern, dropout_p=0.2)

    q, k, v, _ = _inputs()
    torch.manual_seed(0)
    a, b = f(q, k, v), f(q, k, v)
    torch.manual_seed(0)
    assert torch.equal(a, f(q, k, v)) and not torch.equal(a, b)
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dropout_p": 1.0}, r"dropout_p = 1.0 is out of range"),
        ({"dropout_p": -0.1}, r"dropout_p = -0.1 is out of range"),
        ({"dropout_p": "0.1"}, r"dropout_p = '0.1' is not a real number"),
        ({"dropout_p": 0.1, "dropout_seed": -1}, r"dropout_seed = -1 is out of range"),
        ({"dropout_p": 0.1, "dropout_seed": 2**63}, r"dropout_seed = 9223372036854775808 is out of range"),
        ({"dropout_p": 0.1, "dropout_seed": 1.5}, r"dropout_seed = 1.5 is out of range"),
    ],
    ids=["p=1", "p<0", "p-str", "seed<0", "seed-big", "seed-float"],
)
def test_bad_dropout_arguments_are_refused(kwargs, match):
    q, k, v, _ = _inputs()
    with pytest.raises(AttnccError, match=match):
        attncc.attention(q, k, v, causal(), **kwargs)


@pytest.mark.parametrize(
    "pattern,grid",
    [(neighborhood((3, 5)), (6, 8)), (neighborhood(5, dilation=2), (48,))],
    ids=["na2d", "na1d-dilated"],
)
def test_grids_and_dilation_draw_a_word_per_pair(pattern, grid):
    """Where a tile's keys are not runs of 4 consecutive tokens (a grid's boxes, dilation groups),
    each pair draws its own Philox call (Note [Dropout]); the mask still matches the reference's
    use of it, forward and backward."""
    q, k, v, do = _inputs()
    p, seed = 0.3, 99
    eye = torch.eye(N, D, device=DEVICE).expand(1, H_KV, N, D).contiguous()
    mask = attncc.attention(q, k, eye, pattern, grid=grid, dropout_p=p, dropout_seed=seed)[..., :N] > 0

    def run(fn, work, **kw):
        leaves = [t.to(work).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, pattern, grid=grid, dropout_p=p, **kw)
        return [out, *torch.autograd.grad((out.double() * do.double()).sum(), leaves)]

    for a, b in zip(
        run(attncc.attention, torch.float32, dropout_seed=seed),
        run(reference, torch.float64, dropout_mask=mask),
    ):
        assert (a.double() - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())

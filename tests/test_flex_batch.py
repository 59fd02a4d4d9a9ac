"""``attncc.flex`` masks that read per-batch data on the key alone (Note [Per-batch masks] in
attncc.flex): ``valid[b, kv_idx]`` is ``key_mask()``, ``kv_idx < lengths[b]`` ``key_lengths()``,
their tensors passed per call.

Two checks: the traced pattern's brute-force mask on the call's data equals the mask_mod run by
torch pair by pair for every batch element (bit for bit), and the kernels match the float64
reference of that pattern and data, forward and backward: fp32 within 1e-4 of the largest
magnitude (a few ulps of float32 accumulations over at most 24 keys). A query that sees no key
gives a zero row and a log-sum-exp of -inf, as the reference does."""

import pytest
import torch
from conftest import DEVICE

import attncc.flex
from attncc import TraceError
from attncc.ir import Grid, canonicalize, causal, key_lengths, key_mask
from attncc.ir.mask import mask
from attncc.reference import attention as reference
from attncc.runtime.data import checked

B, H, N, D = 2, 2, 24, 16
VALID = torch.rand(B, N, generator=torch.Generator().manual_seed(3)) < 0.6  # scattered padding
VALID[1, 0] = False  # batch 1's query 0 sees no key under causal
LENGTHS = torch.tensor([9, 24])


def valid_causal(b, h, q_idx, kv_idx):
    return VALID[b, kv_idx] & (q_idx >= kv_idx)


def padded(b, h, q_idx, kv_idx):
    return kv_idx < LENGTHS[b]


def both(b, h, q_idx, kv_idx):
    return (LENGTHS[b] > kv_idx) & ~(q_idx < kv_idx) & VALID[b, kv_idx]


def brute_force(mask_mod) -> torch.Tensor:
    """``[B, 1, N, N]``: ``mask_mod`` run on 0-d int64 tensors, one (b, q, kv) at a time."""
    out = torch.zeros(B, 1, N, N, dtype=torch.bool)
    for b in range(B):
        for q in range(N):
            for kv in range(N):
                out[b, 0, q, kv] = bool(
                    mask_mod(torch.tensor(b), torch.tensor(0), torch.tensor(q), torch.tensor(kv))
                )
    return out


CASES = [
    (valid_causal, causal() & key_mask(), {"key_mask": VALID}),
    (padded, key_lengths(), {"key_lengths": LENGTHS}),
    (both, causal() & key_mask() & key_lengths(), {"key_mask": VALID, "key_lengths": LENGTHS}),
]


@pytest.mark.parametrize("mask_mod,want,data", CASES, ids=["valid", "lengths", "both"])
def test_a_per_batch_mask_is_a_runtime_primitive_with_the_mask_mods_pairs(mask_mod, want, data):
    found, read = attncc.flex._traced(mask_mod, N, H)
    assert found == canonicalize(want, Grid((N,)))
    assert read.keys() == data.keys() and all(read[k] is data[k] for k in data)
    assert attncc.flex.pattern(mask_mod, N) == found
    normalised = checked(found, Grid((N,)), B, H, read, torch.device("cpu"))
    assert torch.equal(mask(found, Grid((N,)), H, data=normalised).expand(B, 1, N, N), brute_force(mask_mod))


@pytest.mark.parametrize("mask_mod,want,data", CASES, ids=["valid", "lengths", "both"])
def test_flex_attention_of_a_per_batch_mask_matches_the_reference(mask_mod, want, data):
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, generator=gen) for _ in range(4))

    def run(fn, dtype):
        leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        finite = torch.isfinite(lse)
        loss = (out.double() * do.to(DEVICE).double()).sum() + lse.double()[finite].sum()
        return [out, lse.masked_fill(~finite, 0), (~finite).float(), *torch.autograd.grad(loss, leaves)]

    on = {key: t.to(DEVICE) for key, t in data.items()}
    got = run(lambda q, k, v: attncc.flex.flex_attention(q, k, v, mask_mod, return_lse=True), torch.float32)
    want = run(lambda q, k, v: reference(q, k, v, want, data=on, return_lse=True), torch.float64)
    for name, a, w in zip(["out", "lse", "lse -inf", "dq", "dk", "dv"], got, want, strict=True):
        tol = 1e-4 * max(1.0, w.abs().max().item())
        assert a.shape == w.shape and (a.double() - w).abs().max().item() <= tol, name
    if mask_mod is valid_causal:
        assert want[2][1, :, 0].all() and (got[0][1, :, 0] == 0).all()  # batch 1's query 0: no key


def test_new_values_of_the_tensors_are_read_per_call():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, N, D, generator=gen, device=DEVICE) for _ in range(3))
    lengths = torch.tensor([3, 24])

    def short(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    first = attncc.flex.flex_attention(q, k, v, short)
    lengths[0] = 20  # the same function, new data
    second = attncc.flex.flex_attention(q, k, v, short)
    want = reference(
        q.double(), k.double(), v.double(), key_lengths(), data={"key_lengths": lengths.to(DEVICE)}
    )
    assert (second.double() - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert not torch.allclose(first[0], second[0])


OTHER = torch.ones(B, N, dtype=torch.bool)


@pytest.mark.parametrize(
    "mask_mod,message",
    [
        (
            lambda b, h, q_idx, kv_idx: q_idx < LENGTHS[b],
            r"per-batch length comparison = 'q_idx < LENGTHS\[b\]'",
        ),
        (
            lambda b, h, q_idx, kv_idx: kv_idx < LENGTHS[b] - 1,
            r"'kv_idx < LENGTHS\[b\] - 1' is out of range; allowed: kv_idx < lengths\[b\]",
        ),
        (lambda b, h, q_idx, kv_idx: kv_idx <= LENGTHS[b], r"'kv_idx <= LENGTHS\[b\]' is out of range"),
        (
            lambda b, h, q_idx, kv_idx: VALID[b, q_idx],
            r"VALID\[b, q_idx\]: uses b \(the batch index; attncc reads it only as",
        ),
        (
            lambda b, h, q_idx, kv_idx: ~VALID[b, kv_idx],
            r"~\(VALID\[b, kv_idx\]\): VALID\[b, kv_idx\] keeps keys given at call time; its complement has no pattern",
        ),
        (
            lambda b, h, q_idx, kv_idx: VALID[b, kv_idx] | OTHER[b, kv_idx],
            r"OTHER\[b, kv_idx\]: the tensor = 'key_mask' is out of range \(a second one is read\)",
        ),
    ],
    ids=["query-length", "shifted-length", "length-inclusive", "query-mask", "negated-mask", "two-masks"],
)
def test_other_uses_of_per_batch_data_are_refused_quoted(mask_mod, message):
    with pytest.raises(TraceError, match=message):
        attncc.flex.pattern(mask_mod, N)


def test_under_torch_compile_a_per_batch_mask_is_refused_with_the_way_out():
    """The compiled graph keeps the pattern's text, not tensors: the refusal says to pass the
    pattern and its data to attncc.attention (attncc.flex._text is what torch.compile calls)."""
    with pytest.raises(
        TraceError, match=r"reads per-batch data \(key_mask: Note \[Per-batch masks\]\) inside torch"
    ):
        attncc.flex._text(valid_causal, (N,), H)

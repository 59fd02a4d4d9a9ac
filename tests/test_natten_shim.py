"""attncc.natten (na1d/na2d/na3d in NATTEN's layout and arguments) against NATTEN's rule.

The reference is a float64 masked softmax whose mask comes from NATTEN's generalized neighborhood
rule, written here per axis as a window's first and last key (not from attncc.ir.mask): within the
query's dilation group, the window of its stride group's leader (the centre member, right of
centre for an even stride; the last member when causal), clamped to the group when not causal,
ending at the query when causal. Shapes are tiny and not multiples of any tile (the interpreter
is slow).

Note [Tolerances]: the fp32 kernels (IEEE fp32 dots) accumulate in fp32 over at most 64 keys of
head dim 16, which leaves errors near 4e-7 against float64; atol 1e-5 is twenty times that, and
one key too many or too few moves an output by about the key's weight (>= 1e-3 here) times a
unit-variance value, so no mask error hides under it. Gradients sum over more terms (a key of a
GQA group is seen by up to 2 x 54 queries; errors near 1e-6), hence 2e-5. bf16 keeps 8
significant bits: rounding the output costs up to 2^-9 relative, a GPU's bf16 probabilities about
as much again, so 2e-2 (dropping one key of a 12-key window moves the output by ~0.3).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import DEVICE

from attncc import natten
from attncc.errors import AttnccError, PatternError

FP32 = {"atol": 1e-5, "rtol": 0}  # Note [Tolerances]
GRAD = {"atol": 2e-5, "rtol": 0}
BF16 = {"atol": 2e-2, "rtol": 2e-2}


def natten_window(i: int, length: int, kernel: int, stride: int, dilation: int, causal: bool) -> list[int]:
    """The coordinates along one axis that query coordinate ``i`` attends to, in NATTEN."""
    members = list(range(i % dilation, length, dilation))  # i's dilation group, in order
    p, n = members.index(i), len(members)
    if causal:
        leader = min(p // stride * stride + stride - 1, n - 1)  # last member of p's stride group
        first, last = max(leader - kernel + 1, 0), p
    else:
        leader = min(p // stride * stride + stride // 2, n - 1)  # its centre (right of centre)
        first = min(max(leader - kernel // 2, 0), n - kernel)
        last = first + kernel - 1
    return members[first : last + 1]


def per_axis(value, rank: int) -> tuple:
    return tuple(value) if isinstance(value, tuple) else (value,) * rank


def natten_mask(shape: tuple[int, ...], kernel_size, stride=1, dilation=1, is_causal=False) -> torch.Tensor:
    """``[N, N]`` bool: flat (row-major) query n sees flat key m; a product of per-axis windows."""
    rank = len(shape)
    args = [per_axis(a, rank) for a in (kernel_size, stride, dilation, is_causal)]
    coords = list(itertools.product(*map(range, shape)))
    flat = {c: n for n, c in enumerate(coords)}
    keep = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for c in coords:
        windows = [natten_window(c[a], shape[a], *(arg[a] for arg in args)) for a in range(rank)]
        for key in itertools.product(*windows):
            keep[flat[c], flat[key]] = True
    return keep


def reference(q, k, v, keep, scale, extra=()):
    """float64 softmax of ``scale * q.k`` over kept keys, in NATTEN's layout: (out, lse). ``extra``:
    (keys, values) ``[B, n_extra, heads_kv, D]`` that every query also sees."""
    b, *spatial, h, d = q.shape

    def heads_first(t):  # [B, *spatial or n_extra, heads, D] -> [B, heads, N, D]
        return t.double().flatten(1, -3).transpose(1, 2)

    qf, kf, vf = heads_first(q), heads_first(k), heads_first(v)
    if extra:
        kf = torch.cat([kf, heads_first(extra[0])], dim=2)
        vf = torch.cat([vf, heads_first(extra[1])], dim=2)
        keep = torch.cat([keep, torch.ones(keep.shape[0], extra[0].shape[1], dtype=torch.bool)], dim=1)
    kf, vf = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (kf, vf))  # GQA: head h reads h // group
    scores = (qf @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep.to(scores.device), -math.inf)
    out = torch.softmax(scores, dim=-1) @ vf
    lse = torch.logsumexp(scores, dim=-1)
    return out.transpose(1, 2).reshape(b, *spatial, h, d), lse.transpose(1, 2).reshape(b, *spatial, h)


def tensors(shape, heads=2, heads_kv=2, batch=1, dtype=torch.float32, grad=False, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(batch, *shape, heads, 16, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(batch, *shape, heads_kv, 16, device=DEVICE, dtype=dtype) for _ in "kv")
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


FUNCTIONS = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}
CASES = [
    # 1-D, 37 tokens
    pytest.param((37,), 2, 2, {"kernel_size": 5}, id="1d-k5"),
    pytest.param((37,), 2, 2, {"kernel_size": 4, "dilation": 3}, id="1d-k4even-d3"),
    pytest.param(
        (37,), 4, 2, {"kernel_size": 6, "stride": 3, "dilation": 2, "is_causal": True}, id="1d-k6-s3-d2-causal-gqa"
    ),
    pytest.param((37,), 2, 2, {"kernel_size": 37, "is_causal": True}, id="1d-whole-axis-causal"),
    pytest.param(
        (37,), 2, 1, {"kernel_size": (7,), "stride": (2,), "dilation": (5,), "is_causal": (False,)},
        id="1d-1tuples-mqa",
    ),
    # 2-D, 6 x 9
    pytest.param(
        (6, 9), 2, 2, {"kernel_size": (3, 4), "dilation": 2, "stride": (1, 2), "is_causal": (True, False)},
        id="2d-k3x4-d2-s1x2-causal0",
    ),
    pytest.param((6, 9), 2, 1, {"kernel_size": 2, "is_causal": (False, True)}, id="2d-k2even-causal1-mqa"),
    pytest.param((6, 9), 4, 2, {"kernel_size": 3, "stride": 3, "scale": 0.3}, id="2d-k3-s3-blocked-scale"),
    # 3-D, 3 x 4 x 5
    pytest.param((3, 4, 5), 2, 2, {"kernel_size": (2, 3, 3), "is_causal": (True, False, False)}, id="3d-causal0"),
    pytest.param(
        (3, 4, 5), 2, 1,
        {"kernel_size": (3, 2, 4), "dilation": (1, 2, 1), "stride": (2, 1, 3), "is_causal": (False, True, True)},
        id="3d-d1x2x1-s2x1x3-causal12-mqa",
    ),
]  # fmt: skip


@pytest.mark.parametrize("shape,heads,heads_kv,kwargs", CASES)
def test_matches_natten_rule_fp32(shape, heads, heads_kv, kwargs):
    q, k, v = tensors(shape, heads, heads_kv, batch=2 if heads_kv == 1 else 1)
    out, lse = FUNCTIONS[len(shape)](q, k, v, **kwargs, return_lse=True)
    mask_args = {a: kwargs[a] for a in ("kernel_size", "stride", "dilation", "is_causal") if a in kwargs}
    want, want_lse = reference(q, k, v, natten_mask(shape, **mask_args), kwargs.get("scale", 16**-0.5))
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:-1]
    torch.testing.assert_close(out.double(), want, **FP32)
    torch.testing.assert_close(lse.double(), want_lse, **FP32)


def test_bf16():
    shape, kwargs = (6, 9), {"kernel_size": (3, 4), "dilation": (2, 1), "is_causal": (False, True)}
    q, k, v = tensors(shape, dtype=torch.bfloat16)
    out = natten.na2d(q, k, v, **kwargs)
    want, _ = reference(q, k, v, natten_mask(shape, **kwargs), 16**-0.5)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    torch.testing.assert_close(out.double(), want, **BF16)


def _grads_against_reference(call, tensors_in, reference_call):
    """Gradients of ``sum(out * g) + sum(lse * g_lse)`` through ``call`` and through the float64
    ``reference_call`` (the same tensors, as float64 leaves)."""
    out, lse = call(*tensors_in)
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * g).sum() + (lse * g_lse).sum(), tensors_in)
    leaves = [t.detach().double().requires_grad_() for t in tensors_in]
    want_out, want_lse = reference_call(*leaves)
    want = torch.autograd.grad((want_out * g.double()).sum() + (want_lse * g_lse.double()).sum(), leaves)
    return got, want


def test_backward_matches_reference():
    shape = (6, 9)
    kwargs = {"kernel_size": (3, 4), "dilation": (2, 1), "stride": (1, 2), "is_causal": (True, False)}
    keep = natten_mask(shape, **kwargs)
    got, want = _grads_against_reference(
        lambda q, k, v: natten.na2d(q, k, v, **kwargs, return_lse=True),
        tensors(shape, heads=4, heads_kv=2, grad=True),
        lambda q, k, v: reference(q, k, v, keep, 16**-0.5),
    )
    for name, a, b in zip("qkv", got, want):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a.double(), b, **GRAD, msg=lambda m, n=name: f"d{n}: {m}")


def test_additional_keys_forward_and_backward():
    """NATTEN's neighborhood cross-attention: one softmax over the neighborhood and 5 extra tokens
    (Note [Additional keys] in attncc.natten), with GQA, a causal axis and the log-sum-exp."""
    shape, kwargs = (
        (5, 7),
        {"kernel_size": (3, 4), "stride": (1, 2), "is_causal": (True, False), "scale": 0.3},
    )
    keep = natten_mask(shape, **{a: kwargs[a] for a in ("kernel_size", "stride", "is_causal")})
    q, k, v = tensors(shape, heads=4, heads_kv=2, batch=2, grad=True)
    extra_k, extra_v = (torch.randn(2, 5, 2, 16, device=DEVICE, requires_grad=True) for _ in "kv")
    got, want = _grads_against_reference(
        lambda q, k, v, ek, ev: natten.na2d(
            q, k, v, **kwargs, additional_keys=ek, additional_values=ev, return_lse=True
        ),
        (q, k, v, extra_k, extra_v),
        lambda q, k, v, ek, ev: reference(q, k, v, keep, 0.3, extra=(ek, ev)),
    )
    out, lse = natten.na2d(
        q, k, v, **kwargs, additional_keys=extra_k, additional_values=extra_v, return_lse=True
    )
    want_out, want_lse = reference(q, k, v, keep, 0.3, extra=(extra_k, extra_v))
    torch.testing.assert_close(out.double(), want_out, **FP32)
    torch.testing.assert_close(lse.double(), want_lse, **FP32)
    for name, a, b in zip(["q", "k", "v", "additional_keys", "additional_values"], got, want):
        torch.testing.assert_close(a.double(), b, **GRAD, msg=lambda m, n=name: f"d{n}: {m}")


def test_natten_default_settings_are_accepted():
    """Backend settings left at NATTEN's defaults ask for nothing (Note [NATTEN backend settings])."""
    q, k, v = tensors((37,))
    out = natten.na1d(
        q, k, v, 5, None, None, None, backend=None, q_tile_shape=None, run_persistent_kernel=True,
        torch_compile=False, backward_use_pt_reduction=False, attention_kwargs={},
    )  # fmt: skip
    want, _ = reference(q, k, v, natten_mask((37,), 5), 16**-0.5)
    torch.testing.assert_close(out.double(), want, **FP32)


def _t(*shape):
    return torch.randn(*shape, device=DEVICE)


Q1, Q2, Q3 = _t(1, 8, 2, 16), _t(1, 6, 9, 2, 16), _t(1, 3, 4, 5, 2, 16)
ERRORS = [
    # kernel_size, dilation, stride against the spatial extent
    pytest.param(
        lambda: natten.na1d(Q1, Q1, Q1, 9),
        PatternError,
        r"kernel_size = 9 is out of range.*1\.\.8 \(spatial axis 0",
        id="kernel-exceeds-axis",
    ),
    pytest.param(
        lambda: natten.na2d(Q2, Q2, Q2, (3, 10)),
        PatternError,
        r"kernel_size\[1\] = 10 .*allowed: 1\.\.9",
        id="kernel-exceeds-axis-2d",
    ),
    pytest.param(
        lambda: natten.na2d(Q2, Q2, Q2, (3, 4), dilation=(3, 1)),
        PatternError,
        r"dilation\[0\] = 3 .*dilation x kernel_size = 3 x 3 must fit spatial axis 0, 6 tokens.*allowed: 1\.\.2",
        id="dilation-x-kernel-exceeds-axis",
    ),
    pytest.param(
        lambda: natten.na3d(Q3, Q3, Q3, (2, 3, 3), stride=(1, 1, 4)),
        PatternError,
        r"stride\[2\] = 4 .*allowed: 1\.\.3 \(kernel_size\[2\]\)",
        id="stride-exceeds-kernel",
    ),
    # the per-axis arguments themselves
    pytest.param(
        lambda: natten.na2d(Q2, Q2, Q2, (3, 3, 3)),
        PatternError,
        r"kernel_size = \(3, 3, 3\) .*a tuple of 2",
        id="kernel-tuple-length",
    ),
    pytest.param(
        lambda: natten.na3d(Q3, Q3, Q3, 2, is_causal=(True, False)),
        PatternError,
        r"is_causal = .*a tuple of 3",
        id="causal-tuple-length",
    ),
    pytest.param(
        lambda: natten.na1d(Q1, Q1, Q1, 3, is_causal=1),
        PatternError,
        r"is_causal = 1 .*allowed: True or False",
        id="causal-not-bool",
    ),
    pytest.param(
        lambda: natten.na2d(Q2, Q2, Q2, (3, 0)),
        PatternError,
        r"kernel_size\[1\] = 0 .*an int >= 1",
        id="kernel-zero",
    ),
    pytest.param(
        lambda: natten.na1d(Q1, Q1, Q1, True),
        PatternError,
        r"kernel_size = True .*an int >= 1",
        id="kernel-bool",
    ),
    pytest.param(
        lambda: natten.na1d(Q1, Q1, Q1, 3.0),
        PatternError,
        r"kernel_size = 3\.0 .*an int >= 1",
        id="kernel-float",
    ),
    pytest.param(
        lambda: natten.na1d(Q1, Q1, Q1, 3, stride=-1),
        PatternError,
        r"stride = -1 .*an int >= 1",
        id="stride-negative",
    ),
    # ranks and shapes of the tensors
    pytest.param(
        lambda: natten.na2d(Q1, Q1, Q1, 3),
        AttnccError,
        r"query.dim\(\) = 4 .*allowed: 5 \(na2d takes \[batch, height, width, heads, head_dim\]; na1d 4-D, na3d 6-D",
        id="query-rank",
    ),
    pytest.param(
        lambda: natten.na1d(Q1, Q2, Q2, 3), AttnccError, r"key.dim\(\) = 5 .*allowed: 4", id="key-rank"
    ),
    pytest.param(
        lambda: natten.na1d([1.0], Q1, Q1, 3),
        AttnccError,
        r"query is a list; na1d takes torch.Tensors",
        id="query-not-tensor",
    ),
    pytest.param(
        lambda: natten.na1d(Q1, _t(1, 7, 2, 16), _t(1, 7, 2, 16), 3),
        AttnccError,
        r"key.shape = \(1, 7, 2, 16\) .*\[1, 8, heads_kv, 16\] with heads_kv dividing 2",
        id="key-spatial-mismatch",
    ),
    pytest.param(
        lambda: natten.na1d(_t(1, 8, 3, 16), Q1, Q1, 3),
        AttnccError,
        r"key.shape .*heads_kv dividing 3",
        id="heads-not-divisible",
    ),
    pytest.param(
        lambda: natten.na1d(Q1, Q1, _t(1, 8, 2, 32), 3),
        AttnccError,
        r"value.shape\[-1\] = 32 .*value's head dim equal to the query's; NATTEN allows another.*allowed: 16",
        id="value-head-dim",
    ),
    pytest.param(
        lambda: natten.na1d(Q1, Q1, _t(1, 8, 1, 16), 3),
        AttnccError,
        r"value.shape = \(1, 8, 1, 16\) .*key's shape",
        id="value-heads",
    ),
    # the extra tokens
    pytest.param(
        lambda: natten.na1d(Q1, Q1, Q1, 3, additional_keys=_t(1, 4, 2, 16)),
        AttnccError,
        r"additional_keys is a tensor but additional_values is None: pass both",
        id="extra-keys-alone",
    ),
    pytest.param(
        lambda: natten.na1d(Q1, Q1, Q1, 3, additional_values=_t(1, 4, 2, 16)),
        AttnccError,
        r"additional_values is a tensor but additional_keys is None",
        id="extra-values-alone",
    ),
    pytest.param(
        lambda: natten.na1d(Q1, Q1, Q1, 3, None, None, None, None, _t(1, 4, 1, 16), _t(1, 4, 1, 16)),
        AttnccError,
        r"additional_keys.shape = \(1, 4, 1, 16\) .*\[1, n_extra >= 1, 2, 16\]",
        id="extra-keys-heads",
    ),
    pytest.param(
        lambda: natten.na1d(
            Q1, Q1, Q1, 3, additional_keys=_t(1, 4, 2, 16), additional_values=_t(1, 5, 2, 16)
        ),
        AttnccError,
        r"additional_values.shape = \(1, 5, 2, 16\) .*\(1, 4, 2, 16\)",
        id="extra-values-length",
    ),
    # NATTEN's backend settings and unknown arguments
    pytest.param(
        lambda: natten.na1d(Q1, Q1, Q1, 3, backend="cutlass-fna"),
        AttnccError,
        r"backend = 'cutlass-fna' is a setting of NATTEN's own kernels.*NATTEN's default, None",
        id="natten-backend",
    ),
    pytest.param(
        lambda: natten.na2d(Q2, Q2, Q2, 3, q_tile_shape=(8, 8)),
        AttnccError,
        r"q_tile_shape = \(8, 8\) is a setting",
        id="natten-tile-shape",
    ),
    pytest.param(
        lambda: natten.na1d(Q1, Q1, Q1, 3, torch_compile=True),
        AttnccError,
        r"torch_compile = True .*default, False",
        id="natten-torch-compile",
    ),
    pytest.param(
        lambda: natten.na1d(Q1, Q1, Q1, 3, attention_kwargs={"backend": "flex-fmha"}),
        AttnccError,
        r"attention_kwargs = \{'backend': 'flex-fmha'\} is a setting",
        id="natten-attention-kwargs",
    ),
    pytest.param(
        lambda: natten.na1d(Q1, Q1, Q1, 3, rpb=Q1),
        AttnccError,
        r"na1d takes no argument 'rpb'",
        id="unknown-argument",
    ),
]


@pytest.mark.parametrize("call,error,match", ERRORS)
def test_errors_name_the_argument_and_range(call, error, match):
    with pytest.raises(error, match=match):
        call()

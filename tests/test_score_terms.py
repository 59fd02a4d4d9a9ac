"""Score terms (issue 17): softcap and ALiBi, forward and backward, against the float64 reference.

On the CPU the kernels run under TRITON_INTERPRET=1 (fp32 and fp16; the interpreter's bf16
dot is wrong, shared/TOOLCHAIN.md); with a GPU the same tests run there (``DEVICE``), bf16
too. Inputs are scaled by 2 so the scaled scores spread over a few units and a cap of 2-3
bends most of them (a cap far above every score would test nothing).

Tolerances. fp32: the dots run in IEEE fp32 and tanh is 2 sigmoid(2x) - 1 (Note [Score
terms] in the template), within ~1e-7 of the cap, so outputs and gradients differ from the
float64 reference by summation order and that: 1e-4 on O(1) values. fp16: the reference runs
on the same fp16-rounded inputs (so input rounding is not counted); the kernel rounds P (and
the score gradients) to fp16 before each dot (2^-11 relative) and stores its results in
fp16, and a row sums up to 64 such products, so errors reach a few 2^-11 of the largest
value: 3e-3 on outputs (convex combinations of O(1) values) and 1e-2 of the largest
magnitude on gradients. bf16 keeps 8 bits where fp16 keeps 11, so 8 times those: 2.4e-2 and
8e-2 (on a GPU, whose soft-cap is tanh.approx, 2^-11 relative: within either).
"""

import math

import pytest
import torch
import torch._dynamo.testing
from conftest import DEVICE

import attncc
from attncc import AttnccError
from attncc.errors import ParseError, PatternError
from attncc.ir import (
    Grid,
    Score,
    alibi,
    causal,
    dense,
    global_tokens,
    neighborhood,
    parse_score,
    sigmoid,
    sliding_window,
    softcap,
)
from attncc.lower.lowering import lower
from attncc.lower.render import render
from attncc.reference import attention as reference
from attncc.runtime.library import attention

H, H_KV, D = 4, 2, 16  # GQA: two query heads per KV head
LOW = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # bf16: GPU only (the docstring)
TOLERANCE = {torch.float16: (3e-3, 1e-2), torch.bfloat16: (2.4e-2, 8e-2)}  # outputs, gradients
SLOPES = (0.5, 0.25, 0.125, 0.0625)

PATTERNS = [
    ("causal-37", causal(), 37),
    ("na1d-w7-50", neighborhood(7), 50),
    ("na1d-w5-d2-45", neighborhood(5, dilation=2), 45),  # flat distances across dilation groups
    ("table-band-global-40", sliding_window(8, 0) | global_tokens([0]), 40),
    ("dense-64", dense(), 64),
]
SCORES = [
    ("softcap", softcap(2.0)),
    ("alibi", alibi(SLOPES)),
    ("softcap+alibi", softcap(3.0) + alibi(SLOPES)),
]


def _inputs(n: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(1, H, n, D, generator=gen)
    k = 2 * torch.randn(1, H_KV, n, D, generator=gen)
    v = torch.randn(1, H_KV, n, D, generator=gen)
    do = torch.randn(1, H, n, D, generator=gen)
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v, do))


def _run(fn, q, k, v, do, pattern, score, dtype):
    """(out, lse or None, dq, dk, dv) of ``fn`` with gradients by torch.autograd."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    lse = None
    if score.kind == "softmax":
        out, lse = fn(*leaves, pattern, score=score, return_lse=True)
        loss = (out.float() * do.float()).sum() + lse.float().sum()
    else:
        out = fn(*leaves, pattern, score=score)
        loss = (out.float() * do.float()).sum()
    grads = torch.autograd.grad(loss, leaves)
    return (out, lse, *grads)


def _check(pattern, n, score, dtype):
    q, k, v, do = _inputs(n, dtype)
    got = _run(attention, q, k, v, do, pattern, score, dtype)
    want = _run(reference, q, k, v, do, pattern, score, torch.float64)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        if b is None:
            continue
        err = (a.double() - b).abs().max().item()
        if dtype == torch.float32:
            tol = 1e-4
        else:
            out_tol, grad_tol = TOLERANCE[dtype]
            tol = out_tol if name in ("out", "lse") else grad_tol * b.abs().max().item()
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("score", [s for _, s in SCORES], ids=[i for i, _ in SCORES])
@pytest.mark.parametrize("pattern,n", [(p, n) for _, p, n in PATTERNS], ids=[i for i, _, _ in PATTERNS])
def test_fp32_forward_and_backward_match_the_reference(pattern, n, score):
    _check(pattern, n, score, torch.float32)


@pytest.mark.parametrize(
    "score",
    [sigmoid() + softcap(2.0), sigmoid() + alibi(SLOPES), sigmoid() + softcap(3.0) + alibi(SLOPES)],
    ids=["sigmoid+softcap", "sigmoid+alibi", "sigmoid+softcap+alibi"],
)
def test_sigmoid_with_terms_matches_the_reference(score):
    _check(neighborhood(7), 50, score, torch.float32)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("score", [s for _, s in SCORES], ids=[i for i, _ in SCORES])
def test_low_precision_forward_and_backward_match_the_reference(score, dtype):
    _check(causal(), 37, score, dtype)


def test_terms_change_the_result():
    """The terms reach the kernel: a capped or biased score differs from the plain one."""
    q, k, v, _ = _inputs(37, torch.float32)
    plain = attention(q, k, v, causal())
    for score in (softcap(2.0), alibi(SLOPES)):
        assert (attention(q, k, v, causal(), score=score) - plain).abs().max() > 1e-2


def test_string_and_object_forms_agree():
    q, k, v, _ = _inputs(37, torch.float32)
    score = softcap(3.0) + alibi(SLOPES)
    by_object = attention(q, k, v, causal(), score=score)
    by_text = attncc.attention(q, k, v, causal(), score=score.text)
    torch.testing.assert_close(by_object, by_text, atol=0, rtol=0)


def test_text_round_trips_and_composition_order_does_not_matter():
    score = sigmoid() + alibi((0.5, -0.25)) + softcap(30)
    assert score.text == "sigmoid + softcap(30.0) + alibi(0.5, -0.25)"
    assert parse_score(score.text) == score
    assert parse_score("softmax + softcap(30)+alibi(0.5,-0.25)") == softcap(30.0) + alibi((0.5, -0.25))
    assert parse_score("softmax") == Score() and Score().text == "softmax"
    assert parse_score("sigmoid").text == "sigmoid"


def test_plain_plans_spell_no_terms_and_terms_enter_the_plan():
    """Plain kernels carry no term code; each term changes the plan (its cache key) and source,
    and the slopes do not: they are a kernel input (new values never recompile)."""
    grid = Grid((37,))
    plain = lower(causal(), grid, D, "float32")
    source = render(plain)
    assert "SOFTCAP" not in source and "SLOPES" not in source and "tl.abs" not in source
    capped = lower(causal(), grid, D, "float32", score="softcap(2.0)")
    biased = lower(causal(), grid, D, "float32", score=alibi(SLOPES))
    assert len({plain, capped, biased}) == 3
    assert lower(causal(), grid, D, "float32", score=alibi(SLOPES[::-1])) == biased
    assert "SOFTCAP" in render(capped) and "SLOPES" in render(biased)


def test_torch_compile_fullgraph_with_terms():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    score = softcap(3.0) + alibi(SLOPES)

    @torch.compile(fullgraph=True, backend=counter)
    def f(q, k, v):
        return attncc.attention(q, k, v, causal(), score=score)

    q, k, v, _ = _inputs(37, torch.float32)
    q.requires_grad_()
    out = f(q, k, v)
    torch.testing.assert_close(out, attention(q, k, v, causal(), score=score), atol=0, rtol=0)
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: softcap(0.0), "softcap = 0.0"),
        (lambda: softcap(-1.0), "softcap = -1.0"),
        (lambda: softcap(math.inf), "softcap = inf"),
        (lambda: softcap(math.nan), "softcap = nan"),
        (lambda: softcap("3"), "softcap = '3'"),
        (lambda: alibi(()), "alibi slopes = ()"),
        (lambda: alibi((0.5, math.inf)), "alibi slope = inf"),
        (lambda: alibi(0.5), "alibi slopes = 0.5"),
        (lambda: softcap(2.0) + softcap(3.0), "softcap is given twice"),
        (lambda: Score(kind="relu"), "score = 'relu'"),
    ],
    ids=["c=0", "c<0", "c=inf", "c=nan", "c-str", "no-slopes", "slope-inf", "slopes-scalar", "twice", "kind"],
)
def test_bad_terms_are_refused(make, field):
    with pytest.raises(PatternError, match=field.replace("(", r"\(").replace(")", r"\)")):
        make()


@pytest.mark.parametrize(
    "text",
    [
        "softcap(1, 2)", "tanh(3)", "softcap(c=3)", "alibi(grad=2)", "softcap(inf)", "+", "dropout(0.1)",
        "rel_pos_bias(2.5)", "key_bias(3)", "softcap(2, grad=True)", "bias(distance='flat')",
    ],
)  # fmt: skip
def test_bad_score_text_is_refused(text):
    with pytest.raises(ParseError, match="score = "):
        parse_score(text)


def test_slopes_must_match_the_query_heads():
    q, k, v, _ = _inputs(37, torch.float32)
    for fn in (attention, reference):
        with pytest.raises(
            AttnccError, match=r"alibi slopes = \(0.5, 0.25\) .* 4 slopes, one per query head"
        ):
            fn(q, k, v, causal(), score=alibi((0.5, 0.25)))


def test_sigmoid_with_terms_has_no_lse():
    q, k, v, _ = _inputs(37, torch.float32)
    with pytest.raises(AttnccError, match="return_lse = True"):
        attention(q, k, v, causal(), score=sigmoid() + softcap(2.0), return_lse=True)


def test_score_of_another_type_is_refused():
    q, k, v, _ = _inputs(37, torch.float32)
    with pytest.raises(PatternError, match="score = 3 is not a Score"):
        attention(q, k, v, causal(), score=3)

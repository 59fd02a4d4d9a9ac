"""Score terms with tensor data (issue 17): temperature, alibi slopes, relative position tables,
query/key biases and a dense bias, forward and backward (q, k, v and every term tensor) against
the float64 reference, and the refusals.

Inputs are scaled by 2 (so a cap bends the scores); the term tensors are O(1). Tolerances, as
in test_score_terms.py: fp32 1e-4 of the largest magnitude of each compared tensor (the dots
run in IEEE fp32; the term gradients are sums of up to a few thousand fp32 products); fp16:
the reference runs on the same fp16-rounded inputs, the kernel rounds P and the score
gradients to fp16 before each dot (2^-11 relative) and stores in fp16, so 3e-3 of the largest
magnitude (at least 1) on outputs and 1e-2 on gradients (the term gradients are float32 sums
of those rounded score gradients); bf16 (on a GPU: ``DEVICE``, where every test here runs when
there is one) keeps 8 bits where fp16 keeps 11: 2.4e-2 and 8e-2.
"""

import math

import pytest
import torch
import torch._dynamo.testing
from conftest import DEVICE

import attncc
from attncc import AttnccError
from attncc.errors import PatternError
from attncc.ir import (
    Grid,
    alibi,
    bias,
    causal,
    dense,
    global_tokens,
    key_bias,
    neighborhood,
    parse_score,
    query_bias,
    rel_pos_bias,
    sigmoid,
    sliding_window,
    softcap,
    temperature,
)
from attncc.lower.lowering import lower
from attncc.reference import attention as reference

H, H_KV, D = 4, 2, 16  # GQA: two query heads per KV head
LOW = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # bf16: GPU only (the docstring)
TOLERANCE = {torch.float16: (3e-3, 1e-2), torch.bfloat16: (2.4e-2, 8e-2)}  # outputs, gradients


def _run(fn, pattern, grid, make, dtype, lse=True, seed=0):
    """(out, lse?, dq, dk, dv, d(term tensors)...) of ``fn`` by autograd, float64 for the reference."""
    n = math.prod(grid)
    gen = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(1, H, n, D, generator=gen)
    k = 2 * torch.randn(1, H_KV, n, D, generator=gen)
    v = torch.randn(1, H_KV, n, D, generator=gen)
    do = torch.randn(1, H, n, D, generator=gen)
    tensors, build = make(gen, n)
    work = torch.float64 if fn is reference else dtype
    leaves = [t.to(DEVICE, dtype).to(work).requires_grad_() for t in (q, k, v)]
    inputs = [t.to(DEVICE, work).requires_grad_() for t in tensors]
    score = build(*inputs)
    if lse:
        out, l_ = fn(*leaves, pattern, grid=grid, score_mod=score, return_lse=True)
        loss = (out.double() * do.double()).sum() + l_.double().sum()
        results = [out, l_]
    else:
        out = fn(*leaves, pattern, grid=grid, score_mod=score)
        loss = (out.double() * do.double()).sum()
        results = [out]
    return results + list(torch.autograd.grad(loss, leaves + inputs))


def _check(pattern, grid, make, dtype=torch.float32, lse=True):
    got = _run(attncc.attention, pattern, grid, make, dtype, lse)
    want = _run(reference, pattern, grid, make, torch.float64, lse)
    names = (["out", "lse"] if lse else ["out"]) + ["dq", "dk", "dv"] + [f"d(term {i})" for i in range(9)]
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        err = (a.double() - b).abs().max().item()
        top = max(b.abs().max().item(), 1.0)
        if dtype == torch.float32:
            tol = 1e-4 * top
        else:
            tol = TOLERANCE[dtype][0 if name in ("out", "lse") else 1] * top
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


def _temperature(gen, n):
    return [torch.rand(H, generator=gen) + 0.5], temperature


def _slopes(distance="flat", per_axis=0):
    def make(gen, n):
        shape = (H, per_axis) if per_axis else (H,)
        return [torch.rand(shape, generator=gen)], lambda t: alibi(t, distance=distance)

    return make


def _table(*sizes, heads=H):
    def make(gen, n):
        return [torch.randn(heads, *sizes, generator=gen)], rel_pos_bias

    return make


def _biases(q_shape=None, k_shape=None):
    def make(gen, n):
        shapes = [s for s in (q_shape, k_shape) if s]
        tensors = [torch.randn(*(n if d == "N" else d for d in s), generator=gen) for s in shapes]

        def build(*ts):
            it = iter(ts)
            parts = ([query_bias(next(it))] if q_shape else []) + ([key_bias(next(it))] if k_shape else [])
            return sum(parts[1:], parts[0])

        return tensors, build

    return make


def _dense_bias(shape):
    def make(gen, n):
        return [torch.randn(*(n if d == "N" else d for d in shape), generator=gen)], bias

    return make


CASES = [
    ("temperature-causal", causal(), (37,), _temperature),
    ("alibi-flat-causal", causal(), (37,), _slopes()),
    ("alibi-signed-window", sliding_window(5, 3), (37,), _slopes("signed")),
    ("alibi-axes-na2d", neighborhood((3, 5)), (7, 11), _slopes("axes", per_axis=2)),
    ("alibi-axes-one-slope-dilated", neighborhood((3, 5), dilation=(2, 1)), (7, 11), _slopes("axes")),
    ("rpb-na1d-borders", neighborhood(7), (37,), _table(13)),
    ("rpb-na2d-dilated-borders", neighborhood((3, 5), dilation=(2, 1)), (7, 11), _table(5, 9)),
    ("rpb-na2d-shared-by-heads", neighborhood((3, 3)), (6, 9), _table(5, 5, heads=1)),
    ("rpb-na2d-causal-axis", neighborhood((3, 5), causal=(True, False)), (6, 9), _table(5, 9)),
    ("rpb-na3d", neighborhood((3, 3, 5)), (4, 5, 7), _table(5, 5, 9)),
    ("rpb-bigger-than-reach", neighborhood(5), (30,), _table(15)),
    (
        "query-key-bias-table-plan",
        sliding_window(8, 0) | global_tokens([0]),
        (40,),
        _biases((1, H, "N"), (1, 1, "N")),
    ),
    ("key-bias-per-batch", neighborhood(7), (37,), _biases(None, (1, H, "N"))),
    ("dense-bias-shared", dense(), (33,), _dense_bias((1, 1, "N", "N"))),
    ("dense-bias-per-head", causal(), (33,), _dense_bias((1, H, "N", "N"))),
]


@pytest.mark.parametrize("pattern,grid,make", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fp32_terms_and_their_gradients_match_the_reference(pattern, grid, make):
    _check(pattern, grid, make)


COMBINED = [
    (
        "causal+alibi+softcap",
        causal(),
        (37,),
        lambda g, n: ([torch.rand(H, generator=g)], lambda t: softcap(3.0) + alibi(t)),
    ),
    (
        "na2d-dilated+rpb+temperature+softcap",
        neighborhood((3, 5), dilation=(2, 1)),
        (7, 11),
        lambda g, n: (
            [torch.randn(H, 5, 9, generator=g), torch.rand(H, generator=g) + 0.5],
            lambda tab, t: rel_pos_bias(tab) + temperature(t) + softcap(2.5),
        ),
    ),
    (
        "every-term",
        neighborhood(7),
        (37,),
        lambda g, n: (
            [
                torch.rand(H, generator=g) + 0.5,
                torch.rand(H, generator=g),
                torch.randn(1, 13, generator=g),
                torch.randn(1, H, n, generator=g),
                torch.randn(1, 1, n, generator=g),
                torch.randn(1, 1, n, n, generator=g),
            ],
            lambda t, s, tab, qb, kb, b: (
                temperature(t)
                + softcap(3.0)
                + alibi(s)
                + rel_pos_bias(tab)
                + query_bias(qb)
                + key_bias(kb)
                + bias(b)
            ),
        ),
    ),
]


@pytest.mark.parametrize("pattern,grid,make", [c[1:] for c in COMBINED], ids=[c[0] for c in COMBINED])
def test_combined_terms_match_the_reference(pattern, grid, make):
    _check(pattern, grid, make)


@pytest.mark.parametrize(
    "pattern,grid,make",
    [(neighborhood((3, 5), dilation=(2, 1)), (7, 11), _table(5, 9)), (causal(), (37,), _temperature),
     (sliding_window(8, 0) | global_tokens([0]), (40,), _biases((1, H, "N"), (1, 1, "N")))],
    ids=["rpb-na2d-dilated", "temperature", "biases"],
)  # fmt: skip
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_terms_match_the_reference(pattern, grid, make, dtype):
    _check(pattern, grid, make, dtype)


def test_sigmoid_with_a_bias_and_a_table():
    make = lambda g, n: (  # noqa: E731
        [torch.randn(H, 13, generator=g), torch.randn(1, H, n, n, generator=g)],
        lambda tab, b: sigmoid() + rel_pos_bias(tab) + bias(b),
    )
    _check(neighborhood(7), (37,), make, lse=False)


def test_gradients_only_for_tensors_that_require_them():
    """A frozen table costs no gradient work: the form marks only what requires grad."""
    q = torch.randn(1, H, 37, D, device=DEVICE)
    table = torch.randn(H, 13, device=DEVICE)
    form = parse_score(attncc.runtime.library._form_text(rel_pos_bias(table).form.text, (), False))
    assert form.grads == ()
    learned = table.clone().requires_grad_()
    q.requires_grad_()
    out = attncc.attention(q, q, q, neighborhood(7), score_mod=rel_pos_bias(table))
    out.sum().backward()
    assert q.grad is not None and table.grad is None and learned.grad is None


def test_new_term_values_reuse_the_kernel_under_torch_compile():
    """Learned tensors are kernel inputs: a training step's new values never recompile, and the
    gradient reaches the table through the compiled graph."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    pattern = neighborhood(7)

    @torch.compile(fullgraph=True, backend=counter)
    def step(q, table, kb):
        out = attncc.attention(q, q, q, pattern, score_mod=rel_pos_bias(table) + key_bias(kb))
        return out.sum()

    q = torch.randn(1, H, 37, D, device=DEVICE)
    table = torch.randn(H, 13, device=DEVICE, requires_grad=True)
    kb = torch.randn(1, 1, 37, device=DEVICE)
    for i in range(3):
        loss = step(q, table, kb + i)
        loss.backward()
        with torch.no_grad():
            table -= 0.1 * table.grad
        table.grad = None
    assert counter.frame_count == 1
    eager = attncc.attention(q, q, q, neighborhood(7), score_mod=rel_pos_bias(table) + key_bias(kb + 3))
    compiled = step(q, table, kb + 3)
    torch.testing.assert_close(compiled, eager.sum(), atol=1e-4, rtol=1e-5)


def test_term_text_round_trips_and_declares_terms():
    score = softcap(30.0) + rel_pos_bias((13, 13)) + key_bias() + alibi(distance="axes") + temperature()
    assert (
        score.text == "softcap(30.0) + temperature + alibi(distance='axes') + rel_pos_bias(13, 13) + key_bias"
    )
    assert parse_score(score.text) == score
    assert parse_score("rel_pos_bias(5, grad=True) + dropout").grads == ("rel_pos_bias",)
    table = torch.zeros(2, 5, 9)
    assert rel_pos_bias(table).text == "rel_pos_bias(5, 9)"
    assert rel_pos_bias(table) == rel_pos_bias(table) and rel_pos_bias(table) != rel_pos_bias(table.clone())


def _call(score, grid=(37,), b=1, dtype=torch.float32):
    q = torch.randn(b, H, math.prod(grid), D, dtype=dtype, device=DEVICE)
    return attncc.attention(q, q[:, :H_KV], q[:, :H_KV], neighborhood(7), grid=grid, score_mod=score)


@pytest.mark.parametrize(
    "score,match",
    [
        (lambda: temperature(torch.ones(3, device=DEVICE)), r"temperature shape = \(3,\) .*\(4,\) or \(1,\)"),
        (lambda: alibi(torch.ones(4, 2, device=DEVICE)), r"alibi slopes shape = \(4, 2\) .*\(4,\)"),
        (lambda: rel_pos_bias(torch.ones(4, 13, 13, device=DEVICE)), r"rel_pos_bias sizes = \(13, 13\) .*1 odd sizes"),
        (lambda: rel_pos_bias(torch.ones(4, 9, device=DEVICE)), r"rel_pos_bias sizes = \(9,\) .*at least \(13,\)"),
        (lambda: rel_pos_bias(torch.ones(3, 13, device=DEVICE)), r"rel_pos_bias shape = \(3, 13\) .*\(4 or 1, 13\)"),
        (lambda: key_bias(torch.ones(1, H, 36, device=DEVICE)), r"key_bias shape = \(1, 4, 36\) .*\(1 or 1, 4 or 1, 37\)"),
        (lambda: query_bias(torch.ones(2, H, 37, device=DEVICE)), r"query_bias shape = \(2, 4, 37\)"),
        (lambda: bias(torch.ones(1, 1, 37, device=DEVICE)), r"bias shape = \(1, 1, 37\) .*37, 37"),
        (lambda: key_bias(torch.ones(1, 1, 37, dtype=torch.int32, device=DEVICE)), "key_bias = torch.int32 is not a float16"),
        (lambda: key_bias(), r"key_bias = None .*no tensor"),
        (lambda: key_bias([1.0]), r"key_bias = \[1.0\] is not a float tensor"),
    ],
    ids=["temp-heads", "slopes-2d-flat", "table-rank", "table-small", "table-heads", "kb-n", "qb-batch",
         "bias-rank", "kb-int", "kb-declared", "kb-list"],
)  # fmt: skip
def test_bad_term_tensors_are_refused(score, match):
    with pytest.raises((AttnccError, PatternError), match=match):
        _call(score())


def test_a_table_of_a_dilated_table_plan_is_refused():
    refused = r"rel_pos_bias pattern = .* \(the table counts offsets in units of the dilation"
    with pytest.raises(PatternError, match=refused):
        lower(
            neighborhood(3, dilation=2) | global_tokens([0]),
            Grid((20,)),
            D,
            "float32",
            score="rel_pos_bias(39)",
        )


def test_tables_too_large_for_the_gradient_are_refused():
    with pytest.raises(PatternError, match=r"rel_pos_bias entries = 4225 .*1..4096"):
        rel_pos_bias((65, 65))


def test_opcheck_with_term_tensors_and_dropout():
    """The ops' schemas, fakes and autograd registration hold with term tensors and a seed."""
    q = torch.randn(1, 2, 16, D, requires_grad=True)
    k, v = (torch.randn(1, 1, 16, D, requires_grad=True) for _ in "kv")
    table = torch.randn(2, 5, requires_grad=True)
    kb = torch.randn(1, 2, 16, requires_grad=True)
    seed = torch.tensor([5], dtype=torch.int64)
    text = "rel_pos_bias(5, grad=True) + key_bias(grad=True) + dropout"
    args = (q, k, v, "neighborhood(window=3)", [16], 0.25, text, 0.0)
    kwargs = dict(rel_pos_bias=table, key_bias=kb, seed=seed, dropout_p=0.1)
    torch.library.opcheck(torch.ops.attncc.fwd_opaque.default, args, kwargs)
    o, lse = torch.ops.attncc.fwd_opaque(*args, **kwargs)
    grads = (torch.randn_like(o), torch.randn_like(lse))
    bwd_args = (q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), *grads, *args[3:])
    frozen = {name: t.detach() if isinstance(t, torch.Tensor) else t for name, t in kwargs.items()}
    torch.library.opcheck(torch.ops.attncc.bwd_opaque.default, bwd_args, frozen)

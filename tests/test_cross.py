"""Cross-attention (issue 16 part 3): q on a grid of its own over k's (``q_grid=``), in the oracle
(attncc.ir.mask.cross_mask), the kernels (Note [Cross-attention] in attncc.runtime.cross) and
attncc.nn.CrossAttention.

The oracle's tests compare it with masked attention written out here from the definitions. The
kernels' tests compare forward and backward (out, lse, dq, dk, dv and the score terms'
gradients, the log-sum-exp's gradient included) with the float64 oracle: fp32 within 1e-4 of
the largest magnitude (a few ulps of float32 accumulations over at most a few dozen keys), fp16
within 1e-2 (its 11-bit mantissa: about 5e-4 per rounding of P and dS, summed over the keys).
Queries that see no key must give zero rows and a log-sum-exp of -inf, as the oracle does.
"""

import math
import re

import pytest
import torch
import torch._dynamo.testing
from conftest import DEVICE, REPO

import attncc
from attncc import AttnccError
from attncc.errors import PatternError
from attncc.ir import (
    Grid,
    alibi,
    bias,
    causal,
    dense,
    documents,
    key_bias,
    key_lengths,
    key_range,
    neighborhood,
    per_head,
    query_bias,
    sliding_window,
    temperature,
)
from attncc.ir.mask import cross_mask
from attncc.nn import CrossAttention
from attncc.reference import attention as reference
from attncc.runtime.cross import plan

H, H_KV, D = 4, 2, 16
# Three images of 4, 3 and 5 keys (12 in all); the texts of images 0 and 2 (image 1 has none),
# and a text token of an image with no keys (id 7): it sees nothing.
IMAGE_OF_KEY = torch.tensor([[0] * 4 + [1] * 3 + [2] * 5])
IMAGE_OF_TEXT = torch.tensor([[0, 0, 0, 2, 2, 7, 2, 2, 0], [2, 2, 2, 2, 2, 0, 0, 0, 0]])


def _naive(q, k, v, keep, scale=None):
    """softmax(q k^T) v over the kept pairs, from the definition ([B, H, Nq, D] and [B, H, Nk, D])."""
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    s = (q @ k.transpose(-1, -2)) * (scale or 1 / math.sqrt(q.shape[-1]))
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0)[..., None])
    return p @ v, lse


def _qkv(b, n_q, n_k, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, H, n_q, D, generator=gen, dtype=dtype),
            torch.randn(b, H_KV, n_k, D, generator=gen, dtype=dtype),
            torch.randn(b, H_KV, n_k, D, generator=gen, dtype=dtype))  # fmt: skip


def test_the_oracle_is_masked_attention_of_the_two_sequences():
    q, k, v = _qkv(2, 9, 12)
    data = {"documents": IMAGE_OF_KEY, "query_documents": IMAGE_OF_TEXT, "key_lengths": torch.tensor([12, 6])}
    out, lse = reference(q, k, v, documents() & key_lengths(), q_grid=9, data=data, return_lse=True)
    keep = (IMAGE_OF_TEXT[:, :, None] == IMAGE_OF_KEY[:, None, :]) & (
        torch.arange(12) < data["key_lengths"][:, None, None]
    )
    want, want_lse = _naive(q, k, v, keep[:, None])
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=0)
    assert (out[0, :, 5] == 0).all() and torch.isinf(lse[0, :, 5]).all()  # text of image 7: no keys
    dense_out = reference(q, k, v, dense(), q_grid=(3, 3))
    torch.testing.assert_close(dense_out, _naive(q, k, v, torch.ones(1, 1, 9, 12, dtype=torch.bool))[0])


def test_the_cross_mask_per_head_and_key_range():
    pattern = per_head([dense(), key_range(0, lo=2, hi=4)] * 2)
    keep = cross_mask(pattern, Grid((3,)), Grid((6,)), heads=H)
    assert keep.shape == (1, H, 3, 6)
    assert keep[0, 0].all() and keep[0, 1, :, 2:5].all() and not keep[0, 1, :, [0, 1, 5]].any()


def _check(pattern, q_shape, kv_shape, q_grid, data=None, terms=(), make=None, dtype=torch.float32,
           grad=True, layout=None):  # fmt: skip
    """The kernels against the float64 oracle, forward and (with ``grad``) backward."""
    gen = torch.Generator().manual_seed(1)
    q, do = torch.randn(q_shape, generator=gen), torch.randn(q_shape, generator=gen)
    k, v = torch.randn(kv_shape, generator=gen), torch.randn(kv_shape, generator=gen)
    terms = [torch.randn(shape, generator=gen) for shape in terms]
    data = None if data is None else {key: t.to(DEVICE) for key, t in data.items()}

    def run(fn, work):
        leaves = [t.to(DEVICE, work).requires_grad_(grad) for t in (q, k, v, *terms)]
        score = None if make is None else make(*leaves[3:])
        out, lse = fn(*leaves[:3], pattern, q_grid=q_grid, score_mod=score, data=data, return_lse=True,
                      layout=layout)  # fmt: skip
        finite = torch.isfinite(lse)
        found = [out, lse.masked_fill(~finite, 0), (~finite).float()]
        if not grad:
            return found
        loss = (out.double() * do.to(DEVICE).double()).sum() + lse.double()[finite].sum()
        return [*found, *torch.autograd.grad(loss, leaves)]

    got, want = run(attncc.attention, dtype), run(reference, torch.float64)
    names = ["out", "lse", "lse -inf", "dq", "dk", "dv", *(f"term {i}" for i in range(len(terms)))]
    for name, a, w in zip(names, got, want):
        tol = (1e-4 if dtype == torch.float32 else 1e-2) * max(1.0, w.abs().max().item())
        assert a.shape == w.shape and (a.double() - w).abs().max().item() <= tol, name
    return want


@pytest.mark.parametrize(
    "n_q,n_k", [(13, 6), (5, 9), (1, 9), (7, 1), (6, 6)], ids=["Nq>Nk", "Nq<Nk", "Nq=1", "Nk=1", "Nq=Nk"]
)
def test_dense(n_q, n_k):
    _check(dense(), (2, H, n_q, D), (2, H_KV, n_k, D), n_q)


def test_key_lengths_per_batch_with_none():
    """Batch element 1 has no keys: zero rows and -inf (the oracle's Note [Queries with no keys])."""
    want = _check(
        key_lengths(), (2, H, 11, D), (2, H_KV, 7, D), 11, data={"key_lengths": torch.tensor([4, 0])}
    )
    assert (want[0][1] == 0).all() and (want[2][1] == 1).all() and not want[2][0].any()


def test_text_tokens_see_the_keys_of_their_image():
    """Interval masks: each text token sees its image's keys (image 1 has no text; id 7 no image)."""
    want = _check(documents(), (2, H, 9, D), (2, H_KV, 12, D), 9,
                  data={"documents": IMAGE_OF_KEY, "query_documents": IMAGE_OF_TEXT})  # fmt: skip
    assert (want[2][0, :, 5] == 1).all() and want[2].sum() == H


def test_an_image_over_its_texts_with_key_lengths():
    """The other way (Nq > Nk): image tokens see the text of their image, cut per batch element."""
    image_of_text = torch.tensor([[0, 0, 1, 1, 1, 2, 2]])
    data = {"documents": image_of_text, "query_documents": IMAGE_OF_KEY, "key_lengths": torch.tensor([7, 4])}
    _check(documents() & key_lengths(), (2, H, 12, D), (2, H_KV, 7, D), 12, data=data)


def test_an_image_grid_over_a_text_in_the_spatial_layout():
    """q [B, 3, 5, H, D] on a 3x5 image, k and v a 1-D text [B, 7, H_kv, D]."""
    _check(key_lengths(), (2, 3, 5, H, D), (2, 7, H_KV, D), (3, 5), data={"key_lengths": torch.tensor([7, 2])},
           layout="spatial")  # fmt: skip


def test_score_terms_and_their_gradients():
    """Per-query and per-key biases keep their own lengths (a key's is padded with the zero keys)."""
    _check(
        dense(), (2, H, 10, D), (2, H_KV, 6, D), 10, terms=[(H,), (1, H, 10), (2, 1, 6), (1, H, 10, 6)],
        make=lambda t, qb, kb, b: temperature(t) + query_bias(qb) + key_bias(kb) + bias(b),
    )  # fmt: skip


def test_sigmoid_over_the_keys_length_and_out():
    """Sigmoid attention's default bias is -ln(Nk), k's length (not the embedded grid's); ``out``
    receives the result in q's layout; gradients as the oracle's."""
    gen = torch.Generator().manual_seed(3)
    shapes = ((2, 3, 4, H, D), (2, 5, H_KV, D), (2, 5, H_KV, D))
    q, k, v = (torch.randn(shape, generator=gen) for shape in shapes)

    def run(fn, work, out=None):
        leaves = [t.to(DEVICE, work).requires_grad_() for t in (q, k, v)]
        found = fn(*leaves, dense(), q_grid=(3, 4), score="sigmoid", **({} if out is None else {"out": out}))
        return [found, *torch.autograd.grad(found.square().sum(), leaves)]

    out = torch.empty(shapes[0], device=DEVICE)
    got, want = run(attncc.attention, torch.float32, out), run(reference, torch.float64)
    assert torch.equal(out, got[0].detach())
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == w.shape and (a.double() - w).abs().max() <= 1e-4 * w.abs().max(), name


def test_fp16():
    _check(documents(), (2, H, 9, D), (2, H_KV, 12, D), 9, dtype=torch.float16,
           data={"documents": IMAGE_OF_KEY, "query_documents": IMAGE_OF_TEXT})  # fmt: skip


@pytest.mark.parametrize("n_q", [1, 5], ids=["one-query", "five-queries"])
def test_forward_steps(n_q):
    """Forward only, a few queries over a longer k: the decode kernels may take the embedded problem."""
    data = {
        "documents": IMAGE_OF_KEY,
        "query_documents": IMAGE_OF_TEXT[:, :n_q],
        "key_lengths": torch.tensor([9, 3]),
    }
    _check(documents() & key_lengths(), (2, H, n_q, D), (2, H_KV, 12, D), n_q, data=data, grad=False)


def test_the_embedding():
    """Note [Cross-attention]: the keys' own tensors for Nq <= Nk without ids; else zero keys cut
    by a key range, and with ids the queries after the keys."""
    text, e = plan(dense(), (5,), (9,), H)
    assert (text, e.length, e.offset, e.padding) == ("dense()", 9, 0, 0)
    text, e = plan(dense(), (13,), (6,), H)
    assert (e.length, e.offset, e.padding) == (13, 0, 7) and text == "dense() & key_range(axis=0, hi=5)"
    _, e = plan(documents(), (9,), (12,), H)
    assert (e.length, e.offset, e.padding) == (21, 12, 9)


@pytest.mark.parametrize(
    "pattern",
    [causal(), sliding_window(3), neighborhood(3), dense() | causal(), per_head([dense(), causal()] * 2)],
    ids=["causal", "window", "neighborhood", "in-a-union", "in-a-head"],
)
def test_geometric_patterns_across_grids_are_refused(pattern):
    q, k, v = (t.float().to(DEVICE) for t in _qkv(1, 5, 9))
    with pytest.raises(
        PatternError, match=r"pattern = '.*' is out of range \(q_grid \(5,\) is not the keys'"
    ):
        attncc.attention(q, k, v, pattern, q_grid=5)
    with pytest.raises(PatternError, match=r"pattern = "):
        reference(q, k, v, pattern, q_grid=5)


def test_other_refusals():
    q, k, v = (t.float().to(DEVICE) for t in _qkv(1, 5, 9))
    with pytest.raises(PatternError, match=r"score = 'alibi' is out of range"):
        attncc.attention(q, k, v, dense(), q_grid=5, score_mod=alibi([0.5] * H))
    with pytest.raises(AttnccError, match=r"q_offset = 2 is out of range"):
        attncc.attention(q, k, v, dense(), q_grid=5, q_offset=2)
    with pytest.raises(AttnccError, match=r"score_mod = 'function' is not score terms"):
        attncc.attention(q, k, v, dense(), q_grid=5, score_mod=lambda score, b, h, q, k: score)
    with pytest.raises(AttnccError, match=r"q shape = .* is out of range"):
        attncc.attention(q, k, v, dense(), q_grid=6)
    ids = torch.zeros(1, 9, dtype=torch.int32, device=DEVICE)
    with pytest.raises(AttnccError, match=r"query_documents'\] is missing"):
        attncc.attention(q, k, v, documents(), q_grid=5, data={"documents": ids})
    with pytest.raises(AttnccError, match=r"query_documents shape"):
        attncc.attention(q, k, v, documents(), q_grid=5, data={"documents": ids, "query_documents": ids})
    with pytest.raises(AttnccError, match=r"key_bias shape"):
        attncc.attention(q, k, v, dense(), q_grid=5, score_mod=key_bias(torch.zeros(1, 1, 5, device=DEVICE)))
    image = torch.randn(1, 3, 3, H_KV, D, device=DEVICE)
    with pytest.raises(PatternError, match=r"key_range takes a 1-D k"):
        attncc.attention(q.transpose(1, 2), image, image, key_range(0, hi=1), q_grid=5, layout="spatial")


def test_the_module_with_a_backward_step():
    """CrossAttention's output and parameter gradients are the oracle's on its projections."""
    torch.manual_seed(0)
    module = CrossAttention(32, H, (2, 3), pattern=documents(), context_dim=24, kv_heads=H_KV).to(DEVICE)
    x, context = torch.randn(2, 2, 3, 32, device=DEVICE), torch.randn(2, 5, 24, device=DEVICE)
    data = {
        "documents": torch.tensor([[0, 0, 1, 1, 1]]),
        "query_documents": torch.tensor([[0, 1, 1, 0, 1, 9]]),
    }
    data = {key: t.to(DEVICE) for key, t in data.items()}
    out = module(x, context, data=data)
    out.square().sum().backward()
    got = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    q = module.q(x).unflatten(-1, (H, D // 2))
    k, v = module.kv(context).unflatten(-1, (2, H_KV, D // 2)).unbind(-3)
    want = module.proj(
        reference(q, k, v, documents(), q_grid=(2, 3), layout="spatial", data=data).flatten(-2)
    )
    want.square().sum().backward()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    for a, p in zip(got, module.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-4, rtol=1e-3)
    assert out[0, 1, 2].abs().sum() > 0 and torch.allclose(out[0, 1, 2], module.proj.bias)  # id 9: no keys
    with pytest.raises(PatternError, match=r"pattern = 'causal\(\)'"):
        CrossAttention(32, H, (2, 3), pattern=causal())
    with pytest.raises(AttnccError, match=r"context.shape"):
        module(x, torch.randn(2, 5, 32, device=DEVICE))


def test_new_lengths_and_ids_never_recompile():
    """A compiled training step with new key lengths and ids per call: one compiled frame."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def step(q, k, v, lengths, key_ids, query_ids):
        data = {"key_lengths": lengths, "documents": key_ids, "query_documents": query_ids}
        return attncc.attention(q, k, v, documents() & key_lengths(), q_grid=7, data=data)

    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, H, 7, D, generator=gen).to(DEVICE)
    k, v = (torch.randn(2, H_KV, 5, D, generator=gen).to(DEVICE) for _ in range(2))
    for seed, lengths in ((0, [5, 2]), (1, [0, 4]), (2, [3, 3])):
        ids = torch.Generator().manual_seed(seed)
        key_ids, query_ids = (
            torch.randint(0, 2, (2, 5), generator=ids),
            torch.randint(0, 2, (2, 7), generator=ids),
        )
        args = (torch.tensor(lengths), key_ids, query_ids)
        args = [t.to(DEVICE) for t in args]
        data = {"key_lengths": args[0], "documents": args[1], "query_documents": args[2]}
        eager = attncc.attention(q, k, v, documents() & key_lengths(), q_grid=7, data=data)
        torch.testing.assert_close(step(q, k, v, *args), eager, atol=1e-6, rtol=1e-6)
    assert counter.frame_count == 1


def test_the_front_doors_example_runs():
    """docs/front-doors.md's cross-attention example runs as written."""
    doc = (REPO / "docs" / "front-doors.md").read_text()
    section = doc[doc.index("### Cross-attention") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "docs/front-doors.md (Cross-attention)", "exec"), scope)
    assert scope["y"].shape == (2, 3, 4, 64) and scope["text"].grad is not None

"""Patterns built inside torch.compile (Note [Patterns under torch.compile] in attncc.runtime.dynamo).

Every primitive and combinator, @attncc.jit, attncc.flex and attncc.natten, built inside a
torch.compile(fullgraph=True) function: no graph break, the eager result, recompiles only for new
shapes, and an empty kernel cache. The CompileCounter backend runs the captured graph as is, so
each test pays for tracing and the interpreted kernels only.
"""

import pytest
import torch
import torch._dynamo.testing
from conftest import DEVICE

import attncc
import attncc.flex
import attncc.natten
from attncc.ir import (
    axial,
    band,
    block_diagonal,
    block_sparse,
    causal,
    congruent,
    dense,
    document,
    global_tokens,
    key_range,
    neighborhood,
    per_head,
    sliding_window,
    strided,
)
from attncc.runtime import dynamo
from attncc.runtime.library import forget_kernels

pytestmark = pytest.mark.skipif(
    not dynamo.PATTERNS_IN_COMPILE, reason="this torch has no value-type opaque objects"
)

# (builder, grid): each builder runs inside the compiled function.
BUILDERS = {
    "dense": (lambda: dense(), (16,)),
    "neighborhood": (lambda: neighborhood(3, dilation=2), (16,)),
    "neighborhood-2d": (lambda: neighborhood((3, 2), causal=(True, False)), (4, 4)),
    "sliding_window": (lambda: sliding_window(4, 1), (16,)),
    "causal": (lambda: causal(), (16,)),
    "axial": (lambda: axial([1]), (4, 4)),
    "strided": (lambda: strided(4, 1), (16,)),
    "block_sparse": (lambda: block_sparse([[1, 0], [1, 1]], 8), (16,)),
    "global_tokens": (lambda: global_tokens([0, 5]), (16,)),
    "document": (lambda: document([0] * 5 + [1] * 11), (16,)),
    "band": (lambda: band(1, -1, 2), (4, 4)),
    "block_diagonal": (lambda: block_diagonal(0, 2), (4, 4)),
    "congruent": (lambda: congruent(0, 3, 1), (16,)),
    "key_range": (lambda: key_range(0, hi=3), (16,)),
    "union": (lambda: sliding_window(2) | global_tokens([0]) | strided(8), (16,)),
    "intersection": (lambda: sliding_window(4) & causal(), (16,)),
    "per_head": (lambda: per_head([causal(), sliding_window(2) | key_range(0, hi=1)]), (16,)),
}


def _qkv(n=16, b=1, requires_grad=False):
    return tuple(torch.randn(b, 2, n, 16, device=DEVICE, requires_grad=requires_grad) for _ in "qkv")


def _compiled(fn):
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    return torch.compile(fn, fullgraph=True, backend=counter), counter


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_pattern_built_inside_the_compiled_function_matches_eager(name):
    build, grid = BUILDERS[name]
    step, counter = _compiled(lambda q, k, v: attncc.attention(q, k, v, build(), grid=grid))
    q, k, v = _qkv()
    torch.testing.assert_close(step(q, k, v), attncc.attention(q, k, v, build(), grid=grid), atol=0, rtol=0)
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", ["neighborhood-2d", "per_head"])
def test_backward_through_a_pattern_built_inside_matches_eager(name):
    build, grid = BUILDERS[name]
    step, _ = _compiled(lambda q, k, v: attncc.attention(q, k, v, build(), grid=grid).square().sum())
    q, k, v = _qkv(requires_grad=True)
    step(q, k, v).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    attncc.attention(q, k, v, build(), grid=grid).square().sum().backward()
    for g, t in zip(got, (q, k, v)):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


def test_a_new_length_recompiles_once_and_a_seen_one_not_at_all():
    step, counter = _compiled(lambda q, k, v: attncc.attention(q, k, v, sliding_window(4) & causal()))
    for n, frames in ((16, 1), (16, 1), (32, 2), (16, 2), (32, 2), (48, 3)):
        q, k, v = _qkv(n)
        torch.testing.assert_close(step(q, k, v), attncc.attention(q, k, v, sliding_window(4) & causal()))
        assert counter.frame_count == frames, f"N = {n}"


def test_a_new_batch_size_recompiles_at_most_once_and_mark_dynamic_not_at_all():
    step, counter = _compiled(lambda q, k, v: attncc.attention(q, k, v, causal()))
    for b, frames in ((1, 1), (2, 2), (3, 2)):  # the second batch size makes the batch symbolic
        step(*_qkv(b=b))
        assert counter.frame_count == frames, f"B = {b}"
    step, counter = _compiled(lambda q, k, v: attncc.attention(q, k, v, causal()))
    for b in (2, 3):
        q, k, v = _qkv(b=b)
        for t in (q, k, v):
            torch._dynamo.mark_dynamic(t, 0)
        step(q, k, v)
    assert counter.frame_count == 1


def test_a_dynamic_sequence_length_is_refused_by_torch_compile():
    step, _ = _compiled(lambda q, k, v: attncc.attention(q, k, v, causal()))
    q, k, v = _qkv()
    torch._dynamo.mark_dynamic(q, 2)
    with pytest.raises(Exception, match=r"marked .*size\(\)\[2\] as dynamic but your code specialized it"):
        step(q, k, v)


@attncc.jit(grid="N")
def _local(q, k):
    return abs(q.n - k.n) <= 2


def _doc_mask(b, h, q_idx, kv_idx):
    return (_DOC[q_idx] == _DOC[kv_idx]) & (q_idx >= kv_idx)


_DOC = torch.tensor([0] * 6 + [1] * 10)


def test_every_front_door_compiles_on_an_empty_kernel_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    forget_kernels()
    _local._patterns.cache_clear()  # the predicate is traced afresh too
    q, k, v = _qkv()
    spatial = tuple(t.transpose(1, 2) for t in (q, k, v))  # NATTEN's [B, N, heads, D]
    doors = {
        "jit": (lambda q, k, v: _local(q, k, v, grid=(16,)), sliding_window(2, 2)),
        "flex": (
            lambda q, k, v: attncc.flex.flex_attention(q, k, v, lambda b, h, i, j: (i - j <= 3) & (i >= j)),
            sliding_window(3),
        ),
        "natten": (
            lambda q, k, v: attncc.natten.na1d(q, k, v, kernel_size=5, dilation=2).transpose(1, 2),
            neighborhood(5, dilation=2),
        ),
    }
    for name, (door, pattern) in doors.items():
        step, counter = _compiled(door)
        args = spatial if name == "natten" else (q, k, v)
        torch.testing.assert_close(step(*args), attncc.attention(q, k, v, pattern), msg=name)
        assert counter.frame_count == 1, name
    assert any(tmp_path.iterdir())  # the kernels were built into the empty cache


def test_a_flex_mask_that_reads_tensor_values_is_refused_inside_torch_compile():
    step, _ = _compiled(lambda q, k, v: attncc.flex.flex_attention(q, k, v, _doc_mask))
    with pytest.raises(Exception, match=r"mask_mod _doc_mask reads the values of _DOC inside torch.compile"):
        step(*_qkv())
    found = attncc.flex.pattern(_doc_mask, 16)  # built outside, it is passed in
    step, _ = _compiled(lambda q, k, v: attncc.attention(q, k, v, found))
    q, k, v = _qkv()
    torch.testing.assert_close(step(q, k, v), attncc.attention(q, k, v, causal() & document(_DOC.tolist())))


def test_a_bad_pattern_built_inside_names_the_field():
    step, _ = _compiled(lambda q, k, v: attncc.attention(q, k, v, neighborhood(17)))
    with pytest.raises(Exception, match=r"neighborhood.window\[0\] = 17 is out of range; allowed: 1..16"):
        step(*_qkv())

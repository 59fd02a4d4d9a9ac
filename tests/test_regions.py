"""Queries that cover a part of the keys' grid (issue 16 part 1: KV caches, chunked prefill,
decode): the oracle (attncc.reference), the offsets (attncc.layouts.query_offsets) and the
kernels.

A region's rows are, by definition, those rows of the whole grid's problem: the oracle's tests
compare against the full problem computed by the reference itself, exactly. The kernels' tests
compare forward and backward (out, lse, dq, dk, dv and the score terms' gradients) against the
float64 reference on the same region: fp32 within 1e-4 of the largest magnitude (a few ulps of
the float32 accumulations over at most a hundred keys), fp16 within 1e-2 (its 11-bit mantissa:
about 5e-4 per rounding of P and dS, summed over the keys).
"""

import dataclasses

import numpy as np
import pytest
import torch
import torch._dynamo.testing
from conftest import DEVICE

import attncc
from attncc import AttnccError
from attncc.ir import (
    Grid,
    bias,
    block_mask,
    block_sparse,
    causal,
    documents,
    global_tokens,
    key_bias,
    key_range,
    neighborhood,
    query_bias,
    rel_pos_bias,
    sliding_window,
    topk_blocks,
)
from attncc.layouts import query_offsets, to_sdpa_views
from attncc.lower.lowering import LaunchConfig, lower
from attncc.lower.visits import inverse_walk, walk
from attncc.reference import attention as reference

H, H_KV, D = 4, 2, 16


def _qkv(b, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, H, n, D, generator=gen), torch.randn(b, H_KV, n, D, generator=gen),
            torch.randn(b, H_KV, n, D, generator=gen))  # fmt: skip


def test_the_last_tokens_of_a_cache_by_default():
    q, k, v = _qkv(2, 40)
    full, lse = reference(q, k, v, causal(), return_lse=True)
    tail, tail_lse = reference(q[:, :, -7:], k, v, causal(), return_lse=True)
    torch.testing.assert_close(tail, full[:, :, -7:], atol=0, rtol=0)
    torch.testing.assert_close(tail_lse, lse[:, :, -7:], atol=0, rtol=0)


def test_a_chunk_and_per_batch_offsets():
    q, k, v = _qkv(3, 40)
    full = reference(q, k, v, sliding_window(5, 0))
    chunk = reference(q[:, :, 10:18], k, v, sliding_window(5, 0), q_offset=10)
    torch.testing.assert_close(chunk, full[:, :, 10:18], atol=0, rtol=0)
    offsets = torch.tensor([0, 17, 39])
    rows = torch.stack([q[i, :, o : o + 1] for i, o in enumerate(offsets.tolist())])
    step = reference(rows, k, v, causal(), q_offset=offsets)
    want = reference(q, k, v, causal())
    for i, o in enumerate(offsets.tolist()):
        torch.testing.assert_close(step[i], want[i, :, o : o + 1], atol=0, rtol=0)


def test_the_last_frames_of_a_video_with_query_data():
    """A 3-D grid; q is its last 2 frames (SDPA rows of whole frames, or spatial); per-query
    biases are the region's rows, per-key ones the grid's."""
    grid = (5, 3, 4)
    q, k, v = _qkv(1, 60)
    qb, kb = torch.randn(1, H, 24), torch.randn(1, 1, 60)
    pattern = neighborhood((3, 3, 3), causal=(True, False, False))
    full_qb = torch.cat([torch.zeros(1, H, 36), qb], -1)
    full = reference(q, k, v, pattern, grid=grid, score_mod=query_bias(full_qb) + key_bias(kb))
    last = reference(q[:, :, 36:], k, v, pattern, grid=grid, score_mod=query_bias(qb) + key_bias(kb))
    torch.testing.assert_close(last, full[:, :, 36:], atol=0, rtol=0)
    spatial = [t.transpose(1, 2).unflatten(1, grid) for t in (q, k, v)]
    out = reference(spatial[0][:, 3:], *spatial[1:], pattern, score_mod=query_bias(qb) + key_bias(kb))
    torch.testing.assert_close(out, full.transpose(1, 2).unflatten(1, grid)[:, 3:], atol=0, rtol=0)


def test_offsets():
    q, k, v = _qkv(2, 40)
    views = to_sdpa_views(q[:, :, :8], k, v, None)
    cpu = torch.device("cpu")
    assert views.region == (8,) and views.grid == Grid((40,))
    assert query_offsets(views, None, 2, cpu).tolist() == [[32], [32]]
    assert query_offsets(views, 5, 2, cpu).tolist() == [[5], [5]]
    assert query_offsets(views, torch.tensor([-3, 99]), 2, cpu).tolist() == [[0], [32]]  # clamped
    grid = Grid((5, 3, 4))
    q, k, v = _qkv(1, 60)
    views = to_sdpa_views(q[:, :, :24], k, v, grid)
    assert views.region == (2, 3, 4)
    assert query_offsets(views, None, 1, cpu).tolist() == [[3, 0, 0]]
    assert query_offsets(views, (1,), 1, cpu).tolist() == [[1, 0, 0]]


@pytest.mark.parametrize(
    "q_offset,match",
    [(33, r"q_offset = 33 is out of range"), ((0, 1), r"q_offset = \(0, 1\) is out of range"),
     (1.5, r"q_offset = 1.5 is not None, an int"), (torch.tensor([1.0, 2.0]), r"q_offset dtype")],
    ids=["past-the-end", "rank", "float", "float-tensor"],
)  # fmt: skip
def test_bad_offsets_are_refused(q_offset, match):
    q, k, v = _qkv(2, 40)
    with pytest.raises(AttnccError, match=match):
        reference(q[:, :, :8], k, v, causal(), q_offset=q_offset)


def test_a_region_that_is_not_whole_slices_is_refused():
    q, k, v = _qkv(1, 60)
    with pytest.raises(AttnccError, match=r"q length = 7 is out of range.*whole slices"):
        reference(q[:, :, :7], k, v, causal(), grid=(5, 12))


def _kernel_check(pattern, q_shape, kv_shape, q_offset=None, grid=None, terms=(), make=None, data=None,
                  dtype=torch.float32):  # fmt: skip
    """The kernels against the float64 reference on one region, forward and backward."""
    gen = torch.Generator().manual_seed(1)
    q, do = torch.randn(q_shape, generator=gen), torch.randn(q_shape, generator=gen)
    k, v = torch.randn(kv_shape, generator=gen), torch.randn(kv_shape, generator=gen)
    terms = [torch.randn(shape, generator=gen) for shape in terms]
    if isinstance(q_offset, torch.Tensor):
        q_offset = q_offset.to(DEVICE)
    data = None if data is None else {key: t.to(DEVICE) for key, t in data.items()}

    def run(fn, work):
        leaves = [t.to(DEVICE, work).requires_grad_() for t in (q, k, v, *terms)]
        score = None if make is None else make(*leaves[3:])
        out, lse = fn(*leaves[:3], pattern, grid=grid, q_offset=q_offset, score_mod=score, data=data,
                      return_lse=True)  # fmt: skip
        finite = torch.isfinite(lse)
        loss = (out.double() * do.to(DEVICE).double()).sum() + lse.double()[finite].sum()
        return [out, lse.masked_fill(~finite, 0), *torch.autograd.grad(loss, leaves)]

    got, want = run(attncc.attention, dtype), run(reference, torch.float64)
    for i, (a, w) in enumerate(zip(got, want)):
        tol = (1e-4 if dtype == torch.float32 else 1e-2) * max(1.0, w.abs().max().item())
        assert (a.double() - w).abs().max().item() <= tol, ["out", "lse", "dq", "dk", "dv", "terms"][
            min(i, 5)
        ]


@pytest.mark.parametrize(
    "q_offset", [None, 20, torch.tensor([0, 61])], ids=["last-rows", "a-chunk", "per-batch-decode"]
)
def test_kernels_on_the_rows_of_a_cache(q_offset):
    rows = 3 if isinstance(q_offset, torch.Tensor) else 9
    _kernel_check(causal(), (2, H, rows, D), (2, H_KV, 70, D), q_offset)


def test_kernels_with_a_table_plan_and_a_window():
    _kernel_check(sliding_window(8, 0) | key_range(0, hi=3), (2, H, 17, D), (2, H_KV, 70, D))
    _kernel_check(
        sliding_window(8, 0) | global_tokens([0]), (2, H, 17, D), (2, H_KV, 70, D), torch.tensor([5, 40])
    )


def test_kernels_on_the_last_frames_of_a_video():
    pattern = neighborhood((3, 3, 5), causal=(True, False, False))
    _kernel_check(pattern, (1, H, 60, D), (1, H_KV, 120, D), grid=(4, 5, 6))


@pytest.mark.parametrize("q_offset", [(2, 3), torch.tensor([[0, 0], [3, 5]])], ids=["static", "per-batch"])
def test_kernels_on_a_box_of_an_image(q_offset):
    """Spatial layout: q [B, 3, 4, H, D] is a box of the keys' 6x9 image."""
    _kernel_check(neighborhood((3, 5)), (2, 3, 4, H, D), (2, 6, 9, H_KV, D), q_offset)


def test_kernels_with_every_score_term_on_a_region():
    """The relative position table's index and the per-query terms follow q's place in the
    grid; per-key terms and a dense bias are the region's rows against all keys."""
    _kernel_check(
        neighborhood(7), (2, H, 9, D), (2, H_KV, 40, D), torch.tensor([3, 25]),
        terms=[(H, 13), (1, H, 9), (1, 1, 40), (1, H, 9, 40)],
        make=lambda t, qb, kb, b: rel_pos_bias(t) + query_bias(qb) + key_bias(kb) + bias(b),
    )  # fmt: skip


def test_kernels_with_documents_on_a_region():
    ids = torch.tensor([[0] * 20 + [1] * 20, [0] * 5 + [1] * 35])
    _kernel_check(causal() & documents(), (2, H, 9, D), (2, H_KV, 40, D), torch.tensor([10, 30]),
                  data={"documents": ids})  # fmt: skip


def test_kernels_on_a_dilated_grid_region_along_an_undilated_axis():
    pattern = neighborhood((3, 3), dilation=(1, 2), causal=(True, False))
    _kernel_check(pattern, (1, H, 20, D), (1, H_KV, 60, D), grid=(6, 10))


def test_kernels_with_block_sparse_layouts_on_a_chunk():
    """A static layout and a layout given per call (batch and head), forward and backward."""
    layout = [[int(j <= i and (i + j) % 3 != 1) for j in range(5)] for i in range(5)]
    _kernel_check(
        block_sparse(layout, 16) & causal(), (2, H, 20, D), (2, H_KV, 70, D), torch.tensor([17, 48])
    )
    mask = torch.rand(2, H, 5, 5, generator=torch.Generator().manual_seed(5)) < 0.5
    _kernel_check(block_mask(16) & causal(), (2, H, 20, D), (2, H_KV, 70, D), 33, data={"block_mask": mask})


def test_kernels_fp16():
    _kernel_check(neighborhood((3, 5)), (2, 3, 4, H, D), (2, 6, 9, H_KV, D), torch.tensor([[0, 0], [3, 5]]),
                  dtype=torch.float16)  # fmt: skip


def test_a_region_along_a_dilated_axis_is_refused():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 6, 3, H, D, generator=gen), torch.randn(1, 6, 10, H_KV, D, generator=gen)
    with pytest.raises(AttnccError, match=r"dilat"):
        attncc.attention(q.to(DEVICE), k.to(DEVICE), k.to(DEVICE), neighborhood((3, 3), dilation=(1, 2)))


def test_new_offsets_never_recompile():
    """Decode steps at a new position each: one compiled frame, each step as eager computes it."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def step(q, k, v, offsets):
        return attncc.attention(q, k, v, causal(), q_offset=offsets)

    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, H, 1, D, generator=gen).to(DEVICE)
    k, v = (torch.randn(2, H_KV, 40, D, generator=gen).to(DEVICE) for _ in range(2))
    for position in ([3, 39], [0, 17], [25, 25]):
        offsets = torch.tensor(position, device=DEVICE)
        eager = attncc.attention(q, k, v, causal(), q_offset=offsets)
        torch.testing.assert_close(step(q, k, v, offsets), eager, atol=1e-6, rtol=1e-6)
    assert counter.frame_count == 1


def test_the_walk_of_a_region_is_the_whole_walk_at_its_tiles():
    """Note [Walks of a region]: the forward runs the Q tiles the box touches, each as in the whole
    grid's walk; the dK/dV walk clips each KV tile's Q tiles to them (same tiles: a region's own
    choice of boxes minimises its own visits)."""
    grid = Grid((16, 48, 48))
    pattern = neighborhood((7, 15, 15), causal=(True, False, False))
    config = dataclasses.replace(LaunchConfig.default("cuda", 128), q_box=(2, 8, 8), kv_box=(1, 8, 8))
    whole = lower(pattern, grid, 128, "bfloat16", config=config)
    last = lower(pattern, grid, 128, "bfloat16", config=config, region=(2, 48, 48))
    assert last.q_region == (2, 48, 48) and last.region_axes == (0,)
    q_tiles = whole.q_tiles()
    keep = (np.arange(q_tiles[0]) * whole.q_tile[0] + whole.q_tile[0] > 14)[:, None, None]
    keep = np.broadcast_to(keep, q_tiles).ravel()
    for a, w in zip(walk(last), walk(whole)):
        assert a.name == w.name and a.per_program.tolist() == w.per_program[keep].tolist()
    for a, w in zip(inverse_walk(last), inverse_walk(whole)):
        assert a.per_program.size == w.per_program.size and (a.per_program <= w.per_program).all()
        assert a.per_program.sum() < w.per_program.sum()


def test_top_k_data_in_a_region():
    """The region path normalises the data once: top-k indices are not read back from their layout."""
    q, k, v = _qkv(2, 40)
    picks = torch.randint(-1, 5, (2, H, 5, 2), generator=torch.Generator().manual_seed(3))
    pattern, data = topk_blocks(8) & causal(), {"topk_blocks": picks}
    full = reference(q, k, v, pattern, data=data)
    tail = reference(q[:, :, -6:], k, v, pattern, data=data)
    torch.testing.assert_close(tail, full[:, :, -6:], atol=0, rtol=0)


def test_a_jit_predicate_on_a_region():
    """@attncc.jit reads the keys' grid from k and takes q_offset as attncc.attention does."""

    @attncc.jit(grid=("T", "H", "W"))
    def video(q, k):
        return (k.t <= q.t) & (q.t - k.t <= 2) & (abs(q.h - k.h) <= 1) & (abs(q.w - k.w) <= 2)

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, 5, 6, H, D, generator=gen).to(DEVICE)
    k, v = (torch.randn(2, 4, 5, 6, H_KV, D, generator=gen).to(DEVICE) for _ in range(2))
    offsets = torch.tensor([[0, 0, 0], [1, 0, 0]], device=DEVICE)
    out = video(q, k, v, q_offset=offsets)
    want = reference(*(t.double() for t in (q, k, v)), video.pattern((4, 5, 6)), q_offset=offsets)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)

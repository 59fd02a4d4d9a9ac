"""Queries that cover a part of the keys' grid (issue 16 part 1: KV caches, chunked prefill,
decode): the oracle (attncc.reference) and the offsets (attncc.layouts.query_offsets).

A region's rows are, by definition, those rows of the whole grid's problem: each test compares
against the full problem computed by the reference itself, exactly.
"""

import pytest
import torch

from attncc import AttnccError
from attncc.ir import Grid, causal, key_bias, neighborhood, query_bias, sliding_window, topk_blocks
from attncc.layouts import query_offsets, to_sdpa_views
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


def test_top_k_data_in_a_region():
    """The region path normalises the data once: top-k indices are not read back from their layout."""
    q, k, v = _qkv(2, 40)
    picks = torch.randint(-1, 5, (2, H, 5, 2), generator=torch.Generator().manual_seed(3))
    pattern, data = topk_blocks(8) & causal(), {"topk_blocks": picks}
    full = reference(q, k, v, pattern, data=data)
    tail = reference(q[:, :, -6:], k, v, pattern, data=data)
    torch.testing.assert_close(tail, full[:, :, -6:], atol=0, rtol=0)

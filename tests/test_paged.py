"""Paged KV caches (issue 16 part 2; Note [Paged caches] in attncc.lower.decode): k and v as
pools of pages read through a block table, against the same call on the contiguous cache the
table describes (and that against the float64 reference in tests/test_decode.py).

The pools hold every sequence's pages shuffled, with garbage in the pages no table names, so
a kernel that reads a wrong page fails. Decode steps read the pools in place; other calls (a
gradient, more than 64 queries) gather them. The interpreter's KV tiles are 16 keys: pages of 16 and 64 tokens give a tile one
table entry, pages of 8 and 1 an entry per page, pages of 24 one per key (Note [Paged caches]),
and 8 x 9 pages end in half a tile. fp32: 1e-5 of O(1) outputs (the same kernels'
arithmetic on the same keys, in the same order).
"""

import pytest
import torch
from conftest import DEVICE

import attncc
from attncc import AttnccError
from attncc.ir import causal, key_lengths, key_range, sliding_window
from attncc.runtime import library

B, H, H_KV, D = 3, 8, 2, 16


def _cache(page: int, pages_per_seq: int, seed: int = 0):
    """A contiguous cache [B, H_kv, N, D] and the same as shuffled pools and a block table."""
    gen = torch.Generator().manual_seed(seed)
    n = page * pages_per_seq
    k, v = (torch.randn(B, H_KV, n, D, generator=gen) for _ in range(2))
    spare = 3  # pages no table names: garbage
    order = torch.randperm(B * pages_per_seq + spare, generator=gen)
    table = order[: B * pages_per_seq].reshape(B, pages_per_seq)
    pools = []
    for t in (k, v):
        pool = torch.randn(B * pages_per_seq + spare, page, H_KV, D, generator=gen) * 100
        pool[table.reshape(-1)] = t.transpose(1, 2).reshape(B * pages_per_seq, page, H_KV, D)
        pools.append(pool)
    return [x.to(DEVICE) for x in (k, v, *pools, table.to(torch.int32))]


@pytest.mark.parametrize(
    "page,pages_per_seq",
    [(1, 37), (8, 9), (16, 5), (24, 3), (64, 2)],
    ids=["page1", "page8", "page16", "page24", "page64"],
)
@pytest.mark.parametrize("lq", [1, 5])
def test_decode_over_pages_is_decode_over_the_cache(page, pages_per_seq, lq):
    k, v, k_pool, v_pool, table = _cache(page, pages_per_seq)
    n = k.shape[2]
    q = torch.randn(B, H, lq, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    offsets = torch.tensor([0, n // 2, n - lq], device=DEVICE)
    pattern = sliding_window(9, 0) | key_range(0, hi=1)
    with torch.no_grad():
        got = attncc.attention(
            q, k_pool, v_pool, pattern, q_offset=offsets, block_table=table, return_lse=True
        )
        want = attncc.attention(q, k, v, pattern, q_offset=offsets, return_lse=True)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5)


def test_paged_decode_reads_the_pools_in_place(monkeypatch):
    """The decode op gets the pools and the table; nothing is gathered."""
    _, _, k_pool, v_pool, table = _cache(16, 4)
    seen = {}
    real = library._decode

    def spy(views, qs, ks, vs, *args):
        seen["kv"], seen["table"] = (ks.shape, vs.shape), args[-1]
        return real(views, qs, ks, vs, *args)

    monkeypatch.setattr(library, "_decode", spy)
    monkeypatch.setattr(library, "_gathered", lambda *a: pytest.fail("gathered"))
    q = torch.randn(B, H, 1, D, device=DEVICE)
    with torch.no_grad():
        attncc.attention(q, k_pool, v_pool, causal(), q_offset=torch.tensor([3, 40, 63], device=DEVICE),
                         block_table=table)  # fmt: skip
    assert seen["kv"] == (k_pool.shape, v_pool.shape) and seen["table"].dtype == torch.int32


def test_other_calls_gather_the_pages_and_get_gradients():
    """A prefill chunk of 70 queries (more than decode takes), with gradients to the pools."""
    k, v, k_pool, v_pool, table = _cache(16, 6)
    q = torch.randn(B, H, 70, D, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    k_pool.requires_grad_()
    got = attncc.attention(q, k_pool, v_pool, causal(), q_offset=10, block_table=table)
    ks = k.clone().requires_grad_()
    want = attncc.attention(q, ks, v, causal(), q_offset=10)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    want.sum().backward()
    grad = k_pool.grad[table.reshape(-1).long()].reshape(B, 6, 16, H_KV, D).flatten(1, 2).transpose(1, 2)
    torch.testing.assert_close(grad, ks.grad, atol=1e-5, rtol=1e-5)
    spare = torch.ones(k_pool.shape[0], dtype=torch.bool, device=DEVICE)
    spare[table.reshape(-1).long()] = False
    assert k_pool.grad[spare].abs().max() == 0  # pages no table names get no gradient


def test_key_lengths_cut_a_ragged_batchs_pages():
    k, v, k_pool, v_pool, table = _cache(16, 4)
    lengths = torch.tensor([5, 33, 64], device=DEVICE)
    q = torch.randn(B, H, 1, D, device=DEVICE)
    data = {"key_lengths": lengths}
    with torch.no_grad():
        got = attncc.attention(q, k_pool, v_pool, key_lengths(), block_table=table, data=data)
        want = attncc.attention(q, k, v, key_lengths(), data=data)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change,match",
    [
        (
            lambda k, t: (k, t.float()),
            r"block_table dtype = torch.float32 is out of range; allowed: an integer type",
        ),
        (lambda k, t: (k, t[:2]), r"block_table shape = \(2, 4\)"),
        (lambda k, t: (k[..., :8], t), r"k/v shape"),
    ],
    ids=["float-table", "short-table", "k-unlike-v"],
)
def test_bad_paged_calls_are_refused_by_name(change, match):
    _, _, k_pool, v_pool, table = _cache(16, 4)
    k_pool, table = change(k_pool, table)
    with pytest.raises(AttnccError, match=match):
        attncc.attention(torch.zeros(B, H, 1, D, device=DEVICE), k_pool, v_pool, causal(), block_table=table)


def test_new_tables_and_positions_never_recompile():
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def step(q, k_pool, v_pool, table, positions):
        return attncc.attention(q, k_pool, v_pool, causal(), q_offset=positions, block_table=table)

    q = torch.randn(B, H, 1, D, device=DEVICE)
    for seed in range(3):
        k, v, k_pool, v_pool, table = _cache(16, 4, seed)
        positions = torch.tensor([seed, 20 + seed, 63 - seed], device=DEVICE)
        with torch.no_grad():
            got = step(q, k_pool, v_pool, table, positions)
            want = attncc.attention(q, k, v, causal(), q_offset=positions)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1

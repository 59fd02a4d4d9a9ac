"""``@attncc.jit`` across grids (issue 16: cross-attention through every front door): a jitted
predicate called with ``q_grid=`` reads the key alone (Note [Key runs] in attncc.jit) or is
constant True; one that reads q is refused, quoting the comparison.

The kernels are compared with attncc.reference.attention's cross-attention (float64) of the same
keys written as flat key_range runs, forward and backward (out, lse, dq, dk, dv): fp32 within
1e-4 of the largest magnitude, as tests/test_cross.py argues for these few dozen keys."""

import pytest
import torch
from conftest import DEVICE

import attncc
from attncc.errors import TraceError
from attncc.ir import dense, key_range, union
from attncc.reference import attention as reference

H, D = 2, 16


def _identity(t):
    return t


def _spatial(t):  # [B, *grid, H, D] -> [B, H, N, D]; a log-sum-exp [B, *grid, H] -> [B, H, N]
    return t.flatten(1, -3).transpose(1, 2) if t.dim() > 4 else t.flatten(1, -2).transpose(1, 2)


def _compare(jitted, want_pattern, q_shape, kv_shape, q_grid, layout, flat=_identity):
    """``jitted`` (fp32 kernels, the caller's ``layout``) against the float64 reference of
    ``want_pattern`` on k's flat sequence; ``flat`` views a caller's tensor as SDPA's."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=gen) for s in (q_shape, kv_shape, kv_shape))
    do = torch.randn(flat(q).shape, generator=gen, dtype=torch.float64)

    def with_grads(out, lse, leaves, view):
        out, lse = view(out), view(lse)
        loss = (out.double() * do).sum() + lse.double().sum()
        return [out, lse, *(view(g) for g in torch.autograd.grad(loss, leaves))]

    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    got = with_grads(*jitted(*leaves, q_grid=q_grid, layout=layout, return_lse=True), leaves, flat)
    leaves = [flat(t).to(DEVICE, torch.float64).requires_grad_() for t in (q, k, v)]
    found = reference(*leaves, want_pattern, q_grid=leaves[0].shape[2], layout="sdpa", return_lse=True)
    want = with_grads(*found, leaves, _identity)
    for name, a, w in zip(["out", "lse", "dq", "dk", "dv"], got, want, strict=True):
        tol = 1e-4 * max(1.0, w.abs().max().item())
        assert a.shape == w.shape and (a.double() - w).abs().max().item() <= tol, name


def test_a_key_index_bound_over_a_1d_k():
    @attncc.jit(grid="n")
    def prefix(q, k):
        return k.index < 16

    assert prefix.key_pattern((24,)) == key_range(0, 0, 15)
    _compare(prefix, key_range(0, hi=15), (2, H, 9, D), (2, 1, 24, D), 9, "sdpa")


def test_a_key_row_bound_over_a_2d_k_in_the_spatial_layout():
    """``k.x < 3`` on a 4x5 image keeps its first 15 keys: one run (a text's 2x3 grid of queries)."""

    @attncc.jit(grid=("X", "Y"))
    def top(q, k):
        return k.x < 3

    assert top.key_pattern((4, 5)) == key_range(0, 0, 14)
    _compare(top, key_range(0, hi=14), (1, 2, 3, H, D), (1, 4, 5, H, D), (2, 3), "spatial", _spatial)


def test_a_column_bound_is_one_run_per_row_and_true_is_dense():
    @attncc.jit(grid=("x", "y"))
    def left(q, k):
        return (k.y < 2) | (k.index >= 17)  # the last row: one run with its first two keys

    assert left.key_pattern((4, 5)) == union(*(key_range(0, r * 5, r * 5 + 1) for r in range(3)),
                                             key_range(0, 15, 19))  # fmt: skip

    @attncc.jit(grid="n")
    def everything(q, k):
        return True

    assert everything.key_pattern((7,)) == dense()
    _compare(everything, dense(), (1, H, 11, D), (1, H, 7, D), 11, "sdpa")


@pytest.mark.parametrize(
    "predicate,quoted",
    [
        (lambda q, k: q.index == k.index, "q.index == k.index"),
        (lambda q, k: abs(q.x - k.x) <= 1, "abs(q.x - k.x) <= 1"),
        (lambda q, k: (k.x < 3) & (q.y >= 2), "q.y >= 2"),
        (lambda q, k: ~(k.y <= q.y), "k.y <= q.y"),
    ],
    ids=["diagonal", "window", "query-alone", "negated"],
)
def test_a_predicate_that_reads_q_is_refused_across_grids(predicate, quoted):
    jitted = attncc.jit(predicate, grid=("x", "y"))
    q, k = torch.zeros(1, 3, H, D), torch.zeros(1, 4, 5, H, D)
    with pytest.raises(TraceError) as e:
        jitted(q, k, k, q_grid=3, layout="spatial")
    assert f"{quoted}: cross-attention (q_grid) takes conditions on keys alone" in str(e.value)


def test_too_many_runs_and_a_wrong_rank_are_refused_by_name():
    @attncc.jit(grid=("x", "y"))
    def first_column(q, k):
        return k.y < 1

    with pytest.raises(TraceError, match=r"runs of kept keys = 70 is out of range .*allowed: 1..64"):
        first_column.key_pattern((70, 2))
    with pytest.raises(TraceError, match=r"grid = \(10,\) is out of range; allowed: 2 axes \(x, y\)"):
        first_column(torch.zeros(1, H, 3, D), *[torch.zeros(1, H, 10, D)] * 2, q_grid=3)

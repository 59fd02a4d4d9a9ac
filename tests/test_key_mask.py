"""Keys marked valid at call time (issue 16 part 5): ``key_mask()`` with ``data={"key_mask": mask}``.

The oracle and the data checker first; then the kernels, forward and backward (out, lse, dq, dk,
dv), against the float64 reference on the same mask: fp32 within 1e-4 of the largest magnitude
(a few ulps of the float32 accumulations over at most a few dozen keys), fp16 within 1e-2 (its
11-bit mantissa: about 5e-4 per rounding of P and dS, summed over the keys). Sizes are odd (N
not a multiple of the tiles), masks random per batch element (and per head where given so),
with a batch element that has no valid key and one whose cache holds one valid token. Then
queries over a part of the keys (a decode step, a prefill chunk), the tile classes and lists
the device builds from a mask, and one compiled graph for every value of the mask.
"""

import math

import numpy as np
import pytest
import torch
import torch._dynamo.testing
from conftest import DEVICE

import attncc
from attncc import AttnccError
from attncc.ir import (
    Grid,
    KeyMask,
    causal,
    key_lengths,
    key_mask,
    neighborhood,
    parse,
    sliding_window,
)
from attncc.ir.mask import mask
from attncc.lower.decode import lower_decode
from attncc.lower.lowering import LaunchConfig, lower
from attncc.reference import attention as reference
from attncc.runtime import data as call_data
from attncc.runtime import decode_lists, tables

H, H_KV, D = 4, 2, 16
CPU = torch.device("cpu")


def _valid(shape, seed=0, p=0.6):
    """A random mask; batch element 1 has no valid key, the last one only its key 5 (a cache of
    one valid token)."""
    valid = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p
    valid[1] = False
    valid[-1] = False
    valid[-1, ..., 5] = True
    return valid


def _qkv(b, n_q, n, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, H, n_q, D, generator=gen)
    k, v = torch.randn(b, H_KV, n, D, generator=gen), torch.randn(b, H_KV, n, D, generator=gen)
    do = torch.randn(b, H, n_q, D, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, v, do)]


def _check(pattern, grid, valid, dtype=torch.float32, n_q=None, q_offset=None, grad=True):
    """The kernels' (out, lse and, with ``grad``, dq, dk, dv) against the float64 reference; the
    kernels' out and lse are returned."""
    n = math.prod(grid)
    q, k, v, do = _qkv(valid.shape[0], n_q or n, n, dtype=dtype)
    data = {"key_mask": valid.to(DEVICE)}
    offset = q_offset.to(DEVICE) if isinstance(q_offset, torch.Tensor) else q_offset

    def run(fn, work):
        leaves = [t.to(work).requires_grad_(grad) for t in (q, k, v)]
        out, lse = fn(*leaves, pattern, grid=grid, data=data, return_lse=True, q_offset=offset)
        finite = torch.isfinite(lse)
        got = [out, lse.masked_fill(~finite, 0)]
        if grad:
            loss = (out.double() * do.double()).sum() + lse.double()[finite].sum()
            got += torch.autograd.grad(loss, leaves)
        return finite, got

    finite, got = run(attncc.attention, dtype)
    want_finite, want = run(reference, torch.float64)
    assert torch.equal(finite, want_finite)  # rows with no key: lse -inf in both
    for name, a, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        tol = (1e-4 if dtype == torch.float32 else 1e-2) * max(1.0, w.abs().max().item())
        assert torch.isfinite(a).all() and (a.double() - w).abs().max().item() <= tol, name
    return got[0], finite


# --- the primitive, its data, the oracle ------------------------------------------------------


def test_text_form_and_one_leaf_per_pattern():
    p = sliding_window(8) & key_mask()
    assert parse(str(p)) == p and isinstance(key_mask(), KeyMask)
    assert str(key_mask()) == "key_mask()"
    with pytest.raises(AttnccError, match=r"second key_mask leaf"):
        key_mask() | (causal() & key_mask())


def test_the_oracle_keeps_the_valid_keys_of_each_batch_element_and_head():
    grid = Grid((3, 5))
    valid = _valid((2, H, 15))
    data = call_data.checked(causal() & key_mask(), grid, 2, H, {"key_mask": valid}, CPU)
    got = mask(causal() & key_mask(), grid, data=data)
    want = torch.tril(torch.ones(15, 15, dtype=torch.bool)) & valid[:, :, None, :]
    assert torch.equal(got, want)


def test_normalised_forms():
    valid = _valid((2, 11))
    got = call_data.checked(key_mask(), Grid((11,)), 2, H, {"key_mask": valid}, CPU)["key_mask"]
    assert got.dtype == torch.int8 and got.shape == (2, 1, 11) and torch.equal(got[:, 0].bool(), valid)
    ints = valid.to(torch.int64) * 7  # an integer mask (a Hugging Face attention_mask): non-zero keeps
    got = call_data.checked(key_mask(), Grid((11,)), 2, H, {"key_mask": ints}, CPU)["key_mask"]
    assert torch.equal(got[:, 0].bool(), valid)
    shared = valid[:1, None].expand(2, H, 11)  # broadcast by expand: taken back to size 1
    got = call_data.checked(key_mask(), Grid((11,)), 2, H, {"key_mask": shared}, CPU)["key_mask"]
    assert got.shape == (1, 1, 11) and torch.equal(got[0, 0].bool(), valid[0])


@pytest.mark.parametrize(
    "value,match",
    [
        (torch.ones(2, 11), r"key_mask dtype = torch.float32 .*bool or an integer type"),
        (torch.ones(2, 12, dtype=torch.bool), r"key_mask shape = \(2, 12\) .*\(2 or 1, 11\) or \(2 or 1, 4 or 1, 11\)"),
        (torch.ones(3, 11, dtype=torch.bool), r"key_mask shape = \(3, 11\) .*\[B, N\] or \[B, H, N\]"),
        (torch.ones(2, 3, 11, dtype=torch.bool), r"key_mask shape = \(2, 3, 11\)"),
        (torch.ones(11, dtype=torch.bool), r"key_mask shape = \(11,\)"),
        (torch.ones(2, 11, dtype=torch.bool, device="meta"), r"key_mask device = .*meta.*the device of q"),
        ([[True] * 11] * 2, r"data\['key_mask'\] = '<list>' is not a tensor \(the data of key_mask\(\)\)"),
        (None, r"data\['key_mask'\] is missing \(key_mask\(\) reads it at call time\); give data\['key_mask'\]: bool"),
    ],
)  # fmt: skip
def test_bad_data_names_the_field_and_its_form(value, match):
    data = {} if value is None else {"key_mask": value}
    with pytest.raises(AttnccError, match=match):
        call_data.checked(causal() & key_mask(), Grid((11,)), 2, H, data, CPU)


# --- the kernels ------------------------------------------------------------------------------


def test_a_cache_with_invalid_keys_and_an_empty_batch_element():
    """GQA; batch element 1 has no valid key: zero rows, lse -inf, finite (zero) gradients."""
    out, finite = _check(key_mask(), (37,), _valid((3, 37)))
    assert not finite[1].any() and torch.all(out[1] == 0)
    assert finite[0].all() and finite[2].all()


def test_whole_tiles_of_valid_keys_of_invalid_keys_and_of_both():
    """150 keys: the interpreter's 64-key tiles are whole but for the last. Batch element 0's
    first tile is all valid (a full tile under the union, walked unmasked), its second all
    invalid (walked only for the window's keys); the rest of the keys are mixed."""
    valid = _valid((3, H, 150), seed=7)
    valid[0, 0, :64] = True  # per head: head 0 only (GQA: dK/dV sums heads with other lists)
    valid[0, :, 64:128] = False
    _check(key_mask() | sliding_window(2), (150,), valid)


def test_causal_with_a_mask_per_head_and_rows_with_no_key():
    valid = _valid((3, H, 37), seed=1)
    valid[0, :, :3] = False  # the first three queries of batch element 0 see no key
    out, finite = _check(causal() & key_mask(), (37,), valid)
    assert not finite[0, :, :3].any() and torch.all(out[0, :, :3] == 0)
    assert not finite[2, :, :5].any() and finite[2, :, 5:].all()  # the one valid key, 5


def test_a_neighborhood_on_a_grid_masked_over_the_flat_keys():
    _check(neighborhood((3, 5)) & key_mask(), (5, 7), _valid((2, 35), seed=2))


def test_fp16_sliding_window():
    _check(sliding_window(8) & key_mask(), (45,), _valid((3, 45), seed=3), dtype=torch.float16)


def test_a_prefill_chunk_with_gradients():
    """q covers 9 rows of a 37-key cache at per-batch offsets: the general kernels' query region."""
    _check(causal() & key_mask(), (37,), _valid((3, 37), seed=4), n_q=9, q_offset=torch.tensor([0, 13, 28]))


@pytest.mark.parametrize(
    "pattern,shape",
    [(key_mask(), (3, H, 37)), (sliding_window(8) & key_mask(), (3, 37))],
    ids=["mask", "window"],
)
def test_a_decode_step(pattern, shape):
    """One query and a chunk of 5, forward only: the decode kernels (list plans), with a mask per
    head and one for every head."""
    for n_q, offsets in ((1, torch.tensor([36, 36, 20])), (5, torch.tensor([32, 0, 7]))):
        _check(pattern, (37,), _valid(shape, seed=5), n_q=n_q, q_offset=offsets, grad=False)


# --- tile lists built on the device -----------------------------------------------------------


def _plan(pattern, n, tile=16):
    return lower(pattern, Grid((n,)), D, "float32", config=LaunchConfig(tile, tile))


def test_tile_classes_skip_tiles_of_invalid_keys():
    """Per (batch element, head) and KV tile: empty when no key of it is valid, full when every
    key is (unless a tile of the pair holds padding), partial else."""
    n = 45
    valid = _valid((3, 2, n), seed=6)
    valid[0, 0, :16] = False  # batch element 0, head 0: tile 0 empty, tile 1 full
    valid[0, 0, 16:32] = True
    data = call_data.checked(key_mask(), Grid((n,)), 3, 2, {"key_mask": valid}, CPU)
    classes = tables.tile_classes(_plan(key_mask(), n), (), data, CPU)
    assert classes.shape == (3, 2, 3, 3)  # [B, H, Q tiles, KV tiles]: the same for every Q tile
    tiles = torch.nn.functional.pad(valid, (0, 3)).reshape(3, 2, 1, 3, 16)
    whole = torch.tensor([True, True, False])  # the last tile (Q or KV) holds padding: never full
    full = tiles.all(-1) & whole[:, None] & whole[None, :]
    want = torch.where(full, tables.FULL, torch.where(tiles.any(-1), tables.PARTIAL, tables.EMPTY))
    assert torch.equal(classes.long(), want)
    assert classes[0, 0, 0, :2].tolist() == [tables.EMPTY, tables.FULL]
    counts, _ = tables.tile_lists(classes)
    assert counts[1].sum().item() == 0  # batch element 1: no tile listed, for any Q tile


def test_a_prefix_mask_lists_the_tiles_of_key_lengths():
    """Keys below each length as a mask, and the lengths themselves: the same lists, by Q tile
    and by KV tile."""
    n, lengths = 70, torch.tensor([70, 33, 0, 16])
    masked = causal() & key_mask()
    by_mask = call_data.checked(
        masked, Grid((n,)), 4, 1, {"key_mask": torch.arange(n)[None] < lengths[:, None]}, CPU
    )
    padded = causal() & key_lengths()
    by_lengths = call_data.checked(padded, Grid((n,)), 4, 1, {"key_lengths": lengths}, CPU)
    plans = _plan(masked, n), _plan(padded, n)
    statics = [tables.static_classes_of(plan, Grid((n,))) for plan in plans]
    for by_kv in (False, True):
        c0, l0 = tables.build(plans[0], statics[0], by_mask, CPU, by_kv=by_kv)
        c1, l1 = tables.build(plans[1], statics[1], by_lengths, CPU, by_kv=by_kv)
        assert torch.equal(c0, c1)
        for idx in np.ndindex(*c0.shape[:3]):
            used = int(c0[idx].sum())
            assert torch.equal(l0[idx][:used], l1[idx][:used])


def test_decode_lists_skip_tiles_of_invalid_keys():
    plan = lower_decode(key_mask(), 64, 1, 2, D, "float32", device_type="cpu")  # 16-key tiles
    valid = torch.zeros(2, 2, 64, dtype=torch.bool)
    valid[0, 0, 20] = True  # head 0 of batch element 0: tile 1; its head 1: tile 3
    valid[0, 1, 63] = True
    data = {"key_mask": valid.view(torch.int8)}
    counts, lists = decode_lists.build(
        plan, key_mask(), data, torch.tensor([63, 63], dtype=torch.int32), 2, 1
    )
    assert counts[:, 0, 0].tolist() == [2, 0] and lists[0, 0, 0, :2].tolist() == [1, 3]


def test_opcheck_with_a_key_mask():
    """The ops' schemas, fakes and autograd registration hold with the mask as their argument."""
    q, k, v, _ = _qkv(2, 21, 21)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    valid = call_data.checked(key_mask(), Grid((21,)), 2, H, {"key_mask": _valid((2, 21))}, CPU)["key_mask"]
    args = (q, k, v, "causal() & key_mask()", [21], 0.25, "softmax", 0.0)
    kwargs = {"key_mask": valid.to(DEVICE)}
    torch.library.opcheck(torch.ops.attncc.fwd_opaque.default, args, kwargs)
    o, lse = torch.ops.attncc.fwd_opaque(*args, **kwargs)
    bwd_args = (q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), torch.randn_like(o),
                torch.zeros_like(lse), *args[3:])  # fmt: skip
    torch.library.opcheck(torch.ops.attncc.bwd_opaque.default, bwd_args, kwargs)
    offsets = torch.tensor([20, 3], dtype=torch.int32, device=DEVICE)
    decode_args = (q.detach()[:, :, :1], k.detach(), v.detach(), "key_mask()", 0.25, "softmax", offsets)
    torch.library.opcheck(torch.ops.attncc.decode_opaque.default, decode_args, kwargs)


# --- under torch.compile ----------------------------------------------------------------------


def test_new_masks_never_recompile_in_a_training_step():
    """Masks of new values through a compiled training step: one frame, each step as eager."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    pattern = causal() & key_mask()

    @torch.compile(fullgraph=True, backend=counter)
    def step(q, k, v, valid):
        return attncc.attention(q, k, v, pattern, data={"key_mask": valid}).square().sum()

    q, k, v, _ = _qkv(2, 21, 21)
    q.requires_grad_()
    for seed in range(4):
        valid = _valid((2, 21), seed=seed).to(DEVICE)
        loss = step(q, k, v, valid)
        (grad,) = torch.autograd.grad(loss, q)
        eager = attncc.attention(q, k, v, pattern, data={"key_mask": valid}).square().sum()
        (want,) = torch.autograd.grad(eager, q)
        torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1

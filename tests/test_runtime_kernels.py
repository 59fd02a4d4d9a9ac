"""Patterns whose data come with each call, through the kernels (issue 18 parts 1-3).

Forward and backward against the float64 reference on the same data (fp32 1e-4 of the largest
magnitude, fp16 as in test_score_inputs.py), random data per batch element and head, empty
rows and an all-empty layout; the lists built on the device against the host's analysis for the
same static layout; and one kernel for every value of the data, eager and under torch.compile.
"""

import math

import pytest
import torch
import torch._dynamo.testing
from conftest import DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc
from attncc.ir import (
    Grid,
    block_mask,
    block_sparse,
    causal,
    documents,
    key_bias,
    key_lengths,
    neighborhood,
    sliding_window,
    topk_blocks,
)
from attncc.lower.lowering import LaunchConfig, kernel_tables, lower
from attncc.reference import attention as reference
from attncc.runtime import tables

H, H_KV, D = 2, 1, 16


def _qkv(b, n, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, H, n, D, generator=gen)
    k, v = torch.randn(b, H_KV, n, D, generator=gen), torch.randn(b, H_KV, n, D, generator=gen)
    do = torch.randn(b, H, n, D, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, v, do)]


def _on(data):
    return {key: t.to(DEVICE) for key, t in data.items()}


def _check(pattern, grid, data, b=2, dtype=torch.float32, score_mod=None):
    n = math.prod(grid)
    q, k, v, do = _qkv(b, n, dtype=dtype)

    def run(fn, work):
        leaves = [t.to(work).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves, pattern, grid=grid, data=_on(data), return_lse=True, score_mod=score_mod)
        finite = torch.isfinite(lse)
        loss = (out.double() * do.double()).sum() + lse.double()[finite].sum()
        return [out, lse.masked_fill(~finite, 0), *torch.autograd.grad(loss, leaves)]

    got, want = run(attncc.attention, dtype), run(reference, torch.float64)
    for name, a, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        tol = (1e-4 if dtype == torch.float32 else 1e-2) * max(1.0, w.abs().max().item())
        assert (a.double() - w).abs().max().item() <= tol, name


def _layout(b, h, blocks, seed=0, p=0.4):
    gen = torch.Generator().manual_seed(seed)
    layout = torch.rand(b, h, blocks, blocks, generator=gen) < p
    layout[0, 0, min(1, blocks - 1)] = False  # an empty row
    layout[-1, -1] = False  # an all-empty layout
    return layout


def test_block_mask_per_batch_and_head():
    _check(block_mask(16), (70,), {"block_mask": _layout(2, H, 5)})


def test_block_mask_of_box_blocks_on_a_grid():
    _check(block_mask((2, 4)), (6, 10), {"block_mask": _layout(2, 1, 9)})


def test_topk_blocks_with_unused_slots():
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(-1, 5, (2, H, 5, 2), generator=gen)
    _check(topk_blocks(16) | sliding_window(4, 0), (70,), {"topk_blocks": idx})


def test_documents_per_batch_and_cu_seqlens():
    ids = torch.tensor([[0] * 30 + [1] * 25 + [2] * 15, [0] * 7 + [1] * 63])
    _check(causal() & documents(), (70,), {"documents": ids})
    _check(documents(), (70,), {"cu_seqlens": torch.tensor([0, 11, 40, 64])}, b=1)


def test_key_lengths_with_an_empty_batch_element():
    _check(causal() & key_lengths(), (70,), {"key_lengths": torch.tensor([70, 33])})
    _check(sliding_window(8, 8) & key_lengths(), (40,), {"key_lengths": torch.tensor([0, 17])})


def test_a_neighborhood_of_packed_images_with_a_score_term():
    grid = (6, 10)
    ids = torch.tensor([[0] * 30 + [1] * 30, [0] * 60])
    kb = torch.randn(1, H, 60, device=DEVICE)
    _check(neighborhood((3, 5)) & documents(), grid, {"documents": ids}, score_mod=key_bias(kb))


def test_fp16():
    _check(
        sliding_window(8, 8) | block_mask(16), (70,), {"block_mask": _layout(2, H, 5)}, dtype=torch.float16
    )


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(17, 64), block=st.sampled_from([8, 16, 32]), p=st.floats(0.0, 1.0), seed=st.integers(0, 99)
)
def test_random_layouts_match_the_reference(n, block, p, seed):
    _check(block_mask(block), (n,), {"block_mask": _layout(2, H, -(-n // block), seed, p)})


def test_device_lists_equal_the_analysis_lists_of_the_same_static_layout():
    """A static block_sparse layout and the same layout as call-time data give the same tiles."""
    grid = Grid((70,))
    layout = _layout(1, 1, 5)[0, 0]
    config = LaunchConfig(16, 16)
    static = lower(block_sparse(layout.int().tolist(), 16), grid, D, "float32", config=config)
    runtime = lower(block_mask(16), grid, D, "float32", config=config)
    assert (static.q_tile, static.kv_tile) == (runtime.q_tile, runtime.kv_tile)
    _, offsets, entries, kv_offsets, kv_entries = kernel_tables(
        block_sparse(layout.int().tolist(), 16), grid, static
    )
    data = {"block_mask": layout.to(torch.int8)[None, None]}
    for (offs, ents), by_kv in (((offsets, entries), False), ((kv_offsets, kv_entries), True)):
        counts, lists = tables.build(runtime, (), data, torch.device("cpu"), by_kv=by_kv)
        for row in range(len(offs) // 2):
            full = ents[offs[2 * row] : offs[2 * row + 1]].tolist()
            part = ents[offs[2 * row + 1] : offs[2 * row + 2]].tolist()
            assert counts[0, 0, row].tolist() == [len(full), len(part)]
            got = lists[0, 0, row, : len(full) + len(part)].tolist()
            assert sorted(got[: len(full)]) == sorted(full) and sorted(got[len(full) :]) == sorted(part)


def test_new_data_never_recompile_in_a_training_step():
    """20 layouts and packings through a compiled training step: one frame, one kernel, each
    step as eager computes it."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    pattern = block_mask(16) & documents()

    @torch.compile(fullgraph=True, backend=counter)
    def step(q, k, v, layout, ids):
        out = attncc.attention(q, k, v, pattern, data=_on({"block_mask": layout, "documents": ids}))
        return out.square().sum()

    q, k, v, _ = _qkv(1, 48)
    q.requires_grad_()
    gen = torch.Generator().manual_seed(4)
    for _ in range(20):
        layout = torch.rand(1, H, 3, 3, generator=gen) < 0.6
        cuts = sorted(torch.randint(1, 48, (2,), generator=gen).tolist())
        ids = torch.tensor([[0] * cuts[0] + [1] * (cuts[1] - cuts[0]) + [2] * (48 - cuts[1])])
        loss = step(q, k, v, layout, ids)
        (grad,) = torch.autograd.grad(loss, q)
        eager = (
            attncc.attention(q, k, v, pattern, data={"block_mask": layout, "documents": ids}).square().sum()
        )
        (want,) = torch.autograd.grad(eager, q)
        torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


def test_eager_calls_with_new_data_reuse_the_kernel():
    attncc.runtime.library.forget_kernels()
    q, k, v, _ = _qkv(1, 40)
    for seed in range(3):
        attncc.attention(q, k, v, block_mask(16), data=_on({"block_mask": _layout(1, H, 3, seed)}))
    info = attncc.runtime.ops.compiled.cache_info()
    assert (info.misses, info.hits) == (1, 0)  # one kernel; the launch memo above it serves the rest


def test_compile_refuses_data_given_per_call(tmp_path):
    from click.testing import CliRunner

    from attncc.cli import cli
    from attncc.errors import SpecError

    spec = tmp_path / "packed.yaml"
    spec.write_text('pattern: "causal() & documents()"\ngrid: [64]\nheads: 2\nhead_dim: 16\ndtype: float32\n')
    result = CliRunner().invoke(cli, ["compile", str(spec), "-o", str(tmp_path / "pkg")])
    assert isinstance(result.exception, SpecError)
    assert "pattern (for attncc compile) = 'documents'" in str(result.exception)
    assert not (tmp_path / "pkg").exists()


def test_flex_block_masks_from_kv_blocks_are_data():
    """FlexAttention's BlockMask.from_kv_blocks (no mask_mod: SeerAttention's, NSA's selected
    blocks) is its tables: attncc.flex reads them as block_mask data per call (Note [Block masks
    as data]), per batch element and head, full blocks included; new tables reuse the graph."""
    flex_attention_module = pytest.importorskip("torch.nn.attention.flex_attention")

    def tables_of(layout, full):
        kv_num = layout.sum(-1).int()
        kv_idx = torch.sort((~layout).to(torch.int8), dim=-1, stable=True).indices.int()
        f_num = full.sum(-1).int()
        f_idx = torch.sort((~full).to(torch.int8), dim=-1, stable=True).indices.int()
        return flex_attention_module.BlockMask.from_kv_blocks(kv_num, kv_idx, f_num, f_idx, BLOCK_SIZE=16)

    q, k, v, _ = _qkv(2, 48)
    k, v = (t.expand(2, H, 48, D).contiguous() for t in (k, v))
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(attncc.flex.flex_attention, fullgraph=True, backend=counter)
    for seed in range(3):
        layout = _layout(2, H, 3, seed)
        full = _layout(2, H, 3, seed + 10) & ~layout
        mask = tables_of(layout.to(DEVICE), full.to(DEVICE))
        want = reference(q, k, v, block_mask(16), data=_on({"block_mask": layout | full}))
        for fn in (attncc.flex.flex_attention, compiled):
            torch.testing.assert_close(fn(q, k, v, block_mask=mask), want, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1

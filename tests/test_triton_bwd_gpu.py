"""Backward kernels and the triton_op path on a GPU at realistic shapes (run: pytest -m gpu).

Gradients are compared by relative error ||got - ref|| / ||ref|| against float32
autograd of the reference (float64 for fp32 inputs): fp32 dots run in IEEE fp32
(1e-4); fp16 rounds P, dS and the gradients to 11 bits (3e-3); bf16 to 8 bits
(1.5e-2). Outputs start as NaN (ATTNCC_POISON, set by conftest).
"""

import pytest
import torch
from test_triton_fwd_gpu import CASES

import attncc
from attncc.ir import Grid, causal, neighborhood, per_head, sliding_window
from attncc.reference import attention as reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    fn(q, k, v).backward(do)
    return q.grad, k.grad, v.grad


def _check(pattern, grid, b, h, h_kv, d, dtype):
    n = grid.size
    q, k, v = (torch.randn(b, x, n, d, device="cuda") for x in (h, h_kv, h_kv))
    do = torch.randn(b, h, n, d, device="cuda")
    ours = _grads(
        lambda *t: attncc.attention(*t, pattern, grid=grid), *(x.to(dtype) for x in (q, k, v)), do.to(dtype)
    )
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    want = _grads(
        lambda *t: reference(*t, pattern, grid=grid), *(x.to(ref_dtype) for x in (q, k, v)), do.to(ref_dtype)
    )
    for name, got, ref in zip("qkv", ours, want):
        assert not got.isnan().any(), f"d{name} has NaN (unwritten or wrong)"
        rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
        assert rel < TOL[dtype], f"d{name}: relative error {rel:.3g} >= {TOL[dtype]}"


@pytest.mark.parametrize("dtype", list(TOL), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name,pattern,grid", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_reference_on_gpu(name, pattern, grid, dtype):
    _check(pattern, grid, 1, 4, 2, 128, dtype)


@pytest.mark.parametrize("d", [32, 64, 96, 256])
def test_backward_head_dims_on_gpu(d):
    _check(neighborhood(9, dilation=2), Grid((32, 64)), 2, 4, 1, d, torch.bfloat16)


def test_backward_per_head_patterns_on_gpu():
    _check(per_head([causal(), sliding_window(255, 0), neighborhood(63), causal()]), Grid((2048,)), 1, 4, 2, 64,
           torch.float16)  # fmt: skip


def test_triton_op_compiles_fullgraph_on_gpu():
    """On CUDA attncc.attention is the triton_op: torch.compile sees into the kernels, no graph break."""
    torch._dynamo.reset()
    grid = Grid((32, 32))
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    f = torch.compile(lambda q, k, v: attncc.attention(q, k, v, neighborhood(7), grid=grid), fullgraph=True,
                      backend=counter)  # fmt: skip
    for _ in range(2):
        q, k, v = (
            torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in "qkv"
        )
        out = f(q, k, v)
        out.float().square().sum().backward()
    ref = reference(q.detach().float(), k.detach().float(), v.detach().float(), neighborhood(7), grid=grid)
    torch.testing.assert_close(out.float(), ref, atol=1.5e-2, rtol=0)
    assert counter.frame_count == 1


def test_compiled_training_step_with_sparse_attention_on_gpu():
    """A small video-style model trains under torch.compile(fullgraph=True) with the triton_op path."""
    from attncc.nn import SparseAttention

    torch._dynamo.reset()
    torch.manual_seed(0)
    grid = (4, 12, 12)
    model = torch.nn.Sequential(
        SparseAttention(256, 4, neighborhood((3, 5, 5)), grid, kv_heads=2),
        torch.nn.LayerNorm(256),
        SparseAttention(256, 4, neighborhood((3, 5, 5), dilation=(1, 2, 2)), grid),
    ).to("cuda", torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = torch.compile(model, fullgraph=True)
    x = torch.randn(2, *grid, 256, device="cuda", dtype=torch.bfloat16)
    target = torch.randn_like(x)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (step(x).float() - target.float()).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[-1] < losses[0], losses

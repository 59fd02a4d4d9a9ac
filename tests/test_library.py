"""The torch.library ops: opcheck, autograd, and torch.compile with no graph break or recompile.

On the CPU attncc.attention routes through attncc::fwd_opaque (custom_op with a
fake); on a GPU through attncc::fwd (triton_op), checked by the gpu tests.
"""

import pytest
import torch
from conftest import DEVICE

import attncc
from attncc.ir import Grid, causal, format_pattern, neighborhood, per_head, sliding_window
from attncc.reference import attention as reference

GRID = Grid((5, 6))
PATTERN = neighborhood(3)


def _args(dtype=torch.float32, h=2, h_kv=1, requires_grad=False):
    q = torch.randn(1, h, GRID.size, 16, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    k, v = (
        torch.randn(1, h_kv, GRID.size, 16, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
        for _ in "kv"
    )
    return q, k, v


@pytest.mark.parametrize(
    "pattern", [PATTERN, per_head([causal(), sliding_window(2, 2)])], ids=["shared", "per-head"]
)
def test_opcheck_forward_and_backward(pattern):
    q, k, v = _args(requires_grad=True)
    args = (q, k, v, format_pattern(pattern), list(GRID.shape), 0.25, "softmax", 0.0)
    torch.library.opcheck(torch.ops.attncc.fwd_opaque.default, args)
    o, lse = torch.ops.attncc.fwd_opaque(*args)
    grads = (torch.randn_like(o), torch.randn_like(lse))
    bwd_args = (q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), *grads, *args[3:])
    torch.library.opcheck(torch.ops.attncc.bwd_opaque.default, bwd_args)


class _Block(torch.nn.Module):
    def forward(self, q, k, v):
        return attncc.attention(q, k, v, PATTERN, grid=GRID).sum(-1)


def test_compile_fullgraph_without_recompiles():
    """fullgraph=True fails on any graph break; a recompile would raise under error_on_recompile."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    block = torch.compile(_Block(), fullgraph=True, backend=counter)
    q, k, v = _args(requires_grad=True)
    out = block(q, k, v)
    out.sum().backward()
    want = reference(q.detach(), k.detach(), v.detach(), PATTERN, grid=GRID).sum(-1)
    torch.testing.assert_close(out.detach(), want, atol=1e-4, rtol=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        block(*_args(requires_grad=True)).sum().backward()
    assert counter.frame_count == 1


def test_compile_with_inductor_runs():
    torch._dynamo.reset()
    block = torch.compile(_Block(), fullgraph=True)
    q, k, v = _args(requires_grad=True)
    block(q, k, v).sum().backward()
    assert q.grad is not None and k.grad.abs().sum() > 0

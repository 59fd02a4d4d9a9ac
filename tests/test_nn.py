"""attncc.nn.SparseAttention: matches dense multi-head attention, trains under torch.compile."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

from attncc import AttnccError
from attncc.ir import Grid, dense, documents, neighborhood, rel_pos_bias
from attncc.nn import SparseAttention, table_sizes
from attncc.reference import attention as reference


def _sdpa_attention(m: SparseAttention, x: torch.Tensor) -> torch.Tensor:
    """The same module computed with plain PyTorch: an independent check of the wiring."""
    b, c = x.shape[0], x.shape[-1]
    t = x.reshape(b, -1, c)
    q = m.q(t).unflatten(-1, (m.heads, m.head_dim)).transpose(1, 2)
    k, v = m.kv(t).unflatten(-1, (2, m.kv_heads, m.head_dim)).unbind(-3)
    k, v = (z.transpose(1, 2).repeat_interleave(m.heads // m.kv_heads, 1) for z in (k, v))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2)
    return m.proj(out).reshape(x.shape)


@pytest.mark.parametrize("grid,kv_heads", [((4, 5), None), ((12,), 1), ((2, 3, 4), 2)])
def test_dense_pattern_matches_sdpa(grid, kv_heads):
    torch.manual_seed(0)
    m = SparseAttention(64, 4, dense(), grid, kv_heads=kv_heads).to(DEVICE)
    x = torch.randn(2, *grid, 64, device=DEVICE)
    torch.testing.assert_close(m(x), _sdpa_attention(m, x), atol=1e-4, rtol=1e-4)
    flat = x.flatten(1, -2)
    torch.testing.assert_close(m(flat), m(x).flatten(1, -2), atol=1e-5, rtol=0)


def test_bad_shapes_are_refused():
    with pytest.raises(AttnccError, match="heads"):
        SparseAttention(60, 7, dense(), (4, 4))
    with pytest.raises(AttnccError, match="kv_heads"):
        SparseAttention(64, 4, dense(), (4, 4), kv_heads=3)
    m = SparseAttention(64, 4, dense(), (4, 4))
    with pytest.raises(AttnccError, match=r"x\.shape"):
        m(torch.randn(1, 5, 4, 64))
    # A wrong channel count used to reach the projection's matmul (a raw RuntimeError).
    with pytest.raises(AttnccError, match=r"x\.shape = \(1, 4, 4, 32\) .*\[B, 4, 4, 64\] or \[B, 16, 64\]"):
        m(torch.randn(1, 4, 4, 32))
    with pytest.raises(AttnccError, match=r"takes no attn_mask or is_causal: the pattern is the mask"):
        m(torch.randn(1, 4, 4, 64), is_causal=True)
    # A pattern that cannot fit the grid fails when the module is built, not at its first step.
    with pytest.raises(AttnccError, match=r"neighborhood.window"):
        SparseAttention(64, 4, neighborhood(7), (4, 4))


@pytest.mark.slow  # about 100 s of inductor on the CPU; test_dropin_hf trains compiled in CI
def test_compiled_training_step_of_a_small_vision_model():
    """Two blocks with neighborhood attention (dilated in the second), trained a few steps under
    torch.compile(fullgraph=True): the loss goes down and every parameter gets a gradient."""
    torch.manual_seed(0)
    grid = (6, 7)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(
                [
                    SparseAttention(32, 2, neighborhood(3), grid),
                    SparseAttention(32, 2, neighborhood(3, dilation=2), grid),
                ]
            )
            self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(32) for _ in self.blocks])
            self.head = torch.nn.Linear(32, 1)

        def forward(self, x):
            for norm, block in zip(self.norms, self.blocks):
                x = x + block(norm(x))
            return self.head(x.mean((1, 2))).squeeze(-1)

    model = Model().to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step_model = torch.compile(model, fullgraph=True)
    x, y = torch.randn(4, *grid, 32, device=DEVICE), torch.randn(4, device=DEVICE)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.mse_loss(step_model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses


def test_rel_pos_bias_module_matches_the_reference():
    """The module's table is NATTEN's [heads, 2w - 1, ...] (in units of the dilation), initialised
    like NATTEN's and Swin's, and the output and its gradient to the table match the reference
    attention with that table (float64; fp32 tolerance as in test_score_inputs.py). (Training
    with a table under torch.compile: test_score_inputs.py.)"""
    torch.manual_seed(0)
    grid, pattern = (7, 11), neighborhood((3, 5), dilation=(2, 1))
    m = SparseAttention(32, 2, pattern, grid, rel_pos_bias=True).to(DEVICE)
    assert m.rpb.shape == (2, 5, 9) and 0 < m.rpb.abs().max() < 0.1
    assert table_sizes(neighborhood(7, causal=True), Grid((20,)), 2) == (13,)
    x = torch.randn(2, *grid, 32, device=DEVICE)
    out = m(x)
    out.square().sum().backward()
    with torch.no_grad():
        q = m.q(x).unflatten(-1, (2, 16)).double()
        k, v = (t.double() for t in m.kv(x).unflatten(-1, (2, 2, 16)).unbind(-3))
    table = m.rpb.detach().double().requires_grad_()
    ref = reference(q, k, v, pattern, grid=grid, layout="spatial", score_mod=rel_pos_bias(table))
    want = m.proj.double()(ref.flatten(-2))
    m.proj.float()
    want.square().sum().backward()
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        m.rpb.grad.double(), table.grad, atol=1e-4 * table.grad.abs().max().item(), rtol=0
    )


def test_attn_drop_only_while_training():
    torch.manual_seed(0)
    m = SparseAttention(32, 2, neighborhood(3), (6, 7), attn_drop=0.5).to(DEVICE)
    x = torch.randn(1, 6, 7, 32, device=DEVICE)
    assert not torch.equal(m(x), m(x))
    m.eval()
    plain = SparseAttention(32, 2, neighborhood(3), (6, 7)).to(DEVICE)
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), plain(x), atol=0, rtol=0)
    with pytest.raises(AttnccError, match=r"attn_drop = 1.0 is out of range"):
        SparseAttention(32, 2, neighborhood(3), (6, 7), attn_drop=1.0)


def test_data_given_per_call_reach_the_kernels():
    """Two images packed in one row: the pattern declares documents(), each step gives the
    packing (attncc.attention's data=); an image attends to itself alone, as a module on its own
    grid computes it."""
    torch.manual_seed(0)
    m = SparseAttention(32, 2, dense() & documents(), (6, 7)).to(DEVICE)
    x = torch.randn(2, 6, 7, 32, device=DEVICE)
    ids = torch.tensor([[0] * 21 + [1] * 21, [0] * 42], device=DEVICE)
    out = m(x, data={"documents": ids})
    alone = SparseAttention(32, 2, dense(), (3, 7)).to(DEVICE)
    alone.load_state_dict(m.state_dict())
    torch.testing.assert_close(out[0, 3:], alone(x[:1, 3:])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], m(x[1:], data={"documents": ids[1:]})[0], atol=1e-5, rtol=1e-5)

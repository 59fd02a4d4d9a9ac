"""Drop-in check in a second real model architecture: Hugging Face transformers' ViT (random weights
from a config, no download) with each layer's attention replaced by attncc.nn.SparseAttention.

Unlike timm (tests/test_dropin_timm.py), transformers needs no torchvision, so this check runs in
CI on the CPU. HF's ViT keeps a class token in front of the 8x8 patches: its 65 tokens are a 1-D
grid, and the sparse variant is a 1-D neighborhood over the tokens with the class token global.

Dense pattern: the model's output matches the original within fp32 rounding of two layers (1e-4).
Sparse pattern: a training step (forward, loss, backward) runs under torch.compile(fullgraph=True).
"""

import copy

import pytest
import torch
from conftest import DEVICE
from torch import nn

from attncc.errors import AttnccError
from attncc.ir import dense, global_tokens, neighborhood
from attncc.nn import SparseAttention

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

TOKENS = 1 + (32 // 4) ** 2  # the class token and 8x8 patches


class _HFAttention(nn.Module):
    """ViTAttention's call signature (hidden states, mask) -> (output, weights) over SparseAttention."""

    def __init__(self, attention: nn.Module, pattern) -> None:
        super().__init__()
        a = attention
        heads = a.num_attention_heads
        self.inner = SparseAttention.from_projections(
            a.q_proj, a.k_proj, a.v_proj, a.o_proj, heads, pattern, (TOKENS,)
        )

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return self.inner(hidden_states, attn_mask=attention_mask), None


def _vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=10,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config).to(DEVICE).eval()


def _swap_attention(model, pattern):
    from transformers.models.vit.modeling_vit import ViTAttention

    swaps = [
        (m, name, c) for m in model.modules() for name, c in m.named_children() if isinstance(c, ViTAttention)
    ]
    assert len(swaps) == model.config.num_hidden_layers
    for parent, name, child in swaps:
        setattr(parent, name, _HFAttention(child, pattern))
    return model


def test_dense_pattern_matches_transformers():
    model = _vit()
    ours = _swap_attention(copy.deepcopy(model), dense())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)


def test_sparse_attention_trains_under_torch_compile():
    model = _swap_attention(_vit(), neighborhood(9) | global_tokens([0])).train()
    step = torch.compile(model, fullgraph=True)
    x, y = torch.randn(2, 3, 32, 32, device=DEVICE), torch.tensor([1, 7], device=DEVICE)
    loss = torch.nn.functional.cross_entropy(step(x).logits, y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.vit.layers[0].attention.inner.q.weight.grad.abs().sum() > 0


def test_grouped_kv_projections_give_gqa():
    q, proj = nn.Linear(64, 64), nn.Linear(64, 64)
    k, v = nn.Linear(64, 16), nn.Linear(64, 16)  # 1 key/value head of 16 for 4 query heads
    module = SparseAttention.from_projections(q, k, v, proj, 4, dense(), (5,))
    assert (module.heads, module.kv_heads) == (4, 1)
    torch.testing.assert_close(module.kv.weight, torch.cat([k.weight, v.weight]))


@pytest.mark.parametrize(
    "layers, field",
    [
        ((nn.Linear(64, 32), nn.Linear(64, 16), nn.Linear(64, 16), nn.Linear(64, 64)), "q"),
        ((nn.Linear(64, 64), nn.Linear(64, 16), nn.Linear(64, 32), nn.Linear(64, 64)), "v"),
        ((nn.Linear(64, 64), nn.Linear(64, 24), nn.Linear(64, 24), nn.Linear(64, 64)), "k"),
        ((nn.Linear(64, 64), nn.Linear(64, 16, bias=False), nn.Linear(64, 16), nn.Linear(64, 64)), "bias"),
    ],
)
def test_mismatched_projections_name_the_field(layers, field):
    with pytest.raises(AttnccError, match=field):
        SparseAttention.from_projections(*layers, 4, dense(), (5,))

"""Drop-in check in a real model architecture: timm's VisionTransformer (random weights, no download)
with its attention replaced by attncc.nn.SparseAttention.

Dense pattern: the model's output matches the original within fp32 rounding of a few layers
(1e-4). Neighborhood pattern: a forward+backward step runs under torch.compile(fullgraph=True).

timm needs a torchvision whose C++ ops load with the installed torch. CI's package index pairs
torch 2.13.0+cpu with a torchvision build whose ops do not load, so timm is not in the test extra
and this module is skipped where timm cannot be imported; benchmarks/gpu_check.sh runs it on the
GPU machine (which ships timm), and it runs wherever timm is installed.
"""

import copy

import pytest
import torch
from conftest import DEVICE

from attncc.ir import dense, neighborhood
from attncc.nn import SparseAttention

timm = pytest.importorskip("timm", reason="timm (and a torchvision matching torch) is not installed")


def _vit():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, class_token=False,
        global_pool="avg", depth=2, embed_dim=64, num_heads=2, num_classes=10,
    ).to(DEVICE).eval()  # fmt: skip


def _swap_attention(model, pattern):
    grid = model.patch_embed.grid_size
    for block in model.blocks:
        attn = block.attn
        block.attn = SparseAttention.from_fused(attn.qkv, attn.proj, attn.num_heads, pattern, grid)
    return model


def test_dense_pattern_matches_timm():
    model = _vit()
    ours = _swap_attention(copy.deepcopy(model), dense())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), atol=1e-4, rtol=1e-4)


def test_neighborhood_attention_trains_under_torch_compile():
    model = _swap_attention(_vit(), neighborhood(5, dilation=1)).train()
    step = torch.compile(model, fullgraph=True)
    x, y = torch.randn(2, 3, 32, 32, device=DEVICE), torch.tensor([1, 7], device=DEVICE)
    loss = torch.nn.functional.cross_entropy(step(x), y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attn.q.weight.grad.abs().sum() > 0

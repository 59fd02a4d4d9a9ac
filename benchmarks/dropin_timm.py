"""End-to-end training-step time of a timm VisionTransformer with neighborhood attention (issue 8):
attncc.nn.SparseAttention against the same model with FlexAttention and the same mask.

    python benchmarks/dropin_timm.py --markdown benchmarks/RESULTS.md

ViT-B/8 at 512x512 (a 64x64 token grid), neighborhood window 13, bf16, batch 4; both models are
compiled with torch.compile and timed over forward + backward + optimizer step (median, warm-up
and compilation excluded, first step reported apart).
"""

from __future__ import annotations

import argparse
import datetime
import sys

import timm
import torch
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attncc.bench.report import prepend
from attncc.ir import neighborhood
from attncc.ir.mask import neighborhood_axis
from attncc.nn import SparseAttention
from attncc.timing import measure

GRID, WINDOW, BATCH = (64, 64), 13, 4


class FlexAttention(nn.Module):
    """timm's attention with the same neighborhood mask through compiled FlexAttention."""

    def __init__(self, attn, block_mask):
        super().__init__()
        self.qkv, self.proj, self.heads, self.block_mask = attn.qkv, attn.proj, attn.num_heads, block_mask

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = flex_attention(q, k, v, block_mask=self.block_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def _block_mask():
    tables = []
    for size in GRID:
        c = torch.arange(size, device="cuda")
        tables.append(neighborhood_axis(c[:, None], c[None, :], size, WINDOW, 1, 1, False))
    width = GRID[1]

    def mask_mod(b, h, q, k):
        return tables[0][q // width, k // width] & tables[1][q % width, k % width]

    n = GRID[0] * GRID[1]
    return create_block_mask(mask_mod, None, None, n, n, device="cuda")


def _model(kind: str):
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch8_224", pretrained=False, img_size=512, class_token=False,
                              global_pool="avg", num_classes=1000)  # fmt: skip
    block_mask = _block_mask() if kind == "flex" else None
    for block in model.blocks:
        attn = block.attn
        if kind == "flex":
            block.attn = FlexAttention(attn, block_mask)
        else:
            block.attn = SparseAttention.from_fused(
                attn.qkv, attn.proj, attn.num_heads, neighborhood(WINDOW), GRID
            )
    return model.cuda().to(torch.bfloat16)


def _step_time(kind: str):
    model = _model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    compiled = torch.compile(model)
    inputs = [(torch.randn(BATCH, 3, 512, 512, device="cuda", dtype=torch.bfloat16),
               torch.randint(0, 1000, (BATCH,), device="cuda")) for _ in range(2)]  # fmt: skip

    def step(batch):
        x, y = batch
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(compiled(x).float(), y).backward()
        opt.step()

    return measure(step, inputs, "cuda", warmup=3, runs=10)


def main(markdown: str | None) -> None:
    ours, flex = _step_time("attncc"), _step_time("flex")
    props = torch.cuda.get_device_properties(0)
    text = (
        f"## Drop-in: timm ViT-B/8 training step, {datetime.date.today().isoformat()}, {props.name}\n\n"
        f"torch {torch.__version__}; 512x512 images (64x64 tokens), neighborhood window {WINDOW}, bf16, "
        f"batch {BATCH}; forward + backward + AdamW step, median of 10 after 3 warm-up steps.\n\n"
        "| attention | step ms | first step ms (compile) |\n|---|---|---|\n"
        f"| attncc.nn.SparseAttention | {ours.median:.1f} | {ours.first_call:.0f} |\n"
        f"| FlexAttention (same mask) | {flex.median:.1f} | {flex.first_call:.0f} |\n\n"
        f"attncc step speed-up over FlexAttention: {flex.median / ours.median:.2f}x\n"
    )
    print(text)
    if markdown:
        prepend(markdown, text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="prepend the table to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("dropin_timm.py needs a CUDA GPU")
    main(args.markdown)

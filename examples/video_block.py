"""(2) A video diffusion-style transformer block: 3-D neighborhood attention, and GNA strided attention
(a stride equal to the tile makes it perfectly block-sparse), forward and backward through torch.compile.

    TRITON_INTERPRET=1 python examples/video_block.py --size toy
    python examples/video_block.py                                  # GPU: 16x48x80 tokens, dim 1024
"""

import torch
from _common import setup
from torch import nn

from attncc.ir import neighborhood
from attncc.nn import SparseAttention


class VideoBlock(nn.Module):
    """Self-attention over a [B, T, H, W, dim] latent with a timestep modulation (adaLN-style)."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int, int], pattern):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation = nn.Linear(dim, 3 * dim)
        self.attn = SparseAttention(dim, heads, pattern, grid)

    def forward(self, x, t_emb):
        shift, scale, gate = self.modulation(t_emb)[:, None, None, None].chunk(3, -1)
        return x + gate * self.attn(self.norm(x) * (1 + scale) + shift)


def main() -> None:
    args = setup(__doc__.splitlines()[0])
    if args.size == "toy":
        grid, dim, heads = (4, 6, 8), 32, 2
        patterns = {
            "na3d": neighborhood((3, 3, 5)),
            "gna3d strided": neighborhood((2, 4, 4), stride=(2, 2, 2)),
        }
    else:
        grid, dim, heads = (16, 48, 80), 1024, 8
        patterns = {
            "na3d": neighborhood((7, 15, 15)),
            "gna3d strided": neighborhood((8, 16, 16), stride=(4, 8, 8)),
        }
    x = torch.randn(1, *grid, dim, device=args.device, dtype=args.dtype)
    t_emb = torch.randn(1, dim, device=args.device, dtype=args.dtype)
    for name, pattern in patterns.items():
        block = VideoBlock(dim, heads, grid, pattern).to(args.device, args.dtype)
        compiled = torch.compile(block, fullgraph=True)
        out = compiled(x, t_emb)
        out.float().square().mean().backward()
        grad = block.attn.q.weight.grad
        print(f"{name}: out {tuple(out.shape)}, |dW_q| = {grad.float().norm().item():.4f}")


if __name__ == "__main__":
    main()

"""(1) A vision transformer with 2-D neighborhood attention, dilated in alternate layers (NATTEN style),
trained for a few steps on random data.

    TRITON_INTERPRET=1 python examples/vit_neighborhood.py --size toy    # CPU: about 10 s
    python examples/vit_neighborhood.py                                   # GPU: 64x64 tokens, dim 384
"""

import torch
from _common import setup
from torch import nn

from attncc.ir import neighborhood
from attncc.nn import SparseAttention


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, grid: tuple[int, int], window: int, dilation: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SparseAttention(dim, heads, neighborhood(window, dilation=dilation), grid)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def main() -> None:
    args = setup(__doc__.splitlines()[0])
    # Toy: Triton's interpreter runs every program of every kernel in Python, so its time
    # grows with batch x heads x steps; one image keeps the CPU run short.
    grid, dim, heads, depth, window, batch = (
        ((8, 8), 32, 2, 2, 3, 1) if args.size == "toy" else ((64, 64), 384, 6, 4, 7, 4)
    )
    patch = 4
    model = nn.ModuleDict(
        {
            "embed": nn.Conv2d(3, dim, patch, patch),  # patches -> [B, dim, *grid]
            "blocks": nn.Sequential(*[Block(dim, heads, grid, window, 1 + i % 2) for i in range(depth)]),
            "head": nn.Linear(dim, 10),
        }
    ).to(args.device, args.dtype)

    def forward(images):
        x = model["embed"](images).permute(0, 2, 3, 1)  # [B, H, W, dim]: the spatial layout
        return model["head"](model["blocks"](x).mean((1, 2)))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, grid[0] * patch, grid[1] * patch, device=args.device, dtype=args.dtype)
    labels = torch.randint(0, 10, (batch,), device=args.device)
    for step in range(4):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(forward(images).float(), labels)
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()

"""(3) A long-context language-model attention layer: a causal sliding window plus global sink tokens,
and a block-sparse variant; GQA with 4 query heads per KV head.

    TRITON_INTERPRET=1 python examples/lm_long_context.py --size toy
    python examples/lm_long_context.py                              # GPU: 32k tokens, 32 heads, D=128
"""

import torch
from _common import setup

import attncc
from attncc.ir import Grid, analyze, block_sparse, causal, global_tokens, sliding_window


def main() -> None:
    args = setup(__doc__.splitlines()[0])
    n, heads, kv_heads, d, window, block = (
        (256, 4, 1, 32, 63, 32) if args.size == "toy" else (32768, 32, 8, 128, 4095, 128)
    )
    sinks = global_tokens([0, 1, 2, 3]) & causal()  # attention sinks: every query sees the first tokens
    patterns = {
        "sliding window + sinks": sliding_window(window, 0) | sinks,
        # block-sparse: each block sees itself, its predecessor and every 4th earlier block
        "block-sparse": block_sparse(
            [
                [int(j <= i and (i - j <= 1 or j % 4 == 0)) for j in range(n // block)]
                for i in range(n // block)
            ],
            block,
        ),
    }
    q = torch.randn(1, heads, n, d, device=args.device, dtype=args.dtype, requires_grad=True)
    k, v = (
        torch.randn(1, kv_heads, n, d, device=args.device, dtype=args.dtype, requires_grad=True) for _ in "kv"
    )
    for name, pattern in patterns.items():
        q.grad = k.grad = v.grad = None
        a = analyze(pattern, Grid((n,)), 128, 128)
        out = attncc.attention(q, k, v, pattern)
        out.float().sum().backward()
        print(f"{name}: density {a.density:.4f}, tile bound {a.tile_bound:.1f}x, out {tuple(out.shape)}, "
              f"|dk| = {k.grad.float().norm().item():.3f}")  # fmt: skip


if __name__ == "__main__":
    main()

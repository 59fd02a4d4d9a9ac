"""(5) ``@attncc.jit``: write the pattern as a predicate over query/key coordinates.

TRITON_INTERPRET=1 python examples/jit_predicate.py --size toy
python examples/jit_predicate.py
"""

import torch
from _common import setup

import attncc
from attncc.reference import attention as reference


@attncc.jit(grid=("T", "H", "W"))
def local_video(q, k):
    """A causal-in-time window of 3 frames, a 7x7 spatial window."""
    return (k.t <= q.t) & (q.t - k.t <= 2) & (abs(q.h - k.h) <= 3) & (abs(q.w - k.w) <= 3)


def main() -> None:
    args = setup(__doc__.splitlines()[0])
    grid = (3, 6, 7) if args.size == "toy" else (16, 48, 48)
    heads, d = (2, 16) if args.size == "toy" else (16, 128)
    q, k, v = (torch.randn(1, *grid, heads, d, device=args.device, dtype=args.dtype) for _ in range(3))
    print("traced pattern:", local_video.pattern(grid))
    out = local_video(q, k, v)  # spatial layout [B, T, H, W, heads, D]
    if args.size == "toy":
        err = (out - reference(q, k, v, local_video.pattern(grid))).abs().max().item()
        print(f"max abs difference from the brute-force reference: {err:.2e}")
    print("out", tuple(out.shape))


if __name__ == "__main__":
    main()

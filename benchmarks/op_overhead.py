"""Eager overhead of attncc.attention over a direct kernel launch (issue 4: under 20 us per call).

    python benchmarks/op_overhead.py --markdown benchmarks/RESULTS.md

A tiny problem (1 x 1 x 128 tokens x 64) makes both host-bound, so the
difference of the medians is the wrapper: layout checks, the torch.library
dispatch and autograd bookkeeping. Timed with a host clock around many calls
(a synchronise at the end), since the GPU idles between launches here.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time

import torch

import attncc
from attncc.bench.report import prepend
from attncc.ir import Grid, neighborhood
from attncc.runtime import ops

CALLS, REPEATS = 2000, 7


def _per_call_us(fn) -> float:
    samples = []
    for _ in range(REPEATS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / CALLS * 1e6)
    return statistics.median(samples)


def main(markdown: str | None) -> None:
    grid, pattern = Grid((128,)), neighborhood(15)
    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    plan = ops.launches(pattern, grid, 1, 1, 64, "bfloat16", "cuda", "softmax")
    scale = 1 / math.sqrt(64)

    def direct():
        ops.forward(q, k, v, plan, scale, 0.0, True)

    def wrapped():
        attncc.attention(q, k, v, pattern, grid=grid)

    def wrapped_grad():
        attncc.attention(q.requires_grad_(), k, v, pattern, grid=grid)

    direct(), wrapped()
    t_direct, t_op = _per_call_us(direct), _per_call_us(wrapped)
    t_grad = _per_call_us(wrapped_grad)
    q.requires_grad_(False)
    props = torch.cuda.get_device_properties(0)
    text = (
        f"## Op overhead, {datetime.date.today().isoformat()}, {props.name}\n\n"
        f"torch {torch.__version__}; median over {REPEATS} x {CALLS} calls, 1x1x128x64 bf16.\n\n"
        "| path | us per call | over direct |\n|---|---|---|\n"
        f"| direct launch (attncc.runtime.ops.forward) | {t_direct:.1f} | - |\n"
        f"| attncc.attention (torch.library op) | {t_op:.1f} | {t_op - t_direct:+.1f} |\n"
        f"| attncc.attention, q requires grad | {t_grad:.1f} | {t_grad - t_direct:+.1f} |\n\n"
        f"Target: under 20 us over the direct launch: {'met' if t_grad - t_direct < 20 else 'missed'}.\n"
    )
    print(text)
    if markdown:
        prepend(markdown, text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="prepend the table to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("op_overhead.py needs a CUDA GPU")
    main(args.markdown)

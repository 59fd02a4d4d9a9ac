"""Building the tile lists of call-time pattern data (issue 18 part 2: target under 50 us on a GPU).

    python benchmarks/table_build.py [--device cuda] [--markdown benchmarks/RESULTS.md]

The case of the issue: N = 16384 tokens, 64-token blocks (256 x 256 blocks), 16 heads, batch 4,
a top-k layout (16 key blocks per query block) and the same layout as a boolean block mask. For
attncc: checking and normalising the data (attncc.runtime.data; top-k indices scattered into a
layout there) and building the lists of both kernels a training step runs (forward/dQ by Q
tile, dK/dV by KV tile: attncc.runtime.tables), for the tiles the GPU's default config takes. For
FlexAttention on the same layout: ``BlockMask.from_kv_blocks`` (from the top-k indices) and
``create_block_mask`` (a ``mask_mod`` that reads the layout; compiled, as recommended; GPU only:
uncompiled on the CPU it materialises every pair). Medians
of timed calls, synchronised; the CPU figure is a CPU figure (the GPU one is gpu_check.sh's
``bench-tables`` part).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from attncc.bench.report import prepend
from attncc.ir import Grid, block_mask, topk_blocks
from attncc.lower.lowering import LaunchConfig, lower
from attncc.runtime import data as call_data
from attncc.runtime import tables

N, BLOCK, HEADS, BATCH, TOPK = 16384, 64, 16, 4, 16


def _median_us(fn, device: str, calls: int) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def run(device: str, calls: int) -> list[tuple[str, float]]:
    grid = Grid((N,))
    blocks = N // BLOCK
    gen = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(BATCH, HEADS, blocks, blocks, generator=gen, device=device)
    idx = scores.topk(TOPK, dim=-1).indices  # [B, H, QB, K]
    layout = torch.zeros(BATCH, HEADS, blocks, blocks, dtype=torch.bool, device=device)
    layout.scatter_(-1, idx, True)
    results = []
    for name, pattern, given in (
        ("attncc, top-k indices", topk_blocks(BLOCK), {"topk_blocks": idx}),
        ("attncc, block mask", block_mask(BLOCK), {"block_mask": layout}),
    ):
        fwd = lower(pattern, grid, 128, "bfloat16", config=LaunchConfig.default("cuda", 128))
        dkdv = lower(pattern, grid, 128, "bfloat16", config=LaunchConfig.default_dkdv("cuda", 128))

        def build(pattern=pattern, given=given, fwd=fwd, dkdv=dkdv) -> None:
            checked = call_data.checked(pattern, grid, BATCH, HEADS, given, torch.device(device))
            tables.build(fwd, (), checked, torch.device(device))
            tables.build(dkdv, (), checked, torch.device(device), by_kv=True)

        results.append((f"{name}: check + forward and dK/dV lists", _median_us(build, device, calls)))
    try:
        from torch.nn.attention.flex_attention import BlockMask, create_block_mask
    except ImportError:
        return results
    counts = torch.full((BATCH, HEADS, blocks), TOPK, dtype=torch.int32, device=device)
    # FlexAttention's layout: [B, H, QB, KB] indices, a row's kept blocks first.
    kv_indices = torch.argsort((~layout).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    results.append(
        (
            "FlexAttention BlockMask.from_kv_blocks",
            _median_us(lambda: BlockMask.from_kv_blocks(counts, kv_indices, BLOCK_SIZE=BLOCK), device, calls),
        )
    )

    def mask_mod(b, h, q_idx, kv_idx):
        return layout[b, h, q_idx // BLOCK, kv_idx // BLOCK]

    def create() -> None:
        create_block_mask(
            mask_mod, BATCH, HEADS, N, N, device=device, BLOCK_SIZE=BLOCK, _compile=device == "cuda"
        )

    if device != "cuda":  # uncompiled, it evaluates mask_mod on all 4 x 16 x 16384^2 pairs at once
        return results
    results.append(
        ("FlexAttention create_block_mask (compiled)", _median_us(create, device, max(3, calls // 10)))
    )
    return results


def markdown(results: list[tuple[str, float]], device: str) -> str:
    what = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    lines = [
        f"## Tile lists from call-time data ({datetime.date.today()}, {what}, torch {torch.__version__})",
        "",
        f"N = {N}, {BLOCK}-token blocks, {HEADS} heads, batch {BATCH}, top-{TOPK} key blocks per query block "
        "(`benchmarks/table_build.py`; issue 18's target: under 50 us on a GPU).",
        "",
        "| what | median (us) |",
        "|---|---|",
        *(f"| {name} | {us:.0f} |" for name, us in results),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--markdown", help="prepend the table to this file")
    args = ap.parse_args()
    text = markdown(run(args.device, args.calls), args.device)
    print(text)
    if args.markdown:
        prepend(args.markdown, text)


if __name__ == "__main__":
    main()

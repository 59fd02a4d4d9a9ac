"""Forward benchmark of issue 3's cases on a GPU: attncc vs dense SDPA (flash) and FlexAttention.

    python benchmarks/bench_fwd.py --markdown benchmarks/RESULTS.md

bf16, B=1, H=16, D=128. Each case reports the median time (triton's
do_bench, warm-up and compilation excluded), speedup over dense SDPA and over
FlexAttention (torch.compile(flex_attention) with a block mask of the same
pattern), and efficiency = speedup over dense / the plan's tile-level bound
(dense tile pairs / tile pairs the kernel visits). FlexAttention's output is
checked against ours before it is timed.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attncc.ir import Grid, analyze, axial, causal, dense, neighborhood, sliding_window
from attncc.ir.mask import neighborhood_axis
from attncc.library import attention
from attncc.lower.lowering import LaunchConfig, lower, tile_table
from attncc.lower.visits import visited_tiles

H, D, DTYPE = 16, 128, torch.bfloat16


def _neighborhood_mod(grid: Grid, window, dilation=1):
    """A FlexAttention mask_mod of a neighborhood: per-axis lookup tables, ANDed."""
    rank = grid.rank
    window = window if isinstance(window, tuple) else (window,) * rank
    dilation = dilation if isinstance(dilation, tuple) else (dilation,) * rank
    tables = []
    for a, size in enumerate(grid.shape):
        c = torch.arange(size, device="cuda")
        tables.append(neighborhood_axis(c[:, None], c[None, :], size, window[a], dilation[a], 1, False))
    strides = grid.strides

    def mask_mod(b, h, q, k):
        keep = None
        for a, size in enumerate(grid.shape):
            term = tables[a][(q // strides[a]) % size, (k // strides[a]) % size]
            keep = term if keep is None else keep & term
        return keep

    return mask_mod


def _axial_mod(grid: Grid):
    width = grid.shape[1]
    return lambda b, h, q, k: (q // width == k // width) | (q % width == k % width)


CASES = [
    ("dense N=16384", dense(), Grid((16384,)), None),
    ("causal N=16384", causal(), Grid((16384,)), lambda b, h, q, k: k <= q),
    ("1-D sliding window 2048, N=32768", sliding_window(2047, 0), Grid((32768,)),
     lambda b, h, q, k: (k <= q) & (q - k <= 2047)),
    ("na2d 128x128 w31", neighborhood(31), Grid((128, 128)), "na"),
    ("na2d 128x128 w63", neighborhood(63), Grid((128, 128)), "na"),
    ("na2d 128x128 w15 d4", neighborhood(15, dilation=4), Grid((128, 128)), "na"),
    ("na3d 16x48x48 w(7,15,15)", neighborhood((7, 15, 15)), Grid((16, 48, 48)), "na"),
    ("axial 128x128", axial(), Grid((128, 128)), "axial"),
]  # fmt: skip


def _mask_mod(pattern, grid, spec):
    if spec == "na":
        return _neighborhood_mod(grid, pattern.window, pattern.dilation)
    if spec == "axial":
        return _axial_mod(grid)
    return spec


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _case(flex, name, pattern, grid: Grid, spec) -> tuple:
    n = grid.size
    q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=DTYPE) for _ in range(3))
    plan = lower(pattern, grid, D, "bfloat16", config=LaunchConfig.default("cuda", D))
    entries = len(tile_table(pattern, grid, plan)[1]) if plan.iteration == "table" else 0
    visited, dense_tiles = visited_tiles(plan, entries)
    bound = dense_tiles / visited
    density = analyze(pattern, grid, 128, 128).density
    ours = attention(q, k, v, pattern, grid=grid)  # compiles outside the timing
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        t_dense = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    mod = _mask_mod(pattern, grid, spec)
    block_mask = None if mod is None else create_block_mask(mod, 1, 1, n, n, device="cuda")
    peer = flex(q, k, v, block_mask=block_mask)
    err = (peer.float() - ours.float()).abs().max().item()
    t_flex = _bench(lambda: flex(q, k, v, block_mask=block_mask))
    t_ours = _bench(lambda: attention(q, k, v, pattern, grid=grid))
    speedup = t_dense / t_ours
    print(f"{name}: attncc {t_ours:.3f} ms, dense {t_dense:.3f}, flex {t_flex:.3f}, |flex-attncc| {err:.3g}")
    plan_text = f"{plan.iteration} q{plan.q_tile} kv{plan.kv_tile}"
    return (name, n, density, 1 / density, bound, t_dense, t_flex, t_ours, speedup, t_flex / t_ours,
            speedup / bound, err, plan_text)  # fmt: skip


def run(markdown: str | None) -> None:
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for case in CASES:
        rows.append(_case(flex, *case))
        torch.cuda.empty_cache()
    _report(rows, markdown)


def _report(rows, markdown: str | None) -> None:
    props = torch.cuda.get_device_properties(0)
    head = [
        f"## Forward, {datetime.date.today().isoformat()}, {props.name}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}; bf16, B=1, H={H}, D={D}; "
        "median of triton.testing.do_bench.",
        "Efficiency = (dense time / attncc time) / tile bound; tile bound = dense tile pairs / visited.",
        "",
        "| case | N | density | 1/density | tile bound | dense ms | flex ms | attncc ms | vs dense "
        "| vs flex | efficiency | max abs diff vs flex | plan |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines = [
        f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.3f} "
        f"| {r[8]:.2f}x | {r[9]:.2f}x | {r[10]:.2f} | {r[11]:.3g} | {r[12]} |"
        for r in rows
    ]
    neighbors = [r for r in rows if r[0].startswith(("na", "axial"))]
    if neighbors:
        geo = math.exp(sum(math.log(r[9]) for r in neighbors) / len(neighbors))
        lines += ["", f"Geometric mean speedup over FlexAttention, 2-D/3-D/dilated/axial cases: {geo:.2f}x"]
    text = "\n".join(head + lines) + "\n"
    print(text)
    if markdown:
        _prepend(markdown, text)


def _prepend(path: str, section: str) -> None:
    """Newest results first, under the file's title; older runs stay below."""
    title = "# attncc benchmark results\n"
    try:
        with open(path) as f:
            old = f.read()
    except FileNotFoundError:
        old = title
    rest = old[len(title) :] if old.startswith(title) else old
    with open(path, "w") as f:
        f.write(title + "\n" + section + rest)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="append the results table to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fwd.py needs a CUDA GPU")
    run(args.markdown)

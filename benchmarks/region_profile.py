"""The static profile of the kernels of queries over a box of the grid (issue 16 part 1: a
chunk of a prefill, the last frames of a video, a box of an image) for sm_90, with no GPU:
writes a section of benchmarks/STATIC.md per triton version.

    env -u TRITON_INTERPRET python benchmarks/region_profile.py --markdown benchmarks/STATIC.md

Each case is the forward and backward of attncc.attention's launch for the box at the grid's
end (Note [Walks of a region] in attncc.lower.visits), bf16, head dim 128, 16 heads, beside
the same pattern over the whole grid. A box's forward and dQ visit the whole grid's tiles at
the box's Q tiles, so their estimates match the whole grid's; its dK/dV kernel runs a program
per KV tile of the whole grid, and those far from the box have little or nothing to do, so its
estimate falls (idle programs, not wrong ones). Table plans (the window with sinks) get no
estimate from the static profile (their tile mix is read per call); their registers and loops are
shown. Exits non-zero when a kernel spills or warns.
"""

from __future__ import annotations

import datetime

import triton

from attncc.ir import Grid, causal, key_range, neighborhood, sliding_window
from attncc.machine import profile
from attncc.machine.report import markdown, problems, section_main

CASES = {  # name: (pattern, grid, the queries' box)
    "causal-16384-chunk4096": (causal(), (16384,), (4096,)),
    "swa1024+4sinks-16384-chunk2048": (sliding_window(1023, 0) | key_range(0, hi=3), (16384,), (2048,)),
    "na3d-16x48x48-last2frames": (
        neighborhood((7, 15, 15), causal=(True, False, False)),
        (16, 48, 48),
        (2, 48, 48),
    ),
    "na2d-128x128-w31-rows32": (neighborhood((31, 31)), (128, 128), (32, 128)),
}


def section() -> tuple[str, list[str]]:
    profiles, failed = [], []
    for name, (pattern, grid, box) in CASES.items():
        for region, label in ((box, "box"), (None, "whole grid")):
            p = profile(pattern, Grid(grid), 1, 16, 128, "bfloat16", region=region, name=f"{name} ({label})")
            profiles.append(p)
            failed += [f"{p.name} {k.kernel}: {x}" for k in p.kernels for x in problems(k)]
    estimates = [f"| {p.name} | {_fmt(p.forward_estimate)} | {_fmt(p.backward_estimate)} |" for p in profiles]
    body = [
        f"## Query regions (issue 16 part 1), triton {triton.__version__}",
        "",
        f"{datetime.date.today()}, sm_90, `benchmarks/region_profile.py`. bf16, D = 128, 16 heads; each box",
        "at the grid's end beside the whole grid. Estimates are of the tile bound (Note [Issue model]).",
        "",
        "| case | forward | backward |",
        "|---|---|---|",
        *estimates,
        "",
        markdown(profiles).rstrip(),
        "",
    ]
    return "\n".join(body), failed


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    section_main(__doc__, section)

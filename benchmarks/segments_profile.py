"""The static profile of the segments kernels (issue 16 part 4) for sm_90, with no GPU: writes a
section of benchmarks/STATIC.md per triton version.

    env -u TRITON_INTERPRET python benchmarks/segments_profile.py --markdown benchmarks/STATIC.md

The cases: benchmarks/text_video_block.py's block (256 text tokens beside a 30x48x80 video, a
7x15x15 neighbourhood in the video, text dense both ways) as one kernel per direction, the
issue's 226 text tokens beside a 16x48x48 video (also with Gemma-2's soft-cap of 50), and a ViT
with a class token and 4 registers beside a 64x64 image (a 13x13 neighbourhood), bf16, D = 128,
24 heads (the ViT 12 at D = 64, fp16). Exits non-zero when a kernel spills or warns
(attncc.machine.segments.problems).
"""

from __future__ import annotations

import datetime

import triton

from attncc.ir import by_segments, dense, neighborhood, segments
from attncc.machine.report import section_main
from attncc.machine.segments import markdown_rows, problems, segments_profile


def text_video(text: int, video: tuple[int, int, int], window: tuple[int, int, int]):
    return by_segments(
        segments(text=text, video=video),
        {("text", "*"): dense(), ("video", "video"): neighborhood(window), ("video", "text"): dense()},
    )


CASES = {  # name: (pattern, options)
    "text256+video30x48x80": (text_video(256, (30, 48, 80), (7, 15, 15)), {}),
    "text226+video16x48x48": (text_video(226, (16, 48, 48), (7, 15, 15)), {}),
    "text226+video16x48x48+softcap50": (text_video(226, (16, 48, 48), (7, 15, 15)), dict(softcap=50.0)),
    "cls+4reg+image64x64-fp16-d64": (
        by_segments(
            segments(cls=1, reg=4, img=(64, 64)),
            {
                ("cls", "*"): dense(),
                ("reg", "*"): dense(),
                ("img", "img"): neighborhood(13),
                ("img", "cls"): dense(),
                ("img", "reg"): dense(),
            },
        ),
        dict(heads=12, head_dim=64, dtype="float16"),
    ),
}


def section() -> tuple[str, list[str]]:
    profiles, failed = [], []
    for name, (pattern, options) in CASES.items():
        p = segments_profile(pattern, name=name, **options)
        profiles.append(p)
        failed += [f"{name}: {x}" for x in problems(p)]
    body = [
        f"## Segments kernels (issue 16 part 4), triton {triton.__version__}",
        "",
        f"{datetime.date.today()}, sm_90, `benchmarks/segments_profile.py`. One forward, one dQ and one",
        "dK/dV kernel over the whole space of segments (Note [Segment kernels]); bf16, D = 128, 24 heads",
        "unless the case says otherwise. `boxes`: each segment's Q/KV tile; `visited`: the tile pairs",
        "the forward walks (the lists) of all the space's; `loops`: SASS instructions per iteration and",
        "warp, tensor-core instructions, how K/V reach shared memory, branches (`full-p`/`partial-p`:",
        "pair p's full and partial tiles, once per query segment walking it; `heads`: dK/dV's GQA loop).",
        "",
        *markdown_rows(profiles),
        "",
    ]
    if failed:  # the section says what misses the targets (no spills, no ptxas warning)
        body += ["Misses the targets:", "", *(f"- {line}" for line in failed), ""]
    return "\n".join(body), failed


if __name__ == "__main__":
    section_main(__doc__, section)

"""The static profile of the decode kernels (issue 16 part 2) for sm_90, with no GPU: writes a
section of benchmarks/STATIC.md per triton version.

    env -u TRITON_INTERPRET python benchmarks/decode_profile.py --markdown benchmarks/STATIC.md

The benchmark's cases (one query of 8 heads over one KV head, 32K and 128K keys, bf16, D = 128:
causal, and a 4096-token window with 4 sinks) and the other shapes of the kernel: 5 queries of a
GQA group (two programs' rows), a list plan (a block mask), fp16 at D = 64, fp32, the soft-cap
with ALiBi, and a paged cache of 16-token pages (Note [Paged caches]); each split as the cost
model splits it (Note [Split count] in attncc.autotune.decode).
Exits non-zero when a kernel spills, warns, or its KV loop is not software-pipelined.
"""

from __future__ import annotations

import datetime

import triton

from attncc.ir import block_mask, causal, key_range, sliding_window
from attncc.machine.decode import decode_profile, markdown_rows, problems
from attncc.machine.report import section_main

SINKS = sliding_window(4095) | key_range(0, hi=3)
CASES = {
    "causal-128k": (causal(), 131072, {}),
    "causal-32k": (causal(), 32768, {}),
    "swa4096+4sinks-128k": (SINKS, 131072, {}),
    "swa4096+4sinks-32k": (SINKS, 32768, {}),
    "causal-128k-B8-Lq5-32:8": (causal(), 131072, dict(batch=8, heads=32, kv_heads=8, queries=5)),
    "block-mask-128k": (block_mask(64) & causal(), 131072, {}),
    "causal-128k-fp16-d64": (causal(), 131072, dict(dtype="float16", head_dim=64)),
    "causal-32k-fp32": (causal(), 32768, dict(dtype="float32")),
    "causal-128k+softcap+alibi": (causal(), 131072, dict(score="softcap(50.0) + alibi")),
    "causal-128k-paged16": (causal(), 131072, dict(page=16)),
    "swa4096+4sinks-128k-paged16": (SINKS, 131072, dict(page=16)),
}


def section() -> tuple[str, list[str]]:
    profiles, failed = [], []
    for name, (pattern, keys, options) in CASES.items():
        p = decode_profile(pattern, keys, name=name, **options)
        profiles.append(p)
        failed += [f"{name}: {x}" for x in problems(p)]
    title = f"## Decode kernels (issue 16 part 2), triton {triton.__version__}"
    body = [
        title,
        "",
        f"{datetime.date.today()}, sm_90, `benchmarks/decode_profile.py`. bf16, D = 128, one query of",
        "8 heads over one KV head unless the case says otherwise; `splits` is the cost model's (Note",
        "[Split count]); `loop` gives SASS instructions per iteration and warp, tensor-core instructions,",
        "how K/V reach shared memory, branches (`kv`: one KV tile of the decode kernel; `splits`: one",
        "split row of the merge).",
        "",
        *markdown_rows(profiles),
        "",
    ]
    return "\n".join(body), failed


if __name__ == "__main__":
    section_main(__doc__, section)

"""Compile the forward kernels of the benchmark cases for Hopper (sm_90) without a GPU.

    env -u TRITON_INTERPRET python benchmarks/aot_compile.py

Prints each plan with its shared memory and whether it uses wgmma; exits
non-zero if any kernel fails to compile.
"""

from __future__ import annotations

import os
import sys

from attncc.ir import Grid, axial, causal, dense, global_tokens, neighborhood, sliding_window, strided
from attncc.lower.aot import compile_plan
from attncc.lower.lowering import LaunchConfig, lower

CASES = [
    ("dense", dense(), Grid((16384,)), "bfloat16", 128),
    ("causal", causal(), Grid((16384,)), "bfloat16", 128),
    ("band", sliding_window(2047, 0), Grid((32768,)), "bfloat16", 128),
    ("na2d w31", neighborhood(31), Grid((128, 128)), "bfloat16", 128),
    ("na2d w15 d4", neighborhood(15, dilation=4), Grid((128, 128)), "float16", 64),
    (
        "na3d causal-t",
        neighborhood((3, 7, 7), causal=(True, False, False)),
        Grid((16, 48, 48)),
        "bfloat16",
        128,
    ),
    ("axial", axial(), Grid((128, 128)), "bfloat16", 128),
    ("sparse transformer", sliding_window(127) | (strided(128) & causal()), Grid((8192,)), "float32", 64),
    ("band | global (table)", sliding_window(255) | global_tokens([0, 1]), Grid((4096,)), "bfloat16", 256),
]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: interpreter kernels cannot be compiled")
    failed = 0
    for name, pattern, grid, dtype, head_dim in CASES:
        plan = lower(pattern, grid, head_dim, dtype, config=LaunchConfig.default("cuda", head_dim))
        try:
            tiles = f"q{plan.q_tile} kv{plan.kv_tile}"
            for kernel, c in compile_plan(plan).items():
                print(
                    f"{name} {kernel}: {plan.iteration}, {tiles}, {c.shared_bytes} B shared, {c.tensor_cores}"
                )
        except Exception as e:  # report every case, then fail
            failed += 1
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Generated kernels (forward and backward) compile for Hopper (sm_90) on a machine with no GPU.

The interpreter accepts code the GPU compiler may reject; Triton compiles to
PTX/SASS ahead of time for a named target, so CI catches that here. It runs in
a subprocess because TRITON_INTERPRET (set for the other tests) must be unset.
"""

import os
import subprocess
import sys

CODE = """
from attncc.ir import Grid, axial, causal, global_tokens, neighborhood, sliding_window, strided
from attncc.lower.aot import compile_plan
from attncc.lower.lowering import LaunchConfig, lower

cases = [
    (neighborhood(15, dilation=2), (64, 64), "bfloat16", 128),  # one term, split full loop
    (axial() | neighborhood(5), (64, 64), "float16", 64),  # several terms
    (sliding_window(63) | (strided(64) & causal()), (2048,), "bfloat16", 64),  # congruence
    (sliding_window(63) | global_tokens([0]), (2048,), "bfloat16", 256),  # table
    (causal(), (1000,), "float32", 32),  # fp32 dots in IEEE
]
for pattern, grid, dtype, d in cases:
    plan = lower(pattern, Grid(grid), d, dtype, config=LaunchConfig.default("cuda", d))
    for name, c in compile_plan(plan).items():
        assert c.shared_bytes <= 227 * 1024, (name, c)
        assert c.tensor_cores in (("none",) if dtype == "float32" else ("wgmma", "mma")), (name, c)
        print(plan.iteration, dtype, name, c)
"""


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", CODE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.count("\n") == 15

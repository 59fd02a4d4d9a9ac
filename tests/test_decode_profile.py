"""The decode kernels' sm_90 machine code, compiled as a launch compiles them, with no GPU (issue 16
part 2): no spill, no ptxas warning, and a KV loop that is software-pipelined (cp.async) with no
branch in its body, for the 128K-key causal case of the benchmark, a list plan and a paged cache.
In a subprocess: TRITON_INTERPRET, set for the other tests, makes kernels the compiler cannot take.
"""

import json
import os
import subprocess
import sys

CODE = """
import json, sys
from attncc.ir import block_mask, causal, key_range, sliding_window
from attncc.machine.decode import decode_profile, problems

cases = {
    "causal-128k": decode_profile(causal(), 131072),
    "sinks-128k": decode_profile(sliding_window(4095) | key_range(0, hi=3), 131072),
    "block-mask-32k-lq5": decode_profile(block_mask(64) & causal(), 32768, 8, 32, 8, 5),
    "causal-32k-paged16": decode_profile(causal(), 32768, page=16),
}
out = {}
for name, p in cases.items():
    kv = p.kernels[0].loop("kv")
    out[name] = {"problems": problems(p), "splits": p.splits, "kv": kv and [kv.loads, kv.mma]}
json.dump(out, sys.stdout)
"""


def test_decode_kernels_compile_cleanly_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton >= 3.9 warns while it is unset
    proc = subprocess.run(
        [sys.executable, "-c", CODE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    found = json.loads(proc.stdout)
    for name, case in found.items():
        assert case["problems"] == [], name
        loads, mma = case["kv"]
        assert loads == "cp.async" and mma > 0, name
    assert found["causal-128k"]["splits"] >= 132  # Note [Split count]: every SM streams


def test_a_section_replaces_its_own_title_only(tmp_path):
    from attncc.machine.report import write_section

    path = tmp_path / "STATIC.md"
    path.write_text("# Static\n\n## A, triton 3.6.0\n\nold a\n\n## B, triton 3.6.0\n\nold b\n")
    write_section(path, "## A, triton 3.6.0\n\nnew a\n")
    write_section(path, "## A, triton 3.9.0\n\nnew a 3.9\n")
    assert path.read_text() == (
        "# Static\n\n## A, triton 3.6.0\n\nnew a\n\n## B, triton 3.6.0\n\nold b\n\n## A, triton 3.9.0\n\nnew a 3.9\n"
    )

"""The segments kernels' sm_90 machine code, compiled as a launch compiles them, with no GPU
(issue 16 part 4; attncc.machine.segments): three kernels (forward, dQ, dK/dV) with no spill and
no ptxas warning, whose loops are those the template marks, the tensor-core ones with MMAs. In a
subprocess: TRITON_INTERPRET, set for the other tests, makes kernels the compiler cannot take.
"""

import json
import os
import subprocess
import sys

CODE = """
import json, sys
from attncc.ir import by_segments, dense, neighborhood, segments
from attncc.machine.segments import problems, segments_profile

pattern = by_segments(
    segments(text=5, img=(16, 16)),
    {("text", "*"): dense(), ("img", "img"): neighborhood(5), ("img", "text"): dense()},
)
p = segments_profile(pattern, heads=4, kv_heads=2, head_dim=64)
json.dump({"problems": problems(p), "visited": p.visited, "boxes": p.boxes,
           "kernels": {k.kernel: [[lp.name, lp.mma] for lp in k.loops] for k in p.kernels}}, sys.stdout)
"""


def test_segments_kernels_compile_cleanly_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton >= 3.9 warns while it is unset
    proc = subprocess.run(
        [sys.executable, "-c", CODE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    found = json.loads(proc.stdout)
    assert found["problems"] == []
    assert found["boxes"].startswith("text 64/64, img ")
    kernels = found["kernels"]
    assert sorted(kernels) == ["segments_dkdv_kernel", "segments_dq_kernel", "segments_fwd_kernel"]
    names = {name for loops in kernels.values() for name, _ in loops}
    assert {"full-0", "partial-2"} <= names and "?" not in names, names
    assert all(mma > 0 for name, mma in kernels["segments_fwd_kernel"] if name != "heads")


def test_inspect_takes_a_spec_of_segments(tmp_path):
    spec = tmp_path / "vit.yaml"
    spec.write_text(
        "segments: {cls: 1, img: [8, 8]}\npattern:\n  'cls -> *': dense()\n  'img -> img': neighborhood(3)\n"
        "heads: 2\nhead_dim: 32\ndtype: float16\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    args = [sys.executable, "-m", "attncc", "inspect", str(spec), "--json", str(tmp_path / "p.json")]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "segments_fwd_kernel" in proc.stdout and "cls 64/64, img 8x8/8x8" in proc.stdout
    assert json.loads((tmp_path / "p.json").read_text())["shape"] == [1, 2, 2, 65]
    bad = subprocess.run(
        [*args[:5], "--shape", "1,2,65"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--shape = '1,2,65'" in bad.stderr

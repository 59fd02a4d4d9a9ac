"""The sm_90 machine code of the kernels, compiled as a launch compiles them, with no GPU (issue 15).

attncc.machine compiles every kernel a case launches (forward, dQ, dK/dV) for sm_90 with
Triton's own binder and reads its SASS: CI fails on a spill, a ptxas warning, a tile
loop that is not software-pipelined, a partial-tile loop over 1.5x its full-tile loop, or
a static estimate (Note [Issue model]) under its target. It runs in a subprocess because
TRITON_INTERPRET, set for the other tests, makes kernels the compiler cannot take. No
timing: every figure is read from the compiler's output.
"""

import json
import os
import subprocess
import sys

import pytest

CODE = """
import json, sys
from attncc.ir import Grid, axial, causal, dense, global_tokens, neighborhood, sliding_window, strided
from attncc.machine import profile, tile_ratio
from attncc.machine.report import problems

cases = {
    # the issue3 shapes (B=1, H=16, D=128, bf16) with the targets of issue 15
    "dense": (dense(), (16384,), "bfloat16", 128, True),
    "causal": (causal(), (16384,), "bfloat16", 128, True),
    "na2d-w31": (neighborhood(31), (128, 128), "bfloat16", 128, True),
    "na3d": (neighborhood((7, 15, 15)), (16, 48, 48), "bfloat16", 128, False),
    # other plan shapes: they must compile cleanly, with no estimate target
    "na2d-d2-fp16-d64": (neighborhood(15, dilation=2), (64, 64), "float16", 64, True),
    "axial-or-na": (axial() | neighborhood(5), (64, 64), "float16", 64, True),
    "congruence": (sliding_window(63) | (strided(64) & causal()), (2048,), "bfloat16", 64, True),
    "table": (sliding_window(63) | global_tokens([0]), (2048,), "bfloat16", 128, True),
    "fp32": (causal(), (1000,), "float32", 32, True),
    # queries over a box of the grid (issue 16: a chunk of a prefill; the last frames of a video)
    "causal-chunk": (causal(), (16384,), "bfloat16", 128, True, (4096,)),
    "na3d-last-frames": (neighborhood((7, 15, 15), causal=(True, False, False)), (16, 48, 48), "bfloat16", 128,
                         False, (2, 48, 48)),
}
out = {}
for name, (pattern, grid, dtype, d, backward, *region) in cases.items():
    region = region[0] if region else None
    p = profile(pattern, Grid(grid), 1, 16, d, dtype, backward=backward, name=name, region=region)
    out[name] = {
        "forward": p.forward_estimate,
        "backward": p.backward_estimate,
        "problems": [f"{k.kernel}: {x}" for k in p.kernels for x in problems(k)],
        "ratios": {k.kernel: tile_ratio(k) for k in p.kernels},
        "unmatched": [k.unmatched for k in p.kernels if k.unmatched],
        "loops": {k.kernel: [(lp.name, lp.instructions, lp.loads) for lp in k.loops] for k in p.kernels},
    }
# The autotuner's cost model reads the same figures (attncc.machine.counts, cached).
from attncc.lower.lowering import LaunchConfig, lower
from attncc.machine.counts import forward_instructions

pattern, grid = neighborhood(31), Grid((128, 128))
plan = lower(pattern, grid, 128, "bfloat16", config=LaunchConfig.default("cuda", 128))
counts = forward_instructions(pattern, grid, plan)
again = forward_instructions(pattern, grid, plan) == counts
counts = {"full": counts.full, "partial": list(counts.partial), "again": again}
json.dump({"profiles": out, "counts": counts}, sys.stdout)
"""

# Note [Issue model] estimates (1 = tensor-bound on every visited tile); issue 15's targets.
# A region's kernels keep their tile loops (Note [Walks of a region]): the same targets.
FORWARD = {"dense": 0.95, "causal": 0.95, "na2d-w31": 0.85, "na3d": 0.85, "causal-chunk": 0.95,
           "na3d-last-frames": 0.85}  # fmt: skip
BACKWARD = {"dense": 0.75, "causal": 0.75, "na2d-w31": 0.75, "causal-chunk": 0.75}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton >= 3.9 warns while it is unset
    proc = subprocess.run(
        [sys.executable, "-c", CODE], cwd=tmp_path_factory.mktemp("sm90"), env=env, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def profiles(compiled):
    return compiled["profiles"]


def test_every_kernel_compiles_without_spills_or_warnings_and_pipelines(profiles):
    for name, p in profiles.items():
        assert not p["problems"], (name, p["problems"])  # fp32 (IEEE dots on the FMA pipes) included, at D=32
        assert not p["unmatched"], (name, p["unmatched"])
        for kernel, loops in p["loops"].items():
            assert loops, (name, kernel, "no tile loop found")
            assert all(loads in ("cp.async", "tma") for _, _, loads in loops), (name, kernel, loops)


@pytest.mark.parametrize("name", sorted(FORWARD))
def test_forward_estimate_meets_its_target(profiles, name):
    assert profiles[name]["forward"] >= FORWARD[name], profiles[name]


@pytest.mark.parametrize("name", sorted(BACKWARD))
def test_backward_estimate_meets_its_target(profiles, name):
    assert profiles[name]["backward"] >= BACKWARD[name], profiles[name]


def test_partial_tiles_cost_at_most_half_again_a_full_tile(profiles):
    for name in FORWARD:
        for kernel, ratio in profiles[name]["ratios"].items():
            if ratio is not None:
                assert ratio <= 1.5, (name, kernel, ratio)


def test_cost_model_reads_the_loops_the_profile_reads(compiled):
    loops = {name: n for name, n, _ in compiled["profiles"]["na2d-w31"]["loops"]["attention_fwd_kernel"]}
    counts = compiled["counts"]
    assert counts["full"] == loops["full"] and counts["partial"] == [loops["partial"]]
    assert counts["again"]  # the second read comes from the cache record


def test_inspect_command_prints_and_writes_the_profile(specs_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / "na1d.json"
    proc = subprocess.run(
        [sys.executable, "-m", "attncc", "inspect", str(specs_dir / "na1d.yaml"), "--forward-only",
         "--shape", "1,4,4096", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "na1d: B=1 H=4 grid 4096 D=128 bfloat16 on sm_90" in proc.stdout
    assert "cp.async" in proc.stdout and "partial" in proc.stdout
    (case,) = json.loads(out.read_text())
    fwd = case["kernels"][0]
    assert fwd["kernel"] == "attention_fwd_kernel" and fwd["spill_bytes"] == 0
    assert [loop["name"] for loop in fwd["loops"]] == ["full", "partial"]
    assert 0 < case["forward_estimate"] <= 1


def test_inspect_refuses_the_interpreter(specs_dir, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "attncc", "inspect", str(specs_dir / "na1d.yaml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "TRITON_INTERPRET = 1 is set; allowed: unset" in proc.stderr


def test_measured_efficiency_is_written_beside_the_estimate(tmp_path):
    # The last step of `gpu_check.sh smoke` (benchmarks/static_vs_measured.py), on a bench JSON
    # shaped as attncc.bench.report writes it: ideal time = the visited tiles' tensor time at the
    # H100's dense peak, measured efficiency = ideal / median.
    bench = {
        "environment": {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-01T00:00:00+00:00"},
        "results": [{
            "case": {"name": "na2d-w7", "pattern": "neighborhood(window=7)", "grid": [32, 32], "heads": 2,
                     "head_dim": 64, "dtype": "bfloat16", "batch": 1},
            "entries": [{"peer": "attncc", "status": "ok", "median_ms": 0.0123}],
        }],
    }  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "static_vs_measured.py")
    proc = subprocess.run(
        [sys.executable, script, "bench.json", "--markdown", "RESULTS.md"],
        cwd=tmp_path, env={**env, "TRITON_DEFAULT_FP_FUSION": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = next(line for line in (tmp_path / "RESULTS.md").read_text().splitlines() if "na2d-w7" in line)
    _, _, tiles, ms, ideal, measured, estimate, ratio, _ = (cell.strip() for cell in row.split("|"))
    assert ms == "0.0123" and tiles == "q 4x32 kv 2x32"
    assert float(measured) == pytest.approx(float(ideal) / 0.0123, rel=1e-3, abs=0.005)
    assert 0 < float(estimate) <= 1 and float(ratio) == pytest.approx(
        float(measured) / float(estimate), abs=0.02
    )


def test_the_score_terms_part_of_a_section_is_replaced_in_place():
    """`static_profile.py --terms-only` rewrites the terms part of its triton's section alone."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "static_profile.py")
    spec = importlib.util.spec_from_file_location("static_profile", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    heading = script.TERMS_HEADING
    old = f"## triton 3.6.0\n\nfigures\n\n{heading}\n\nold table\n\n### CUTLASS forward\n\ncutlass\n"
    new = script.splice_terms(old, f"{heading}\n\nnew table\n")
    assert new == f"## triton 3.6.0\n\nfigures\n\n{heading}\n\nnew table\n\n### CUTLASS forward\n\ncutlass\n"
    assert script.splice_terms("## triton 3.9.0\n", "T\n") == "## triton 3.9.0\n\nT\n"

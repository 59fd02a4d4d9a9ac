"""`attncc bench`, `tune` and `inspect` take a spec whose score has terms (issue 17): each builds
the kernels of that score (never plain softmax kernels for a capped spec) with term tensors of
the right shapes. Timings under the interpreter mean nothing; what is checked is that the
commands run the terms and say so.
"""

import json
import os
import subprocess
import sys

from click.testing import CliRunner

import attncc
from attncc.autotune.records import TuningKey, tuned_config
from attncc.autotune.tuner import tune
from attncc.cli import cli
from attncc.ir import Grid, neighborhood

SPEC = "pattern: {pattern}\ngrid: {grid}\nheads: 2\nhead_dim: {d}\ndtype: {dtype}\nscore: {score}\n"


def _spec(tmp_path, score: str, pattern="neighborhood(window=3)", grid="[6, 8]", d=16, dtype="float32"):
    path = tmp_path / "terms.yaml"
    path.write_text(SPEC.format(pattern=pattern, grid=grid, d=d, dtype=dtype, score=score))
    return str(path)


def test_bench_runs_a_spec_with_terms_and_dropout(tmp_path):
    spec = _spec(tmp_path, "softcap(3.0) + key_bias + dropout")
    out = tmp_path / "r.json"
    args = ["bench", spec, "--peers", "flex", "--runs", "1", "--warmup", "0", "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    (r,) = json.loads(out.read_text())["results"]
    assert r["case"]["score"] == "softcap(3.0) + key_bias + dropout"
    ours, flex = r["entries"]
    assert ours["status"] == "ok" and ours["median_ms"] > 0
    assert flex["status"] == "declined" and flex["reason"] == "has no dropout"


def test_tune_times_candidates_with_term_tensors_and_records_the_forward_form(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    spec = _spec(tmp_path, "softcap(3.0) + rel_pos_bias(5, 5) + dropout")
    args = ["tune", spec, "--top", "1", "--runs", "1", "--warmup", "0", "--rows", "2", "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--no-save"])
    assert result.exit_code == 0, result.output
    assert "score softcap(3.0) + rel_pos_bias(5, 5) + dropout, on cpu" in result.output
    assert "best: " in result.output and "inf" not in result.output  # the candidate ran, with its terms
    # A record serves the calls that learn the table: the key holds the forward's form.
    grid = Grid((6, 8))
    score = "softcap(3.0) + rel_pos_bias(5, 5)"
    tuned = tune(
        neighborhood(3),
        grid,
        1,
        2,
        16,
        "float32",
        "cpu",
        top=1,
        score=score,
        warmup=0,
        runs=1,
        progress=False,
    )
    learned = "softcap(3.0) + rel_pos_bias(5, 5, grad=True)"
    assert TuningKey.of(neighborhood(3), grid, 2, 16, "float32", learned, "cpu") == tuned.key
    assert tuned_config(neighborhood(3), grid, 2, 16, "float32", learned, "cpu") == tuned.record.config
    attncc.runtime.library.forget_kernels()  # later calls look for records again


def test_inspect_profiles_the_fused_term_kernels(tmp_path):
    spec = _spec(
        tmp_path, "softcap(30.0) + rel_pos_bias(5, 5) + key_bias", grid="[16, 16]", d=64, dtype="bfloat16"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / "p.json"
    proc = subprocess.run(
        [sys.executable, "-m", "attncc", "inspect", spec, "--forward-only", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "bfloat16 softcap(30.0) + rel_pos_bias(5, 5) + key_bias on sm_90" in proc.stdout
    (profile,) = json.loads(out.read_text())
    assert profile["score"] == "softcap(30.0) + rel_pos_bias(5, 5) + key_bias"
    (fwd,) = profile["kernels"]
    assert fwd["loops"] and fwd["registers"] > 0 and 0 < profile["forward_estimate"] <= 1

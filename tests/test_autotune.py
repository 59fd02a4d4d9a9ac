"""The autotuner: search space, cost model, tuning records, `attncc tune` and the op's use of records.

Timing runs here only as a harness test (Triton's interpreter on the CPU at tiny
shapes); no figure is asserted.
"""

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import attncc.runtime.library
import attncc.runtime.ops
from attncc.autotune import records, tuner
from attncc.autotune.constants import KERNEL
from attncc.autotune.cost import TileCounts, device_spec, predict, registers, resident, shared_bytes
from attncc.autotune.records import TuningKey, TuningRecord, load_record, save_record
from attncc.autotune.space import rank, search_space
from attncc.cli import cli
from attncc.errors import TuneError
from attncc.ir import Grid, axial, block_sparse, causal, global_tokens, neighborhood, per_head, sliding_window
from attncc.ir.canonical import canonicalize
from attncc.lower import cutlass as cutlass_lowering
from attncc.lower.lowering import LaunchConfig, lower
from attncc.reference import attention as reference
from attncc.runtime import cache, cutlass_kernel

H100 = device_spec("NVIDIA H100 80GB HBM3")

SPACES = [
    ("na2d", neighborhood(7), Grid((20, 24)), 64, "float16"),
    ("na2d-dilated", neighborhood(5, dilation=2), Grid((30, 31)), 128, "bfloat16"),
    ("na3d-causal-t", neighborhood((3, 5, 5), causal=(True, False, False)), Grid((6, 20, 21)), 64, "float16"),
    ("band", sliding_window(100, 0), Grid((700,)), 128, "bfloat16"),
    ("axial-two-terms", axial(), Grid((30, 41)), 32, "float32"),
    ("table", sliding_window(20) | global_tokens([0, 5]), Grid((300,)), 64, "float16"),
]


@pytest.mark.parametrize("name,pattern,grid,head_dim,dtype", SPACES, ids=[s[0] for s in SPACES])
def test_every_candidate_lowers_to_its_plan_and_fits(name, pattern, grid, head_dim, dtype):
    space = search_space(pattern, grid, head_dim, dtype, H100)
    assert len(space) > 1
    assert space[0][1] == lower(
        pattern, grid, head_dim, dtype, config=LaunchConfig.default("cuda", head_dim, dtype)
    )
    keys = set()
    for i, (config, plan) in enumerate(space):
        for box, block in ((config.q_box, config.q_block), (config.kv_box, config.kv_block)):
            assert all(v & (v - 1) == 0 for v in box) and math.prod(box) == block
        assert shared_bytes(plan) <= H100.smem_per_block and registers(plan) <= KERNEL.max_registers
        keys.add((config.q_box, config.kv_box, config.num_warps, config.num_stages))
        if i % 5 == 0:  # lowering is sympy work: every fifth candidate, and the default
            assert lower(pattern, grid, head_dim, dtype, config=config) == plan
    assert len(keys) == len(space)  # no candidate twice


def test_space_respects_head_dim_and_register_limits():
    p, g = neighborhood(7), Grid((64, 64))
    small = search_space(p, g, 32, "float16", H100)
    large = search_space(p, g, 256, "float32", H100)
    assert len(large) < len(small)
    # fp32, D=256: a 256-token Q tile alone takes 256 KB of shared memory
    assert all(c.q_block < 256 for c, _ in large)
    # bf16, D=128: 128x64 tiles with 4 warps would need 304 registers per thread (the GPU default uses 8)
    mid = search_space(p, g, 128, "bfloat16", H100)
    assert not [c for c, _ in mid if (c.q_block, c.kv_block, c.num_warps) == (128, 64, 4)]
    assert [c for c, _ in mid if (c.q_block, c.kv_block, c.num_warps) == (128, 64, 8)]


SM90_CODE = """
from attncc.autotune.cost import shared_bytes
from attncc.ir import Grid, neighborhood
from attncc.lower.lowering import LaunchConfig, lower
from attncc.machine import profile

for dtype, d, config in [
    ("bfloat16", 128, LaunchConfig(128, 64, 8, 3)),
    ("float16", 64, LaunchConfig(64, 128, 4, 2)),
    ("float32", 64, LaunchConfig(64, 32, 4, 2)),
]:
    plan = lower(neighborhood(15), Grid((64, 64)), d, dtype, config=config)
    fwd = profile(neighborhood(15), Grid((64, 64)), 1, 4, d, dtype, backward=False, config=config).kernels[0]
    print(dtype, shared_bytes(plan), fwd.shared_bytes)
"""


def test_shared_memory_estimate_matches_the_sm90_compiler(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", SM90_CODE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["bfloat16", "float16", "float32"]
    for line in lines:
        _, estimate, compiled = line.split()
        assert abs(int(estimate) - int(compiled)) <= 0.02 * int(compiled), line


def _plan(grid=(4096,), q=(1, 1, 128), kv=(1, 1, 64), warps=8):
    config = LaunchConfig(math.prod(q), math.prod(kv), warps, 2, q, kv)
    return lower(causal(), Grid(grid), 128, "bfloat16", config=config)


def _counts(plan, visited, full):
    n = math.prod(plan.q_tiles())
    return TileCounts(np.full(n, visited), np.full(n, full))


def test_fewer_visited_tiles_predict_less_time():
    plan = _plan()
    times = [predict(plan, _counts(plan, v, v // 2), 16, H100).us for v in (4, 8, 16, 32)]
    assert times == sorted(times) and len(set(times)) == 4
    # the same config on real patterns: a smaller window visits fewer tiles
    config = LaunchConfig(128, 64, 8, 2, (1, 8, 16), (1, 8, 8))
    small, large = (lower(neighborhood(w), Grid((64, 64)), 128, "bfloat16", config=config) for w in (7, 31))
    p_small = predict(small, TileCounts.of(small, neighborhood(7), Grid((64, 64))), 16, H100)
    p_large = predict(large, TileCounts.of(large, neighborhood(31), Grid((64, 64))), 16, H100)
    assert p_small.visited < p_large.visited and p_small.us < p_large.us


def test_partial_tiles_cost_more_than_full_ones():
    plan = _plan()
    times = [predict(plan, _counts(plan, 16, full), 16, H100).us for full in (16, 12, 8, 0)]
    assert times == sorted(times) and len(set(times)) == 4


def test_wave_quantisation():
    plan = _plan(grid=(128,))  # one Q tile per head: programs = batch x heads
    per_sm = resident(plan, H100)
    slots = H100.sms * per_sm

    def at(batch_heads):
        return predict(plan, _counts(plan, 400, 200), batch_heads, H100)

    one, full, over = at(1), at(H100.sms), at(H100.sms + 1)
    assert full.us == pytest.approx(one.us, rel=0.01)  # a program per SM: the time of one program
    assert over.us > 1.8 * full.us  # one more program: a second program's time on one SM
    assert (at(slots).waves, at(slots + 1).waves) == (1, 2)


def test_ranking_is_deterministic_and_sorted():
    args = (neighborhood((3, 7, 7)), Grid((8, 24, 24)), 16, 128, "bfloat16", H100)
    first, again = rank(*args), rank(*args)
    assert [(r.config, r.prediction) for r in first] == [(r.config, r.prediction) for r in again]
    assert [r.rank for r in first] == list(range(1, len(first) + 1))
    assert [r.prediction.us for r in first] == sorted(r.prediction.us for r in first)
    assert sum(r.is_default for r in first) == 1


@pytest.mark.parametrize(
    "name,sms,expected",
    [
        ("NVIDIA H100 80GB HBM3", None, ("H100 SXM", 132, 3.35)),
        ("NVIDIA H200", None, ("H200", 132, 4.8)),
        ("NVIDIA H100 PCIe", None, ("H100 PCIe", 114, 2.0)),
        ("NVIDIA GeForce RTX 4090", 128, ("NVIDIA GeForce RTX 4090", 128, 3.35)),
    ],
    ids=["h100", "h200", "h100-pcie", "unknown-with-sms"],
)
def test_device_table(name, sms, expected):
    spec = device_spec(name, sms)
    assert (spec.name, spec.sms, spec.hbm_tbps) == expected


def test_bad_tuning_requests_are_refused():
    with pytest.raises(TuneError, match=r"device = 'NVIDIA Mystery'.*H200"):
        device_spec("NVIDIA Mystery")
    with pytest.raises(TuneError, match=r"batch_heads = 0.*>= 1"):
        rank(causal(), Grid((64,)), 0, 64, "float16", H100)
    with pytest.raises(TuneError, match=r"top = 0.*>= 1"):
        tuner.tune(causal(), Grid((64,)), 1, 1, 16, "float32", "cpu", top=0)
    with pytest.raises(TuneError, match=r"pattern = 'per_head\(...\)'.*head-independent"):
        tuner.tune(per_head([causal(), causal()]), Grid((64,)), 1, 2, 16, "float32", "cpu")


# --- records ------------------------------------------------------------------------------


def _record(pattern=None, versions=None):
    key = TuningKey.of(pattern or neighborhood(3), Grid((8, 8)), 2, 16, "float32", "softmax", "cpu")
    if versions:
        key = dataclasses.replace(key, versions=versions)
    config = LaunchConfig(32, 32, 4, 3, (1, 4, 8), (1, 8, 4))  # not the default 64/64
    return TuningRecord(key, config, 12.5, 10.0, 2, 4, 1.5)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    _clear()  # records are read when a kernel is first built
    yield tmp_path
    _clear()


def _clear():
    attncc.runtime.library.forget_kernels()
    cache.forget()


def test_record_round_trip_and_versions(cache_dir):
    record = _record()
    path = save_record(record)
    assert path.parent.parent == cache_dir / "tuning"  # a cache entry of kind "tuning"
    assert load_record(record.key) == record
    cache.forget()  # as a new process: read back from disk
    assert load_record(record.key) == record
    other = _record(versions=(("attncc", "0.0.0"), ("torch", "1"), ("triton", "1")))
    assert load_record(other.key) is None  # another version's record is never used


@pytest.mark.parametrize(
    "damage",
    [lambda text: text[: len(text) // 2], lambda text: text.replace('"num_warps": 4', '"num_warps": 5')],
    ids=["truncated", "edited"],
)
def test_damaged_record_is_ignored_with_a_warning(cache_dir, damage):
    record = _record()
    path = save_record(record)
    path.write_text(damage(path.read_text()))
    cache.forget()
    with pytest.warns(UserWarning, match="corrupt"):
        assert load_record(record.key) is None


@pytest.mark.parametrize(
    "edit",
    [lambda d: d.pop("measured_us"), lambda d: d["config"].update(num_warps=5)],
    ids=["missing-field", "bad-config"],
)
def test_malformed_record_is_ignored_with_a_warning(cache_dir, edit):
    record = _record()
    data = records._plain(record)
    edit(data)
    cache.put_record(records.KIND, records._plain(record.key), data)  # intact entry, bad content
    with pytest.warns(UserWarning, match="malformed"):
        assert load_record(record.key) is None


def test_record_under_another_key_is_ignored(cache_dir):
    a, b = _record(), _record(pattern=neighborhood(5))
    cache.put_record(records.KIND, records._plain(a.key), records._plain(b))  # b's content under a's key
    with pytest.warns(UserWarning, match="another key"):
        assert load_record(a.key) is None


def test_attention_uses_a_stored_record(cache_dir):
    grid = Grid((8, 8))
    record = _record()
    save_record(record)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    out = attncc.attention(q, k, v, neighborhood(3), grid=grid)
    torch.testing.assert_close(out, reference(q, k, v, neighborhood(3), grid=grid), atol=1e-5, rtol=0)
    module = attncc.runtime.ops.compiled(
        canonicalize(neighborhood(3), grid), grid, 16, "float32", "cpu", "softmax", 2
    ).module
    assert (module.TQ1.value, module.TQ2.value, module.TK1.value, module.TK2.value) == (4, 8, 8, 4)
    assert (module.NUM_WARPS, module.NUM_STAGES) == (4, 3)


# --- tuning on the CPU (the harness, under the interpreter) ------------------------------------


def test_failed_candidate_scores_as_infinitely_slow(monkeypatch, cache_dir):
    real_load, calls = tuner.load, []

    def flaky(plan):
        calls.append(plan)
        if len(calls) == 1:
            raise RuntimeError("out of resources: shared memory")
        return real_load(plan)

    monkeypatch.setattr(tuner, "load", flaky)
    result = tuner.tune(
        neighborhood(3),
        Grid((8, 8)),
        1,
        1,
        16,
        "float32",
        "cpu",
        top=2,
        runs=1,
        warmup=0,
        save=False,
        progress=False,
    )
    first, second = result.trials[:2]
    assert first.measured_us == math.inf and "out of resources" in first.error
    assert result.best is second and result.record.model_rank == 2 and result.record.candidates == 2
    assert math.isnan(result.trials[2].measured_us)  # ranked, not timed
    assert not (cache_dir / "tuning").exists()


def test_cli_tune_on_cpu_prints_the_ranked_table_and_saves_the_record(cache_dir):
    spec = cache_dir / "na.yaml"
    spec.write_text("pattern: neighborhood(window=3)\ngrid: [8, 8]\nheads: 2\nhead_dim: 16\ndtype: float32\n")
    args = [
        "tune",
        str(spec),
        "--shape",
        "1,2,8,8",
        "--top",
        "2",
        "--runs",
        "2",
        "--warmup",
        "1",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    for column in ("rank", "candidate", "predicted us", "measured us"):
        assert column in result.output
    assert "best: q" in result.output and "record saved" in result.output
    key = TuningKey.of(neighborhood(3), Grid((8, 8)), 2, 16, "float32", "softmax", "cpu")
    record = load_record(key)
    assert record is not None and record.candidates == 2 and record.model_rank in (1, 2)
    lines = [line for line in result.output.splitlines() if line.startswith("│")]
    assert lines[record.model_rank - 1].split("│")[2].strip() in result.output.split("best: ")[1]


def test_cli_tune_bad_shape_is_one_error_line(tmp_path, specs_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "attncc", "tune", str(specs_dir / "na2d.yaml"), "--shape", "1,16"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("attncc: error: --shape = '1,16'")


def test_analyze_shows_the_model_pick(specs_dir):
    result = CliRunner().invoke(cli, ["analyze", str(specs_dir / "na2d.yaml")])
    assert result.exit_code == 0, result.output
    text = result.output.split("cost model (H100 SXM, 132 SMs")[1]
    assert "16 heads: pick q" in text and " us (" in text and "default q" in text
    predicted = float(text.split("predicted ")[1].split(" us")[0].replace(",", ""))
    assert predicted > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tune_on_the_gpu_records_the_fastest_and_attention_uses_it(cache_dir):
    p, grid = neighborhood(7), Grid((32, 32))
    result = tuner.tune(p, grid, 1, 2, 64, "bfloat16", "cuda", top=3, runs=5, warmup=2, progress=False)
    timed = [t for t in result.trials if t.timing]
    assert len(timed) == 3 and result.best.measured_us == min(t.measured_us for t in timed)
    assert load_record(result.key) == result.record
    q, k, v = (torch.randn(1, 2, grid.size, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = attncc.attention(q, k, v, p, grid=grid)
    module = attncc.runtime.ops.compiled(
        canonicalize(p, grid), grid, 64, "bfloat16", "cuda", "softmax", 2
    ).module
    assert (module.NUM_WARPS, module.BLOCK_M.value) == (
        result.record.config.num_warps,
        result.record.config.q_block,
    )
    torch.testing.assert_close(out.float(), reference(q, k, v, p, grid=grid).float(), atol=1.5e-2, rtol=0)


def test_cutlass_candidate_with_a_table_too_large_is_an_error_not_a_crash(monkeypatch, cache_dir):
    """Refused at plan time (here: any table), the CUTLASS candidates score as failed; Triton wins."""
    monkeypatch.setattr(tuner, "_cutlass_here", lambda device: True)
    monkeypatch.setattr(cutlass_lowering, "MAX_TABLE", 1)
    cutlass_kernel.plan_for.cache_clear()
    pattern = block_sparse([[1, 0], [1, 1]], 100)
    result = tuner.tune(
        pattern, Grid((200,)), 1, 1, 64, "float16", "cpu", top=1, runs=1, warmup=0, save=False, progress=False
    )
    cutlass_kernel.plan_for.cache_clear()
    failed = [t for t in result.trials if t.ranked.config.backend == "cutlass"]
    assert failed and all("table entries" in t.error for t in failed)
    assert result.best.ranked.config.backend == "triton" and not result.best.error

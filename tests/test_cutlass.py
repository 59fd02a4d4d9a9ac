"""The CUTLASS backend on a machine with no GPU.

Its plan header (token order, KV-tile walk, element rule) is host+device C++
with no CUTLASS dependency, so ``tests/cutlass/walk_check.cpp`` compiles it
with the system compiler and prints every visit and the whole keep matrix;
those are checked here against the brute-force mask of the reference
(:func:`attncc.ir.mask.mask`), mapped through the token order. The kernel
itself is rendered and compiled for sm_90a with nvcc against the
nvidia-cutlass headers (skipped only where nvcc or the wheel is absent), so a
template that does not compile fails CI; it runs only on a GPU
(``tests/test_cutlass_gpu.py``).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from attncc import settings
from attncc.autotune.cost import device_spec
from attncc.autotune.space import search_space
from attncc.errors import PatternError
from attncc.ir import (
    Grid,
    band,
    block_sparse,
    canonicalize,
    causal,
    dense,
    document,
    global_tokens,
    neighborhood,
    sliding_window,
    strided,
)
from attncc.ir.mask import mask
from attncc.lower import cutlass as cutlass_module
from attncc.lower.cutlass import BLOCK_NS as CUTLASS_BLOCK_NS
from attncc.lower.cutlass import cutlass_plan, kv_order, q_order, refusal, render_example, render_plan_header
from attncc.lower.lowering import LaunchConfig, lower
from attncc.lower.render import load
from attncc.runtime import nvcc, ops
from attncc.runtime.cutlass_kernel import build

HARNESS = Path(__file__).parent / "cutlass" / "walk_check.cpp"
CXX = shutil.which("c++") or shutil.which("g++")

# (pattern, grid, kv tokens per tile): shapes are not multiples of the tiles.
CASES = [
    (neighborhood(7), Grid((20, 22)), 64),
    (neighborhood(5, dilation=2), Grid((19, 23)), 64),
    (neighborhood((3, 5), dilation=(1, 3)), Grid((17, 25)), 128),
    (neighborhood((3, 5, 5), causal=(True, False, False)), Grid((5, 9, 12)), 64),
    (neighborhood((2, 4), causal=(False, True)), Grid((21, 18)), 64),  # even window, causal axis
    (causal(), Grid((300,)), 64),
    (sliding_window(40, 7), Grid((250,)), 128),
    (band(0, 3, 70), Grid((260,)), 64),  # keys past the diagonal: the last rows see no key
    (dense(), Grid((200,)), 64),
    (neighborhood(255, dilation=2), Grid((513,)), 128),  # groups of 257 and 256: group 1 has a Q tile of pads
    # Table plans (Note [Baked tables]): tiles from the exact analysis, the rule with lookups.
    (block_sparse([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]], 70), Grid((270,)), 64),
    (sliding_window(30) | global_tokens([0, 5, 99]), Grid((250,)), 128),
    (document([0] * 90 + [1] * 7 + [2] * 140), Grid((237,)), 64),
    (neighborhood(5) | global_tokens([0, 77, 300]), Grid((20, 22)), 64),  # a 2-D table plan
]


def _plan(pattern, grid, kv_block, dtype="float16", head_dim=64):
    pattern = canonicalize(pattern, grid)
    plan = lower(pattern, grid, head_dim, dtype, config=LaunchConfig(128, kv_block))
    return cutlass_plan(plan, pattern, grid)


def _expected_keep(cplan, pattern, grid) -> np.ndarray:
    """keep[q row, k row] in the permuted sequences: the reference mask where both rows are real."""
    m = mask(pattern, grid)[0].numpy()
    oq, ok = q_order(cplan), kv_order(cplan)
    keep = m[np.maximum(oq, 0)][:, np.maximum(ok, 0)]
    return keep & (oq >= 0)[:, None] & (ok >= 0)[None, :]


def _run_harness(cplan, tmp_path: Path) -> tuple[dict, dict, set, np.ndarray]:
    (tmp_path / "plan.cuh").write_text(render_plan_header(cplan))
    exe = tmp_path / "walk_check"
    subprocess.run([CXX, "-std=c++17", "-O1", f"-I{tmp_path}", str(HARNESS), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    visits: dict[int, list[tuple[int, bool, int]]] = {}
    counts: dict[int, tuple[int, int]] = {}
    empty, keep_rows = set(), []
    for line in out:
        kind, *rest = line.split()
        if kind == "T":
            visits.setdefault(int(rest[0]), []).append((int(rest[1]), rest[2] == "1", int(rest[3])))
        elif kind == "C":
            counts[int(rest[0])] = (int(rest[1]), int(rest[2]))
        elif kind == "E":
            empty.add(int(rest[0]))
        elif kind == "K":
            keep_rows.append(np.frombuffer(rest[1].encode(), dtype=np.uint8) == ord("1"))
        else:
            assert (int(rest[0]), int(rest[1])) == (cplan.rows_q, cplan.rows_k)
    return visits, counts, empty, np.stack(keep_rows)


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
@pytest.mark.parametrize(("pattern", "grid", "kv_block"), CASES, ids=[f"{p}-{g.shape}" for p, g, _ in CASES])
def test_walk_and_rule_match_the_reference(pattern, grid, kv_block, tmp_path):
    cplan = _plan(pattern, grid, kv_block)
    plan = cplan.plan
    visits, counts, empty, keep = _run_harness(cplan, tmp_path)
    expected = _expected_keep(cplan, pattern, grid)
    # The element rule of partial tiles is exactly the reference mask, pads excluded.
    np.testing.assert_array_equal(keep, expected)

    q_tiles, kv_tiles = cplan.rows_q // plan.block_m, cplan.rows_k // plan.block_n
    per_pair = expected.reshape(q_tiles, plan.block_m, kv_tiles, plan.block_n)
    nonempty = per_pair.any(axis=(1, 3))
    real_q = (q_order(cplan) >= 0).reshape(q_tiles, plan.block_m)
    real_k = (kv_order(cplan) >= 0).reshape(kv_tiles, plan.block_n)
    for m in range(q_tiles):
        # The producer loads as many tiles as the consumers' two loops take, in the same order.
        unmasked_count, masked_count = counts[m]
        seq = visits[m]
        assert unmasked_count >= 0 and masked_count >= 0 and unmasked_count + masked_count == len(seq)
        assert [masked for _, masked, _ in seq] == [False] * unmasked_count + [True] * masked_count
        if m in empty:  # one tile is still loaded, and the rule sees rows past the end: all masked
            assert not nonempty[m].any() and counts[m] == (0, 1) and seq[0][2] == cplan.rows_k
            continue
        assert all(row == t * plan.block_n for t, _, row in seq)
        tiles = [t for t, _, _ in seq]
        assert len(tiles) == len(set(tiles)), f"Q tile {m} visits a KV tile twice"
        # The kernel visits exactly the KV tiles that hold a kept pair, no more.
        assert set(tiles) == set(np.flatnonzero(nonempty[m])), f"Q tile {m}"
        unmasked = {t for t, masked, _ in seq if not masked}
        for t in unmasked:  # a full tile: every real row keeps every key, all keys are real
            assert real_k[t].all()
            assert per_pair[m, real_q[m], t].all(), f"Q tile {m} KV tile {t} is not full"
        if real_q[m].all():  # and every full tile of a tile of real rows runs unmasked
            full = per_pair[m].all(axis=0).all(axis=1) & real_k.all(axis=1)
            assert unmasked == set(np.flatnonzero(full)), f"Q tile {m}"


def test_token_order_is_a_permutation_with_pads():
    cplan = _plan(neighborhood(5, dilation=2), Grid((19, 23)), 64)
    for order in (q_order(cplan), kv_order(cplan)):
        real = order[order >= 0]
        assert sorted(real.tolist()) == list(range(19 * 23))


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        (dict(dtype="float32"), "float16 or bfloat16"),
        (dict(head_dim=96), "head_dim 96"),
        (dict(pattern=sliding_window(15, 0) | (strided(16, 3) & causal()), grid=Grid((150,))), "union"),
        (dict(pattern=strided(16, 3), grid=Grid((150,))), "strided"),
        (dict(score="sigmoid"), "sigmoid"),
        (dict(kv_block=32), "128x64/128"),
    ],
)
def test_refusals_say_why(kwargs, reason):
    args = dict(pattern=neighborhood(7), grid=Grid((20, 22)), head_dim=64, dtype="float16", score="softmax")
    kv_block = kwargs.pop("kv_block", 64)
    args.update(kwargs)
    plan = lower(
        args["pattern"],
        args["grid"],
        args["head_dim"],
        args["dtype"],
        score=args["score"],
        config=LaunchConfig(128, kv_block),
    )
    assert reason in refusal(plan)
    with pytest.raises(PatternError, match="backend"):
        cutlass_plan(plan, args["pattern"], args["grid"])


def test_a_table_too_large_to_bake_is_refused(monkeypatch):
    monkeypatch.setattr(cutlass_module, "MAX_TABLE", 10)
    grid = Grid((250,))
    pattern = canonicalize(sliding_window(30) | global_tokens([0]), grid)
    plan = lower(pattern, grid, 64, "float16", config=LaunchConfig(128, 64))
    with pytest.raises(PatternError, match=r"backend = 'cutlass'.*table entries"):
        cutlass_plan(plan, pattern, grid)


# Kernels compiled with nvcc in CI (about a minute of one core each, built side by side): the
# bf16 D=128 128x128 path on a 2-D neighborhood, the fp16 D=64 128x64 path on a dilated one
# with a causal axis, a table plan, and the dense example the benchmark measures against.
BUILDS = {
    "na2d bf16 d128": (neighborhood(7), Grid((20, 22)), "bfloat16", 128, 128),
    "dilated causal fp16 d64": (
        neighborhood((3, 5), dilation=(1, 3), causal=(True, False)),
        Grid((17, 25)),
        "float16",
        64,
        64,
    ),
    "band+global table bf16 d64": (
        sliding_window(30) | global_tokens([0, 5, 99]),
        Grid((250,)),
        "bfloat16",
        64,
        64,
    ),
}
needs_nvcc = pytest.mark.skipif(
    nvcc.nvcc_path() is None or nvcc.cutlass_root() is None,
    reason="needs nvcc and the nvidia-cutlass headers",
)


@pytest.fixture(scope="module")
def built():
    plans = {name: _plan(p, g, kv, dtype, d) for name, (p, g, dtype, d, kv) in BUILDS.items()}
    with ThreadPoolExecutor(2) as pool:
        kernels = {name: pool.submit(build, cplan) for name, cplan in plans.items()}
        example = pool.submit(
            nvcc.build, render_example("bfloat16", 128, False), "example", {"example": "test"}
        )
        return {name: (plans[name], f.result()) for name, f in kernels.items()}, example.result()


@needs_nvcc
@pytest.mark.slow  # four nvcc builds of CUTLASS, about 190 s on 2 cores
@pytest.mark.parametrize("name", list(BUILDS))
def test_kernel_compiles_for_sm90a_with_its_abi(built, name):
    cplan, path = built[0][name]
    library = nvcc.load(path)
    # The host side of the built plan agrees with the Python plan it was rendered from.
    assert (library.attncc_rows_q(), library.attncc_rows_k()) == (cplan.rows_q, cplan.rows_k)
    for symbol in ("attncc_fwd", "attncc_error"):
        assert hasattr(library, symbol)
    library.attncc_error.restype = ctypes.c_char_p
    assert library.attncc_error() == b""


@needs_nvcc
@pytest.mark.slow
def test_example_compiles(built):
    library = nvcc.load(built[1])
    assert hasattr(library, "attncc_example_fwd") and hasattr(library, "attncc_error")


def test_backend_setting_is_checked(monkeypatch):
    monkeypatch.setenv("ATTNCC_BACKEND", "cudnn")
    with pytest.raises(PatternError, match=r"ATTNCC_BACKEND = 'cudnn'.*triton, auto, cutlass"):
        settings.backend()


def test_cutlass_setting_where_it_cannot_run_is_refused(monkeypatch):
    monkeypatch.setenv("ATTNCC_BACKEND", "cutlass")
    ops.compiled.cache_clear()
    with pytest.raises(PatternError, match=r"backend = 'cutlass'.*CUDA GPU"):
        ops.compiled(neighborhood(7), Grid((20, 22)), 64, "float16", "cpu", "softmax", 2)
    ops.compiled.cache_clear()


def test_auto_falls_back_to_triton_with_a_warning(monkeypatch):
    """A tuning record that picked CUTLASS, read where CUTLASS cannot run, runs Triton and says so."""
    monkeypatch.setenv("ATTNCC_BACKEND", "auto")
    monkeypatch.setattr(ops, "tuned_config", lambda *args: ops.cutlass_config(64))
    ops.compiled.cache_clear()
    with pytest.warns(UserWarning, match="CUTLASS kernel cannot run"):
        kernel = ops.compiled(neighborhood(7), Grid((20, 22)), 64, "float16", "cpu", "softmax", 2)
    assert kernel.cutlass is None
    assert kernel.module is load(
        lower(neighborhood(7), Grid((20, 22)), 64, "float16", config=LaunchConfig.default("cpu", 64))
    )
    ops.compiled.cache_clear()


def test_search_space_offers_cutlass_where_the_templates_take_the_plan():
    target = device_spec("NVIDIA H100 80GB HBM3")
    args = (Grid((40, 44)), 128, "bfloat16", target)
    na2d = search_space(neighborhood(7), *args, backends=("triton", "cutlass"))
    picked = [(c, p) for c, p in na2d if c.backend == "cutlass"]
    assert [c.kv_block for c, _ in picked] == list(CUTLASS_BLOCK_NS)
    assert all(refusal(p) is None and (c.q_box, c.kv_box) == (p.q_tile, p.kv_tile) for c, p in picked)
    assert not any(c.backend == "cutlass" for c, _ in search_space(neighborhood(7), *args))
    blocks = block_sparse([[1, 0], [1, 1]], 880)  # a table plan: CUTLASS takes it too
    tabled = search_space(blocks, Grid((1760,)), 128, "bfloat16", target, backends=("triton", "cutlass"))
    assert any(c.backend == "cutlass" for c, _ in tabled)
    union = sliding_window(15, 0) | (strided(16, 3) & causal())  # two range terms: refused
    refused = search_space(union, Grid((1500,)), 128, "bfloat16", target, backends=("triton", "cutlass"))
    assert not any(c.backend == "cutlass" for c, _ in refused)

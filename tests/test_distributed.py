"""Context parallelism (issue 19): attncc.distributed on gloo process groups of 2 and 4 CPU
processes, against the single-process attncc.attention; the plan against the materialised mask.

One process group per world size runs every case (tests/distributed_worker.py, spawned once per
module); each rank saves its output and gradients, which the tests put back in grid order and
compare with the single-process kernels' forward and backward: fp32 within 1e-4 of the largest
magnitude (the merge by log-sum-exp reorders a few float32 sums).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_cases import CASES, MODULE_CASE, REPEATED, Case, module, module_input

import attncc
import attncc.distributed
from attncc import AttnccError
from attncc.distributed import ContextParallelAttention, Sharding, choose_sharding, plan
from attncc.ir import Grid, causal, dense, neighborhood, sliding_window
from attncc.ir.mask import mask

HERE = Path(__file__).resolve().parent
ALL = [case for world in sorted(CASES) for case in CASES[world]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks_results() -> dict[int, list[dict]]:
    """``{world: [rank 0's results, ...]}`` from one process group per world size."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(HERE)}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in sorted(CASES):
            folder = Path(tmp) / str(world)
            folder.mkdir()
            cmd = [
                sys.executable,
                str(HERE / "distributed_worker.py"),
                str(world),
                str(_free_port()),
                str(folder),
            ]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-4000:]
            out[world] = [torch.load(folder / f"rank{r}.pt") for r in range(world)]
    return out


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    atol = 1e-4 * max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", ALL, ids=[c.name for c in ALL])
def test_forward_and_backward_match_one_process(ranks_results, case: Case):
    world = case.sharding.ranks
    parts = [r[case.name] for r in ranks_results[world]]
    got = [case.sharding.unshard([p[i] for p in parts], case.grid) for i in range(4)]
    q, k, v, dout = case.inputs()
    for t in (q, k, v):
        t.requires_grad_(True)
    out = attncc.attention(q, k, v, case.pattern, grid=case.grid)
    (out * dout).sum().backward()
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, (out.detach(), q.grad, k.grad, v.grad)):
        _close(g, w, f"{case.name} {name}")


def test_a_fixed_world_size_gives_the_same_bits(ranks_results):
    for rank in ranks_results[4]:
        for a, b in zip(rank[REPEATED], rank[REPEATED + "#again"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("run", ["module", "module compiled"])
def test_the_module_path_matches_sparse_attention(ranks_results, run: str):
    """Eager, and under torch.compile (graph breaks at the exchange: docs/distributed.md)."""
    parts = [r[run] for r in ranks_results[2]]
    attn = module()
    x, dout = module_input()
    x.requires_grad_(True)
    out = attn(x)
    (out * dout).sum().backward()
    unshard = [MODULE_CASE.sharding.unshard([p[i] for p in parts], MODULE_CASE.grid, dim=1) for i in range(2)]
    _close(unshard[0], out.detach(), "module out")
    _close(unshard[1], x.grad, "module dx")
    for i, p in enumerate(attn.parameters()):
        _close(parts[0][2 + i], p.grad, f"module parameter {i} gradient")


def _needed_rows(case: Case) -> list[dict[int, set[int]]]:
    """Brute force: per rank, ``{source rank: rows of the leading axis}`` its queries see, from the mask."""
    m = mask(case.pattern, case.grid, case.heads).any(0).numpy()  # [N, N] over every head
    per_row = case.grid.size // case.grid.shape[0]
    rows_seen = m.reshape(case.grid.size, case.grid.shape[0], per_row).any(2)  # [N queries, rows]
    out = []
    for r in range(case.sharding.ranks):
        seen = rows_seen[case.sharding.tokens(r, case.grid).numpy()].any(0)
        needs: dict[int, set[int]] = {}
        for row in np.flatnonzero(seen).tolist():
            src = case.sharding.owner(row, case.grid)
            if src != r:
                needs.setdefault(src, set()).add(row)
        out.append(needs)
    return out


@pytest.mark.parametrize("case", ALL, ids=[c.name for c in ALL])
def test_the_plan_is_the_materialised_mask(case: Case):
    p = plan(case.pattern, case.grid, case.sharding, case.heads, case.kv_heads, head_dim=16, itemsize=4)
    per_row = case.grid.size // case.grid.shape[0]
    m = mask(case.pattern, case.grid, case.heads)
    work = m.sum((1, 2)) if m.shape[0] > 1 else m.sum((1, 2)) * case.heads
    for r, needs in enumerate(_needed_rows(case)):
        mine = p.ranks[r]
        assert {s.src: {x for lo, hi in s.rows for x in range(lo, hi)} for s in mine.incoming} == needs
        want_bytes = sum(map(len, needs.values())) * per_row * 2 * case.kv_heads * 16 * 4
        assert p.p2p_bytes(r) == want_bytes
        tokens = case.sharding.tokens(r, case.grid)
        per_head = m[:, tokens].sum((1, 2))
        assert mine.work == int(per_head.sum()) * (case.heads if m.shape[0] == 1 else 1)
    assert sum(p.work("p2p")) == int(work.sum())


def test_what_the_plan_finds():
    halo = next(c for c in CASES[4] if c.name == "na2d-rows-halo")
    p = plan(halo.pattern, halo.grid, halo.sharding, 4, 2)
    # A 7-row window over 2-row shards, clamped at the top border: rows 0-6, from three ranks.
    assert [(s.src, s.rows) for s in p.ranks[0].incoming] == [(1, ((2, 4),)), (2, ((4, 6),)), (3, ((6, 7),))]
    docs = next(c for c in CASES[4] if c.name == "documents")
    p = plan(docs.pattern, docs.grid, docs.sharding)
    assert p.ranks[0].incoming == () and p.ranks[0].outgoing == ()  # its own document
    assert p.ranks[1].incoming and p.ranks[1].outgoing
    assert plan(dense(), Grid(16), Sharding(4), 4).method == "ulysses"
    for pattern in (neighborhood(3), sliding_window(2)):
        p = plan(pattern, Grid(64), Sharding(4), 4)
        assert p.method == "p2p" and all(p.p2p_bytes(r) < p.ring_bytes(r) for r in range(4))
    assert plan(causal(), Grid(64), Sharding(4, "zigzag")).imbalance() == 1.0
    assert plan(causal(), Grid(64), Sharding(4)).imbalance() > 1.5
    assert choose_sharding(causal(), Grid(64), 4) == Sharding(4, "zigzag")
    assert choose_sharding(neighborhood(5), Grid(64), 4) == Sharding(4)


def test_balanced_cuts_even_out_the_work():
    mixed = next(c for c in CASES[2] if c.name == "documents-balanced")
    assert mixed.sharding.cuts == (14,)  # 4 + 16 + 4 + 8 tokens: 16 + 196 of 352 pairs up to row 20
    assert plan(mixed.pattern, mixed.grid, mixed.sharding).imbalance() == 1.0
    assert plan(mixed.pattern, mixed.grid, Sharding(2)).imbalance() > 1.15
    assert choose_sharding(mixed.pattern, mixed.grid, 2) == mixed.sharding
    uneven = plan(mixed.pattern, mixed.grid, mixed.sharding, 2)
    assert uneven.method == "p2p" and not uneven.ulysses_fits  # Ulysses needs equal shards
    assert uneven.ring_bytes(0) == 18 * 2 * 2 * 128 * 2  # the other rank's 18 tokens


def test_long_axes_move_keys_in_blocks():
    """Note [Key blocks]: 8192 slices count in blocks of 2 rows; a needed block moves whole."""
    p = plan(sliding_window(3), Grid(8192), Sharding(4))
    assert [(s.src, s.rows) for s in p.ranks[1].incoming] == [(0, ((2044, 2048),))]  # 2045-2047, in blocks
    assert p.ranks[1].outgoing[0].rows == ((4092, 4096),)


def test_errors_name_the_field():
    with pytest.raises(AttnccError, match=r"Sharding\.order"):
        Sharding(2, "striped")
    with pytest.raises(AttnccError, match=r"Sharding\.ranks"):
        Sharding(0)
    with pytest.raises(AttnccError, match=r"grid.shape\[0\] = 12.*multiple of 8"):
        plan(causal(), Grid(12), Sharding(4, "zigzag"))
    with pytest.raises(AttnccError, match=r"Sharding\.cuts"):
        Sharding(3, cuts=(4, 4))
    with pytest.raises(AttnccError, match=r"Sharding\.cuts"):
        Sharding(2, "zigzag", cuts=(4,))
    with pytest.raises(AttnccError, match=r"Sharding\.cuts = \(40,\)"):
        plan(causal(), Grid(16), Sharding(2, cuts=(40,)))
    with pytest.raises(AttnccError, match="kv_heads"):
        plan(causal(), Grid(16), Sharding(2), heads=4, kv_heads=3)
    attn = attncc.nn.SparseAttention(16, 2, neighborhood(3), (4, 4), attn_drop=0.1)
    with pytest.raises(AttnccError, match=r"attn\.attn_drop"):
        ContextParallelAttention(attn, Sharding(2))


def test_sharding_round_trips():
    grid = Grid((8, 3))
    x = torch.arange(24.0).reshape(1, 1, 24, 1)
    s = Sharding(2, "zigzag")
    assert s.rows(0, grid) == ((0, 2), (6, 8)) and s.rows(1, grid) == ((2, 4), (4, 6))
    assert s.shard(x, 1, grid).flatten().tolist() == list(range(6, 18))
    assert torch.equal(s.unshard([s.shard(x, r, grid) for r in range(2)], grid), x)


def test_the_call_checks_its_arguments():
    """On a process group of one (this process): every refusal names its field."""
    import torch.distributed as dist

    from attncc.ir import documents

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        q = torch.randn(1, 2, 16, 8)
        with pytest.raises(AttnccError, match=r"sharding\.ranks = 2"):
            attncc.distributed.attention(q, q, q, causal(), Grid(16), Sharding(2))
        with pytest.raises(AttnccError, match=r"q\.shape = \(1, 2, 8, 8\)"):
            attncc.distributed.attention(q[:, :, :8], q, q, causal(), Grid(16), Sharding(1))
        with pytest.raises(AttnccError, match="documents: not run context-parallel"):
            attncc.distributed.attention(q, q, q, documents(), Grid(16), Sharding(1))
        with pytest.raises(AttnccError, match="method = 'ring'"):
            attncc.distributed.attention(q, q, q, causal(), Grid(16), Sharding(1), method="ring")
    finally:
        dist.destroy_process_group()


def test_the_report_applies_the_issues_bar(monkeypatch):
    """benchmarks/context_parallel.py on small cases: a local pattern meets the bar, causal is not judged."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "context_parallel", HERE.parent / "benchmarks" / "context_parallel.py"
    )
    report = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "context_parallel", report)  # its dataclasses look their module up
    spec.loader.exec_module(report)
    monkeypatch.setattr(report, "RANKS", (4,))
    monkeypatch.setattr(report, "CASES", [report.Case("na2d", neighborhood(3), Grid((16, 8)), True),
                                          report.Case("causal", causal(), Grid(64), False)])  # fmt: skip
    text = report.markdown()
    rows = [
        line.split(" | ")
        for line in text.splitlines()
        if line.startswith("| na2d") or line.startswith("| causal")
    ]
    assert (
        rows[0][2] == "contiguous" and rows[0][-1] == "yes |" and rows[0][6] == "0.167"
    )  # 2 halo rows against 3 shards of 4 rows
    assert rows[1][2] == "zigzag" and rows[1][-1] == "- |" and rows[1][9] == "ulysses"
    assert "Bar met for 1 of 1 local cases" in text


def test_the_docs_example_runs_under_torchrun(tmp_path):
    """docs/distributed.md's script, as written, on 2 gloo processes started by torchrun."""
    doc = (HERE.parent / "docs" / "distributed.md").read_text()
    script = doc.split("## Running it", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "cp_demo.py").write_text(script)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}",
           "cp_demo.py"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    errors = [float(line.rsplit("= ", 1)[1]) for line in done.stdout.splitlines() if "one process" in line]
    assert len(errors) == 2 and max(errors) < 1e-5

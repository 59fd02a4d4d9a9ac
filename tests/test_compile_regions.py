"""`attncc compile` of a spec whose queries are a box of the grid (issue 16: a KV cache's last
rows, a video's last frames): the package takes ``q_offset`` as ``attncc.attention`` does and
matches it on the same tensors, forward and backward, score terms included.

The package runs the kernels attncc renders for the same plans, so it agrees with
``attncc.attention`` to rounding (1e-6 on O(1) values, fp32); the kernels' accuracy against
the reference is tests/test_regions.py's. Each test imports its package under its own name.
"""

import importlib

import pytest
import torch
from click.testing import CliRunner
from conftest import DEVICE

import attncc
from attncc.cli import cli
from attncc.errors import SpecError
from attncc.ir import causal, neighborhood, query_bias, rel_pos_bias, softcap
from attncc.ir.spec import spec_from_data

SPEC = "pattern: {pattern}\ngrid: {grid}\nqueries: {queries}\nheads: 2\nhead_dim: 16\ndtype: float32\n"


def _package(tmp_path, monkeypatch, name, pattern, grid, queries, score="softmax"):
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(SPEC.format(pattern=pattern, grid=grid, queries=queries) + f"score: {score}\n")
    result = CliRunner().invoke(cli, ["compile", str(spec), "-o", str(tmp_path / name), "--device", DEVICE])
    assert result.exit_code == 0, result.output
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name), result.output


def _runs(calls, *tensors, do):
    runs = []
    for call in calls:
        leaves = [t.detach().clone().to(DEVICE).requires_grad_() for t in tensors]
        out, lse = call(*leaves)
        grads = torch.autograd.grad((out * do.to(DEVICE)).sum() + lse[torch.isfinite(lse)].sum(), leaves)
        runs.append((out.cpu(), lse.cpu(), *(g.cpu() for g in grads)))
    for got, want in zip(*runs, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("q_offset", [None, 20, torch.tensor([0, 37])], ids=["end", "int", "per-batch"])
def test_a_package_of_a_caches_last_rows_matches_attncc(tmp_path, monkeypatch, q_offset):
    name = f"pkg_rows_{'none' if q_offset is None else 'int' if isinstance(q_offset, int) else 'tensor'}"
    pkg, output = _package(tmp_path, monkeypatch, name, "causal()", "[40]", "3")
    assert f"{name}.forward(q, k, v, q_offset=...)" in output
    gen = torch.Generator().manual_seed(0)
    q, do = torch.randn(2, 2, 3, 16, generator=gen), torch.randn(2, 2, 3, 16, generator=gen)
    k, v = (torch.randn(2, 1, 40, 16, generator=gen) for _ in range(2))  # GQA: one KV head
    offset = q_offset.to(DEVICE) if isinstance(q_offset, torch.Tensor) else q_offset
    _runs(
        [
            lambda q, k, v: pkg.forward(q, k, v, return_lse=True, q_offset=offset),
            lambda q, k, v: attncc.attention(q, k, v, causal(), q_offset=offset, return_lse=True),
        ],
        q, k, v, do=do,
    )  # fmt: skip


def test_a_package_of_a_videos_last_frames_with_score_terms_matches_attncc(tmp_path, monkeypatch):
    """Spatial layout, q [B, 2, 5, 6, H, D] of a 4x5x6 video; the table's gradient rows and the
    query bias are the box's queries."""
    pattern = "neighborhood(window=(3, 3, 5), causal=(True, False, False))"
    pkg, output = _package(
        tmp_path, monkeypatch, "pkg_frames", pattern, "[4, 5, 6]", "[2, 5, 6]",
        "softcap(3.0) + rel_pos_bias(5, 5, 9) + query_bias",
    )  # fmt: skip
    assert "q_offset=..." in output
    gen = torch.Generator().manual_seed(1)
    q = 2 * torch.randn(2, 2, 5, 6, 2, 16, generator=gen)
    k, v = (torch.randn(2, 4, 5, 6, 2, 16, generator=gen) for _ in range(2))
    table, qb, do = (
        torch.randn(2, 5, 5, 9, generator=gen),
        torch.randn(1, 2, 60, generator=gen),
        torch.randn_like(q),
    )
    offsets = torch.tensor([[0, 0, 0], [1, 0, 0]], device=DEVICE)
    _runs(
        [
            lambda q, k, v, t: pkg.forward(q, k, v, return_lse=True, rel_pos_bias=t, query_bias=qb.to(DEVICE),
                                           q_offset=offsets),
            lambda q, k, v, t: attncc.attention(
                q, k, v, neighborhood((3, 3, 5), causal=(True, False, False)), q_offset=offsets, return_lse=True,
                score_mod=softcap(3.0) + rel_pos_bias(t) + query_bias(qb.to(DEVICE)),
            ),
        ],
        q, k, v, table, do=do,
    )  # fmt: skip


def test_a_packages_q_offset_and_shapes_are_checked(tmp_path, monkeypatch):
    pkg, _ = _package(tmp_path, monkeypatch, "pkg_checks", "causal()", "[40]", "3")
    q, k = torch.zeros(1, 2, 3, 16, device=DEVICE), torch.zeros(1, 2, 40, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"q_offset = 38; allowed: 0..\(37,\)"):
        pkg.forward(q, k, k, q_offset=38)
    with pytest.raises(ValueError, match=r"q_offset dtype = torch.float32"):
        pkg.forward(q, k, k, q_offset=torch.zeros(1, device=DEVICE))
    with pytest.raises(ValueError, match=r"q.shape = \(1, 2, 4, 16\); allowed: \[B, H, 3, 16\]"):
        pkg.forward(torch.zeros(1, 2, 4, 16, device=DEVICE), k, k)
    with pytest.raises(ValueError, match=r"k/v shape = \(1, 2, 3, 16\); allowed: 40 tokens"):
        pkg.forward(q, q, q)


@pytest.mark.parametrize(
    "queries",
    [[5, 1], [0, 6], [2], True, "2x6"],
    ids=["too-large", "zero", "rank", "bool", "text"],
)
def test_bad_queries_are_refused_by_name(queries):
    with pytest.raises(
        SpecError, match=r"queries = .* allowed: a list of 2 integers, each from 1 to the grid"
    ):
        spec_from_data({"pattern": "causal()", "grid": [4, 6], "queries": queries})


def test_queries_that_are_the_grid_are_the_whole_problem():
    assert spec_from_data({"pattern": "causal()", "grid": [4, 6], "queries": [4, 6]}).queries is None
    assert spec_from_data({"pattern": "causal()", "grid": 9, "queries": 2}).queries == (2,)


def test_a_box_along_a_dilated_axis_is_refused_at_compile(tmp_path):
    spec = tmp_path / "dil.yaml"
    spec.write_text("pattern: neighborhood(window=(3, 3), dilation=(1, 2))\ngrid: [6, 10]\nqueries: [6, 5]\n")
    result = CliRunner().invoke(cli, ["compile", str(spec), "-o", str(tmp_path / "dil"), "--device", DEVICE])
    assert isinstance(result.exception, attncc.AttnccError) and "dilated" in str(result.exception)
    assert not (tmp_path / "dil").exists()


def test_analyze_shows_the_boxs_visits(tmp_path):
    spec = tmp_path / "frames.yaml"
    spec.write_text("pattern: neighborhood(window=(3, 5, 5), causal=(True, False, False))\ngrid: [8, 16, 16]\n"
                    "queries: [2, 16, 16]\nheads: 2\n")  # fmt: skip
    result = CliRunner().invoke(cli, ["analyze", str(spec)])
    assert result.exit_code == 0, result.output
    assert "a box (2, 16, 16) of the grid" in result.output
    assert "queries 2x16x16 at the grid's end: " in result.output


@pytest.mark.parametrize("command", [["bench"], ["tune", "--device", "cpu"]], ids=["bench", "tune"])
def test_commands_that_run_every_query_refuse_a_box(tmp_path, command):
    spec = tmp_path / "rows.yaml"
    spec.write_text("pattern: causal()\ngrid: [40]\nqueries: 3\n")
    result = CliRunner().invoke(cli, [command[0], str(spec), *command[1:]])
    assert isinstance(result.exception, SpecError), result.output
    assert f"queries (for attncc {command[0]}) = (3,)" in str(result.exception)

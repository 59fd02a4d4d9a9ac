"""`attncc analyze` end to end."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from attncc import AttnccError
from attncc.cli import cli
from attncc.runtime import cache


def _attncc(*args: str, cwd) -> subprocess.CompletedProcess:
    """Run the installed CLI in a process of its own (outside the source tree, so the
    installed package is imported, as a user's shell would)."""
    return subprocess.run(
        [sys.executable, "-m", "attncc", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_analyze_na2d_prints_table_and_draws_png(specs_dir, tmp_path):
    png = tmp_path / "out.png"
    result = CliRunner().invoke(cli, ["analyze", str(specs_dir / "na2d.yaml"), "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "5.8655%" in result.output  # density of a 31x31 window on 128x128
    assert "17.05x" in result.output  # ideal speedup
    assert "8x16" in result.output and "128 flat" in result.output  # default tilings
    assert "range iteration, dilation groups 1x1, boxes q 8x16 / kv 8x8" in result.output
    assert "tile bound 9.80x" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_prints_a_2d_plan_in_its_rank_and_names_the_heads_of_each(specs_dir):
    """Plans pad every grid to rank 3; the output does not (no 1x1x1, no 1x8x16)."""
    result = CliRunner().invoke(cli, ["analyze", str(specs_dir / "per_head.yaml")])
    assert result.exit_code == 0, result.output
    plans = result.output[result.output.index("kernel plan") : result.output.index("cost model")]
    assert "1x1x1" not in plans and "q 1x" not in plans
    assert "  head 1: range iteration, dilation groups 4x4, boxes q 8x16 / kv 8x8" in plans
    assert "  head 3: range iteration, dilation groups 1x1" in plans  # dense()
    assert "  head 2: axial(axes=(0, 1))" in result.output  # the closed forms, labelled alike


def test_analyze_counts_one_head_in_the_singular(tmp_path):
    spec = tmp_path / "one.yaml"
    spec.write_text("pattern: causal()\ngrid: [256]\nheads: 1\nhead_dim: 64\n")
    result = CliRunner().invoke(cli, ["analyze", str(spec)])
    assert result.exit_code == 0, result.output
    assert "  1 head: pick" in result.output and "1 heads" not in result.output


def test_analyze_with_explicit_tiles(specs_dir):
    result = CliRunner().invoke(
        cli, ["analyze", str(specs_dir / "na3d.yaml"), "--q-tile", "2x8x8", "--kv-tile", "4x8x8"]
    )
    assert result.exit_code == 0, result.output
    assert "2x8x8" in result.output and "4x8x8" in result.output


@pytest.mark.parametrize(
    "content,message",
    [
        ("pattern: neighborhood(window=200)\ngrid: [128, 128]\n", "neighborhood.window[0] = 200"),
        ("pattern: causal()\ngrid: [64]\nwindow: 3\n", "spec field = 'window'"),
        ("pattern: nope()\ngrid: [64]\n", "unknown primitive 'nope'"),
    ],
    ids=["window-too-large", "unknown-field", "unknown-primitive"],
)
def test_bad_spec_prints_one_error_line_and_exits_nonzero(tmp_path, content, message):
    spec = tmp_path / "bad.yaml"
    spec.write_text(content)
    proc = _attncc("analyze", str(spec), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("attncc: error:") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_tile_is_an_attncc_error(specs_dir, tmp_path):
    proc = _attncc("analyze", str(specs_dir / "na2d.yaml"), "--q-tile", "8x16x4", cwd=tmp_path)
    assert proc.returncode == 2 and "q_tile = (8, 16, 4)" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "tiny", "--device", "cpu", "--json", "{missing}/r.json"],
        ["bench", "tiny", "--device", "cpu", "--plot", "{missing}/r.png"],
        ["bench", "tiny", "--device", "cpu", "--markdown", "{missing}/R.md"],
        ["inspect", "{specs}/causal.yaml", "--json", "{missing}/r.json"],
        ["analyze", "{specs}/causal.yaml", "--png", "{missing}/r.png"],
    ],
    ids=["bench-json", "bench-plot", "bench-markdown", "inspect-json", "analyze-png"],
)
def test_an_output_in_a_missing_folder_fails_before_the_work(args, specs_dir, tmp_path):
    # bench used to run every case, then die in a FileNotFoundError traceback when it wrote.
    args = [a.format(missing=tmp_path / "no" / "such", specs=specs_dir) for a in args]
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, AttnccError), result.output
    assert f"{args[-2]} = '{args[-1]}' is not a file in an existing directory" in str(result.exception)
    assert "attncc ok" not in result.output  # nothing was run


def test_the_command_line_prints_an_os_error_as_one_line(tmp_path, monkeypatch):
    # /proc exists, but no file can be made in it: the write fails with an OSError.
    env = {**os.environ, "ATTNCC_CACHE_DIR": str(tmp_path / "cache")}
    monkeypatch.setenv("ATTNCC_CACHE_DIR", env["ATTNCC_CACHE_DIR"])
    monkeypatch.setattr(cache, "_memo", {})
    cache.put_record("tuning", {"pattern": "dense()", "grid": [16]}, {"block_m": 64}, label="dense 16")
    run = subprocess.run(
        [sys.executable, "-m", "attncc", "cache", "export", "/proc/bundle.tar.gz"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert (
        run.returncode == 2
        and run.stderr.startswith("attncc: error: [Errno")
        and "Traceback" not in run.stderr
    )


def test_analyze_ranks_prints_the_context_parallel_plan(tmp_path):
    """Issue 19: per rank work and bytes, attncc's plan against ring attention and Ulysses."""
    spec = tmp_path / "na2d.yaml"
    spec.write_text(
        "pattern: neighborhood(window=3)\ngrid: [16, 8]\nheads: 4\nhead_dim: 16\ndtype: float32\n"
    )
    result = CliRunner().invoke(cli, ["analyze", str(spec), "--ranks", "4"])
    assert result.exit_code == 0, result.output
    # Each query sees 9 keys (clamped): 32 queries x 9 x 4 heads per rank. A halo row is 8 tokens
    # of k and v in 4 heads x 16 x 4 bytes: 4 KiB; the middle ranks get two; ring gets 3 shards.
    rows = [line.split("│")[1:-1] for line in result.output.splitlines() if line.startswith("│")]
    assert [[c.strip() for c in row[:6]] for row in rows] == [
        ["0", "0-3", "1,152", "4.00 KiB", "1", "48.00 KiB"],
        ["1", "4-7", "1,152", "8.00 KiB", "0, 2", "48.00 KiB"],
        ["2", "8-11", "1,152", "8.00 KiB", "1, 3", "48.00 KiB"],
        ["3", "12-15", "1,152", "4.00 KiB", "2", "48.00 KiB"],
    ]
    assert "method: p2p" in result.output and "contiguous along axis 0" in result.output
    balanced = CliRunner().invoke(cli, ["analyze", str(spec), "--ranks", "3", "--sharding", "balanced"])
    assert balanced.exit_code == 0 and "3 ranks, balanced cuts along axis 0" in balanced.output
    assert "ulysses does not fit" in balanced.output  # 4 heads, and uneven shards
    zigzag = CliRunner().invoke(cli, ["analyze", str(spec), "--ranks", "3", "--sharding", "zigzag"])
    assert zigzag.exit_code != 0 and "grid.shape[0] = 16" in str(zigzag.exception)

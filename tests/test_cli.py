"""`attncc analyze` end to end."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from attncc.cli import cli


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

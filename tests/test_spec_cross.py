"""Spec files with ``q_grid`` (issue 16: cross-attention through every front door): the field is
read and checked, ``attncc analyze`` counts the kept pairs over Nq x Nk exactly (against the
brute-force cross mask) and draws the mask, and the commands that cannot run such a spec refuse
it by name (attncc compile's packages: tests/test_compile_cross.py)."""

import pytest
import torch
from click.testing import CliRunner
from conftest import SPECS

from attncc.cli import cli
from attncc.errors import PatternError, SpecError
from attncc.ir import Grid, load_spec
from attncc.ir.analysis import analyze_cross
from attncc.ir.mask import cross_mask
from attncc.ir.spec import spec_from_data
from attncc.ir.text import parse

EXAMPLE = SPECS / "text_to_image_cross.yaml"


def test_the_example_spec_puts_77_text_queries_over_a_32x32_image():
    spec = load_spec(EXAMPLE)
    assert spec.q_grid == Grid((77,)) and spec.grid == Grid((32, 32)) and spec.queries is None
    a = analyze_cross(spec.pattern, spec.q_grid, spec.grid, spec.heads, spec.head_dim)
    assert (a.kept_pairs, a.total_pairs, a.density) == (8 * 77 * 1024, 8 * 77 * 1024, 1.0)


@pytest.mark.parametrize(
    "pattern,heads",
    [
        ("dense()", 1),
        ("key_range(axis=0, lo=3, hi=9)", 2),
        ("key_range(axis=0, hi=4) | key_range(axis=0, lo=11)", 1),
        ("per_head([dense(), key_range(axis=0, lo=5)])", 2),
        ("key_lengths() & key_range(axis=0, hi=8)", 3),
        ("documents() | key_range(axis=0, hi=2)", 1),
    ],
)
def test_cross_analysis_counts_the_brute_force_masks_pairs(pattern, heads):
    """The most any data keep (every key within its length, one id) and the fewest (no key, ids
    that never match), each against the brute-force mask of those data."""
    p, q_grid, grid = parse(pattern), Grid((2, 3)), Grid((13,))
    a = analyze_cross(p, q_grid, grid, heads)
    extremes = []
    for most in (True, False):
        data = {
            "key_lengths": torch.tensor([13 if most else 0]),
            "documents": torch.zeros(1, 13, dtype=torch.long),
            "query_documents": torch.full((1, 6), 0 if most else 1),
        }
        m = cross_mask(p, q_grid, grid, heads, data=data)
        extremes.append(int(m.sum()) * heads // m.shape[1])
    assert (a.kept_pairs, a.min_kept_pairs) == tuple(extremes)
    assert a.total_pairs == heads * 6 * 13 and a.data_dependent == bool(p.runtime_leaves)


@pytest.mark.parametrize(
    "q_grid",
    [[0], [1, 2, 3, 4], True, "77", [2.5], []],
    ids=["zero", "rank", "bool", "text", "float", "empty"],
)
def test_bad_q_grids_are_refused_by_name(q_grid):
    with pytest.raises(
        SpecError, match=r"q_grid = .* allowed: a list of 1 to 3 integers >= 1, or an integer"
    ):
        spec_from_data({"pattern": "dense()", "grid": [16], "q_grid": q_grid})


def test_a_pattern_comparing_places_across_grids_is_refused_naming_the_field(tmp_path):
    spec = tmp_path / "geo.yaml"
    spec.write_text("pattern: neighborhood(window=(3, 3))\ngrid: [8, 8]\nq_grid: 77\n")
    with pytest.raises(
        PatternError, match=r"geo.yaml: pattern = 'neighborhood\(window=\(3, 3\)\)' .*q_grid \(77,\)"
    ):
        load_spec(spec)


def test_q_grid_beside_queries_or_position_terms_is_refused():
    with pytest.raises(SpecError, match=r"q_grid = 4 .* allowed: absent when queries is given"):
        spec_from_data({"pattern": "dense()", "grid": [16], "q_grid": 4, "queries": 3})
    with pytest.raises(SpecError, match=r"score = 'alibi\(0.5\)' .*allowed: terms other than alibi"):
        spec_from_data({"pattern": "dense()", "grid": [16], "q_grid": 4, "score": "alibi(0.5)"})


def test_analyze_shows_the_cross_problem_and_draws_its_mask(tmp_path):
    png = tmp_path / "cross.png"
    result = CliRunner().invoke(cli, ["analyze", str(EXAMPLE), "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "77 (77 queries, a grid of their own: cross-attention)" in result.output
    assert "kept pairs             630,784 of 630,784" in result.output
    assert "density                100.0000%" in result.output
    assert png.stat().st_size > 0


def test_analyze_shows_a_data_dependent_range_and_the_padded_embedding(tmp_path):
    spec = tmp_path / "lengths.yaml"
    spec.write_text("pattern: key_lengths() | key_range(axis=0, hi=3)\ngrid: 10\nq_grid: [4, 5]\n")
    result = CliRunner().invoke(cli, ["analyze", str(spec)])
    assert result.exit_code == 0, result.output
    assert "kept pairs             80 to 200 of 200" in result.output  # 4 keys .. all 10, for 20 queries
    assert "data-dependent (key_lengths given at call time): 40.0000% to 100.0000%" in result.output
    assert (
        "20 queries at token 0 of a 1-D grid of 20 tokens; k and v copied with 10 zero keys" in result.output
    )


@pytest.mark.parametrize("option", [["--q-tile", "64"], ["--ranks", "2"]], ids=["tiles", "ranks"])
def test_analyze_refuses_what_a_cross_spec_has_no_use_for(option):
    result = CliRunner().invoke(cli, ["analyze", str(EXAMPLE), *option])
    assert isinstance(result.exception, (PatternError, SpecError)), result.output
    assert ("q_grid (for attncc analyze --ranks)" if option[0] == "--ranks" else "--q-tile/--kv-tile") in str(
        result.exception
    )


@pytest.mark.parametrize(
    "command", [["bench"], ["tune", "--device", "cpu"], ["inspect"]], ids=["bench", "tune", "inspect"]
)
def test_commands_that_cannot_run_a_cross_spec_refuse_it_by_name(command):
    result = CliRunner().invoke(cli, [command[0], str(EXAMPLE), *command[1:]])
    assert isinstance(result.exception, SpecError), result.output
    assert f"q_grid (for attncc {command[0]}) = (77,) is out of range" in str(result.exception)

"""The benchmark harness on the CPU: the tiny suite under the Triton interpreter.

Timings are not asserted (they mean nothing here); what is: every figure is
produced and well-formed, peers are checked against attncc before they are
timed, a wrong peer is caught and left untimed, declines and missing backward
passes are reported per case instead of ending the run.
"""

import json
import re
import subprocess

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO

from attncc import AttnccError
from attncc.bench.peers import Flex, Naive, Natten, Sdpa
from attncc.bench.runner import TOLERANCE, plan_summary, run_case
from attncc.bench.suite import load_cases
from attncc.cli import cli

CPU = torch.device("cpu")
TINY = {c.name: c for c in load_cases("tiny")}


def test_bench_tiny_suite_prints_table_and_writes_json_plot_markdown(tmp_path):
    out = tmp_path / "r.json"
    png = tmp_path / "r.png"
    md = tmp_path / "RESULTS.md"
    md.write_text("# attncc benchmark results\n\n## an older run\n")
    args = [
        "bench",
        "tiny",
        "--peers",
        "sdpa,naive,natten",
        "--runs",
        "3",
        "--warmup",
        "1",
        "--device",
        "cpu",
    ]
    args += ["--json", str(out), "--plot", str(png), "--markdown", str(md)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "tiny-na2d-6x9-w3" in result.output and "natten: declined" in result.output
    assert re.search(r"^tiny · tiny-causal-40: attncc ok \d+\.\d{3} ms$", result.output, re.M)  # its suite
    data = json.loads(out.read_text())
    assert set(data["environment"]) == {"device", "torch", "triton", "attncc", "python", "date"}
    assert [r["case"]["name"] for r in data["results"]] == list(TINY)
    for r in data["results"]:
        assert r["mode"] == "fwd" and 0 < r["density"] <= 1 and r["tile_bound"] >= 1
        entries = {e["peer"]: e for e in r["entries"]}
        assert list(entries) == ["attncc", "sdpa", "naive", "natten"]
        for name in ("attncc", "sdpa", "naive"):
            e = entries[name]
            assert e["status"] == "ok" and e["runs"] == 3
            assert e["median_ms"] > 0 and e["first_call_ms"] > 0 and e["setup_ms"] >= 0
        for name in ("sdpa", "naive"):
            assert entries[name]["error"] <= entries[name]["tolerance"] == TOLERANCE["float32"]
        assert entries["sdpa"]["detail"] == "math"
        assert entries["natten"]["status"] == "declined" and entries["natten"]["median_ms"] is None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert text.startswith("# attncc benchmark results\n\n## attncc bench tiny --fwd")
    assert text.index("| tiny-causal-40 | 40 |") < text.index("## an older run")
    assert f"![attncc bench tiny --fwd]({png})" in text


class _Wrong(Naive):
    """A peer that is off by a little more than the tolerance."""

    name = "wrong"

    def prepare(self, case, device, terms):
        call = super().prepare(case, device, terms)
        return lambda a: call(a) + 2 * TOLERANCE[case.dtype]


def test_output_check_catches_a_wrong_peer_and_does_not_time_it():
    result = run_case(TINY["tiny-causal-40"], [_Wrong(), Sdpa()], CPU, warmup=0, runs=2)
    wrong, sdpa = result.entry("wrong"), result.entry("sdpa")
    assert wrong.status == "wrong" and wrong.median_ms is None
    assert wrong.error == pytest.approx(2 * TOLERANCE["float32"], rel=0.05)
    assert "not timed" in wrong.reason
    assert sdpa.status == "ok" and result.speedup("wrong") is None


def test_sdpa_on_a_sparse_case_is_checked_against_dense_attention():
    result = run_case(TINY["tiny-na2d-6x9-w3"], [Sdpa()], CPU, warmup=0, runs=1)
    assert result.entry("sdpa").status == "ok"  # it would be "wrong" if held to the sparse output
    assert result.entry("sdpa").error <= TOLERANCE["float32"]


def test_fwd_bwd_times_the_peers_and_reports_a_missing_backward_per_case():
    """Works before and after attncc has a backward: ours is timed once it exists (and the
    peers' gradients are then checked against ours), else its entry says why it has no time."""
    for case in TINY.values():
        result = run_case(case, [Sdpa(), Naive()], CPU, mode="fwd-bwd", warmup=0, runs=2)
        ours = result.entry("attncc")
        assert ours.status == "ok" or (ours.status == "failed" and "NoBackward" in ours.reason)
        for peer in ("sdpa", "naive"):
            e = result.entry(peer)
            assert e.status == "ok" and e.median_ms > 0 and e.error <= e.tolerance


def test_flex_peer_runs_compiled_on_the_cpu():
    """torch.compile(flex_attention) traces the IR-derived mask_mod (about 20 s on a CPU)."""
    result = run_case(TINY["tiny-na2d-6x9-w3"], [Flex()], CPU, warmup=0, runs=1)
    flex = result.entry("flex")
    assert flex.status == "ok", flex.reason
    assert flex.setup_ms > 0 and flex.error <= flex.tolerance


def test_natten_declines_with_its_reason():
    reason = Natten().decline(TINY["tiny-causal-40"], CPU)
    assert reason in (
        "natten is not installed",
        "natten runs one neighborhood pattern on every head, not this pattern",
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["bench", "tiny", "--peers", "sdpa,fa3"], "--peers = 'fa3'"),
        (["bench", "nope"], "SUITE|SPEC = 'nope'"),
        (["bench", "tiny", "-k", "zzz"], "-k = 'zzz'"),
        (["bench", "tiny", "--runs", "0", "--device", "cpu"], "--runs = 0"),
    ],
    ids=["unknown-peer", "unknown-suite", "no-case-selected", "no-runs"],
)
def test_bad_input_is_an_attncc_error_naming_the_field(args, message):
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, AttnccError) and message in str(result.exception)


def test_list_names_every_case_of_the_default_suite():
    result = CliRunner().invoke(cli, ["bench", "--list"])
    assert result.exit_code == 0
    for name in ("dense-16384", "na3d-16x48x48-w7x15x15", "axial-128x128", "lm-32768-causal"):
        assert name in result.output


def test_list_is_one_short_line_per_case_with_its_suite():
    """Block-sparse layouts are summarised (printed whole, the list was 522 lines, 100 KB)."""
    result = CliRunner().invoke(cli, ["bench", "--list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    parts = {
        name: load_cases(name)
        for name in ("issue3", "grids", "flat", "models", "terms", "tiny", "tiny-terms")
    }
    assert len(lines) == 1 + sum(map(len, parts.values())) + 1  # a header, the cases, a count
    assert lines[0].split()[:2] == ["suite", "case"]
    rows = {line.split()[1]: line for line in lines[1:-1]}
    for suite, cases in parts.items():
        for case in cases:
            assert rows[case.name].split()[0] == suite
    assert "block_sparse(layout=<128x128, 10% kept>, block=128)" in rows["block-sparse-10%-16384"]
    assert "per_head(16 heads, 4 distinct: [" in rows["per-head-mix-128x128"]
    assert max(map(len, lines)) < 200
    assert lines[-1] == "45 cases; the default suite runs issue3, grids, flat, models"
    one = CliRunner().invoke(cli, ["bench", "tiny", "-k", "na2d", "--list"]).output.splitlines()
    assert len(one) == 3 and one[-1].startswith("1 case;")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_plans_tile_bound_is_at_least_one_and_printed_in_the_cases_rank(device):
    """Note [Kernel tile bound]: 8x8 boxes on the 6x9 grid are 1x2 box tiles, every pair of
    which the kernel visits: a bound of 1 (counted against 64-token flat tiles it was 0.25)."""
    for case in TINY.values():
        bound, plan = plan_summary(case, torch.device(device))
        assert bound >= 1, (case.name, plan)
        assert "q1x" not in plan
    if device == "cpu":
        assert plan_summary(TINY["tiny-na2d-6x9-w3"], CPU) == (1.0, "range q8x8/kv8x8")


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], check=True)

"""``attncc bench``: run a suite (or one spec) against the peers and report the figures."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click
import torch
from rich.console import Console

from attncc import settings
from attncc.errors import AttnccError, field_error
from attncc.ir.score import Score
from attncc.outputs import output_file

if TYPE_CHECKING:
    from attncc.bench.suite import Case


def _device(name: str | None) -> torch.device:
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise field_error(AttnccError, "--device", name, "cpu (no CUDA GPU is visible)")
    if name == "cpu" and not settings.interpreter():
        raise field_error(
            AttnccError, "--device", name, "cuda, or cpu with TRITON_INTERPRET=1 set (Triton's interpreter)"
        )
    return torch.device(name)


def _peers(text: str) -> list:
    from attncc.bench.peers import PEERS

    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in PEERS:
            raise field_error(AttnccError, "--peers", n, ", ".join(PEERS) + " (comma-separated)")
    return [PEERS[n]() for n in dict.fromkeys(names)]


def _listing(parts: list[tuple[str, list[Case]]]) -> list[str]:
    """One line per case: its suite, name, shape and pattern (long fields summarised), and its
    score when it has terms."""
    from attncc.bench.suite import DEFAULT, short_pattern

    def what(c: Case) -> str:
        return short_pattern(c.pattern) + ("" if c.score == Score() else f"  score: {c.score.text}")

    rows = [("suite", "case", "grid", "heads", "D", "dtype", "pattern")]
    rows += [
        (suite, c.name, str(c.grid), str(c.heads), str(c.head_dim), c.dtype, what(c))
        for suite, cases in parts
        for c in cases
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    count = len(rows) - 1
    lines.append(f"{count} case{'s' * (count != 1)}; the default suite runs {', '.join(DEFAULT)}")
    return lines


@click.command("bench")
@click.argument("targets", metavar="[SUITE|SPEC]...", nargs=-1)
@click.option("--fwd", "mode", flag_value="fwd", default=True, help="Time the forward pass (default).")
@click.option("--fwd-bwd", "mode", flag_value="fwd-bwd", help="Time forward + backward (grads of q, k, v).")
@click.option(
    "--peers",
    "peer_names",
    default="sdpa,flex,naive,natten",
    show_default=True,
    help="Comma-separated: sdpa, flex, naive, natten.",
)
@click.option("-k", "select", default="", help="Only cases whose name contains this text.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    callback=output_file,
    help="Write every raw figure here.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    callback=output_file,
    help="Draw speedups, efficiency (PNG).",
)
@click.option(
    "--markdown",
    "markdown_path",
    type=click.Path(dir_okay=False),
    callback=output_file,
    help="Prepend a results section here.",
)
@click.option("--plot-link", help="How the Markdown section links the plot (default: the --plot path).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), help="Default: cuda when available.")
@click.option("--warmup", default=5, show_default=True, help="Untimed runs after the first call.")
@click.option("--runs", default=30, show_default=True, help="Timed runs; the median is reported.")
@click.option(
    "--list",
    "list_only",
    is_flag=True,
    help="List the cases, one line each (with no SUITE: every suite) and exit.",
)
def bench_cmd(
    targets: tuple[str, ...],
    mode: str,
    peer_names: str,
    select: str,
    json_path: str | None,
    plot_path: str | None,
    markdown_path: str | None,
    plot_link: str | None,
    device: str | None,
    warmup: int,
    runs: int,
    list_only: bool,
) -> None:
    """Benchmark attncc against dense SDPA, FlexAttention, naive attention and NATTEN.

    SUITE is default (issue3, grids, flat, models), one of those, terms (score terms, each
    beside the same case without them), tiny or tiny-terms (CPU checks of the harness); SPEC is a
    spec file (its score: field included).
    Exit status 1 when a peer's output disagrees with ours or our forward has no figure.
    """
    from attncc.bench import report
    from attncc.bench.runner import run_case
    from attncc.bench.suite import PARTS, load_parts

    # --list alone lists every part; a run alone runs the default suite.
    listed = targets or (tuple(PARTS) if list_only else ("default",))
    parts = [(name, [c for c in cases if select in c.name]) for t in listed for name, cases in load_parts(t)]
    if not any(part for _, part in parts):
        raise field_error(AttnccError, "-k", select, "text that some case name contains (see --list)")
    console = Console(width=None if sys.stdout.isatty() else 200)
    if list_only:
        for line in _listing(parts):
            click.echo(line)
        return
    for name, value in (("--warmup", warmup), ("--runs", runs)):
        if value < (0 if name == "--warmup" else 1):
            raise field_error(AttnccError, name, value, "an integer >= 0" if name == "--warmup" else ">= 1")
    dev = _device(device)
    peers = _peers(peer_names)
    results = []
    for suite, part in parts:
        for case in part:
            result = run_case(case, peers, dev, mode, warmup, runs)
            results.append(result)
            ours = result.entry("attncc")
            took = f" {ours.median_ms:.3f} ms" if ours.median_ms is not None else ""
            console.print(f"{suite} · {case.name}: attncc {ours.status}{took}", highlight=False, markup=False)
    title = f"attncc bench {' '.join(targets or ('default',))} --{mode}"
    env = report.environment(dev)
    console.print(report.table(results, title))
    for line in report.notes(results):
        console.print(line, highlight=False, markup=False)
    if json_path:
        report.write_json(json_path, results, env)
    if plot_path:
        report.plot(plot_path, results, f"{title} ({env['device']})")
    if markdown_path:
        link = plot_link or plot_path
        report.prepend(markdown_path, report.markdown(results, env, title, link))
    bad = [
        r.case.name
        for r in results
        for e in r.entries
        if e.status == "wrong" or (e.peer == "attncc" and mode == "fwd" and e.status != "ok")
    ]
    if bad:
        console.print(f"figures in doubt: {', '.join(dict.fromkeys(bad))}", style="bold red")
        sys.exit(1)

"""``attncc tune``: rank a spec's candidates by the cost model, time the best few, record the winner."""

from __future__ import annotations

import os
import sys

import click
from rich.console import Console

from attncc import settings
from attncc.autotune.space import describe
from attncc.errors import TuneError, field_error
from attncc.ir.canonical import canonicalize, resolve_heads
from attncc.ir.grid import Grid
from attncc.ir.spec import load_spec, whole_grid
from attncc.ir.validate import required_heads, validate


def parse_shape(text: str) -> tuple[int, int, Grid]:
    """``B,H,N...``: batch, heads, then one size per grid axis."""
    parts = [p.strip() for p in text.split(",")]
    if not 3 <= len(parts) <= 5 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise field_error(
            TuneError, "--shape", text, "B,H,N or B,H,H_img,W_img or B,H,T,H_img,W_img (ints >= 1)"
        )
    b, h, *sizes = (int(p) for p in parts)
    return b, h, Grid(tuple(sizes))


@click.command("tune")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option(
    "--shape", help="B,H,N... : batch, heads and grid sizes [default: 1, the spec's heads and grid]"
)
@click.option("--top", default=8, show_default=True, help="Candidates to time, best predicted first.")
@click.option(
    "--device",
    type=click.Choice(["cuda", "cpu"]),
    help="Where to time [default: cuda if present; cpu runs Triton's interpreter: a test of the harness].",
)
@click.option("--runs", default=20, show_default=True, help="Timed runs per candidate (the median is kept).")
@click.option("--warmup", default=5, show_default=True, help="Discarded runs per candidate.")
@click.option("--rows", default=20, show_default=True, help="Rows of the ranked table to print.")
@click.option("--no-save", is_flag=True, help="Do not write tuning records.")
def tune_cmd(
    spec_path: str,
    shape: str | None,
    top: int,
    device: str | None,
    runs: int,
    warmup: int,
    rows: int,
    no_save: bool,
) -> None:
    """Tune SPEC's kernels: the cost model ranks every candidate, the device times the top ones,
    and the fastest is recorded, so attncc.attention uses it for this shape from then on."""
    spec = whole_grid(load_spec(spec_path), "tune")
    score = spec.score.form.text  # the terms, and dropout; their tensors are random in the timing
    batch, heads, grid = parse_shape(shape) if shape else (1, spec.heads, spec.grid)
    heads = validate(spec.pattern, grid, heads)
    device = device or _default_device()
    if device == "cpu":
        _interpret()
    from attncc.autotune.report import ranked_table
    from attncc.autotune.tuner import tune

    if required_heads(spec.pattern) is None:  # every head has the pattern: no walk over the H heads
        groups = {canonicalize(spec.pattern, grid): heads}
    else:  # per-head entries, as many as the pattern lists
        groups = {}
        for h in resolve_heads(spec.pattern, heads):
            p = canonicalize(h, grid)
            groups[p] = groups.get(p, 0) + 1
    console = Console(width=None if sys.stdout.isatty() else 150)
    for i, (pattern, n_heads) in enumerate(groups.items()):
        result = tune(
            pattern, grid, batch, n_heads, spec.head_dim, spec.dtype, device, top, score=score,
            warmup=warmup, runs=runs, save=not no_save,
        )  # fmt: skip
        title = f"head pattern {i}: " if len(groups) > 1 else ""
        scored = f", score {score}" if score != "softmax" else ""
        console.print(
            f"{title}{spec.name}, B={batch}, H={n_heads}, grid {grid}, D={spec.head_dim}, {spec.dtype}"
            f"{scored}, on {result.key.device}: {len(result.trials)} candidates",
            soft_wrap=True,
        )
        console.print(ranked_table(result, max(rows, 1)))
        best = result.best
        note = " (Triton interpreter: not a GPU figure)" if device == "cpu" else ""
        console.print(
            f"best: {describe(best.ranked.config)} at {best.measured_us:,.1f} us{note}, "
            f"model rank {best.ranked.rank}; tuning took {result.seconds:.1f} s "
            f"(ranking {result.rank_seconds:.2f} s){'' if no_save else '; record saved'}",
            soft_wrap=True,
        )


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _interpret() -> None:
    """Kernels on CPU tensors run in Triton's interpreter, which must be on before triton loads."""
    if "triton" in sys.modules and not settings.interpreter():
        raise field_error(TuneError, "--device", "cpu", "cuda, or cpu with TRITON_INTERPRET=1 set")
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Benchmark figures as a terminal table, raw JSON, a Markdown section and a plot."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.table import Table

from attncc.bench.runner import CaseResult, Entry
from attncc.ir.text import format_pattern

_TITLE = "# attncc benchmark results\n"


def environment(device: torch.device) -> dict[str, str]:
    """Device, versions and date of a run: what a reader needs to rerun it."""
    import triton

    import attncc

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "attncc": attncc.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def peers_of(results: Sequence[CaseResult]) -> list[str]:
    names = dict.fromkeys(e.peer for r in results for e in r.entries)
    return [n for n in names if n != "attncc"]


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _mib(entry: Entry | None) -> str:
    if entry is None or entry.peak_bytes is None:
        return "—"
    return f"{entry.peak_bytes / 2**20:,.0f}"


def term_cost(result: CaseResult, results: Sequence[CaseResult]) -> float | None:
    """How many times the time of the same case without score terms ours takes with them (the
    plain case of the same run: :attr:`attncc.bench.suite.Case.problem`), or None."""
    if result.case.score.plain:
        return None
    plain = next(
        (
            r
            for r in results
            if r.case.score.plain and r.case.problem == result.case.problem and r.mode == result.mode
        ),
        None,
    )
    ours, base = result.ms("attncc"), plain.ms("attncc") if plain else None
    return ours / base if ours and base else None


def _rows(results: Sequence[CaseResult]) -> tuple[list[str], list[list[str]]]:
    peers = peers_of(results)
    with_terms = any(not r.case.score.plain for r in results)
    head = ["case", "N", "dtype/D", "density", "tile bound", "attncc ms"]
    head += ["vs plain"] if with_terms else []
    head += [f"{p} ms (speedup)" for p in peers]
    head += ["efficiency", "peak MiB attncc/sdpa/flex", "first call ms", "set-up ms (ours/flex)", "plan"]
    rows = []
    for r in results:
        c = r.case
        ours, flex = r.entry("attncc"), r.entry("flex")
        row = [c.name, f"{c.tokens:,}", f"{c.dtype}/{c.head_dim}", f"{r.density:.4f}", f"{r.tile_bound:.2f}"]
        row += [_ms(r.ms("attncc"))] + ([_x(term_cost(r, results))] if with_terms else [])
        row += [f"{_ms(r.ms(p))} ({_x(r.speedup(p))})" for p in peers]
        row.append("—" if r.efficiency is None else f"{r.efficiency:.2f}")
        row.append("/".join(_mib(r.entry(p)) for p in ("attncc", "sdpa", "flex")))
        row.append(_ms(ours.first_call_ms if ours else None))
        row.append(f"{_ms(ours.setup_ms if ours else None)}/{_ms(flex.setup_ms if flex else None)}")
        row.append(r.plan)
        rows.append(row)
    return head, rows


def notes(results: Sequence[CaseResult]) -> list[str]:
    """One line per entry that has no time: declined, failed, wrong or unchecked, with why."""
    return [
        f"{r.case.name} · {e.peer}: {e.status}: {e.reason}"
        for r in results
        for e in r.entries
        if e.status != "ok"
    ]


def table(results: Sequence[CaseResult], title: str) -> Table:
    head, rows = _rows(results)
    out = Table(title=title, title_justify="left")
    for i, col in enumerate(head):
        out.add_column(col, justify="left" if i == 0 or col == "plan" else "right")
    for row in rows:
        out.add_row(*row)
    return out


def markdown(results: Sequence[CaseResult], env: dict[str, str], title: str, plot: str | None) -> str:
    """A RESULTS.md section: how it was run, the table, the plot, and why figures are missing."""
    mode = results[0].mode if results else "fwd"
    head, rows = _rows(results)
    lines = [
        f"## {title}, {env['date'][:10]}, {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, attncc {env['attncc']}, python {env['python']}; "
        f"{'forward' if mode == 'fwd' else 'forward + backward'}, B=1.",
        "Median of timed runs (CUDA events) over rotated random inputs (`attncc.timing.measure`); first "
        "call (compilation) and set-up (our plan, FlexAttention's block mask) apart. Speedup = peer ms / "
        "attncc ms. Efficiency = (dense SDPA ms / attncc ms) / tile bound; tile bound = dense tile pairs / "
        "tile pairs our plan visits. Every peer's output was checked against ours before it was timed."
        + (
            " Score terms: random tensors, the same for every implementation (FlexAttention's score_mod, "
            "SDPA's attn_mask); vs plain = attncc ms / attncc ms of the same case without the terms."
            if any(not r.case.score.plain for r in results)
            else ""
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    geo = _geomean([r.speedup("flex") for r in results])
    if geo is not None:
        lines += ["", f"Geometric mean speedup over FlexAttention: {geo:.2f}x"]
    if plot:
        lines += ["", f"![{title}]({plot})"]
    missing = notes(results)
    if missing:
        lines += ["", "Missing figures:", "", *(f"- {line}" for line in missing)]
    return "\n".join(lines) + "\n"


def _geomean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v]
    return math.exp(sum(map(math.log, kept)) / len(kept)) if kept else None


def prepend(path: str | Path, section: str) -> None:
    """Newest results first under the file's title; older runs stay below."""
    path = Path(path)
    old = path.read_text() if path.exists() else _TITLE
    rest = old[len(_TITLE) :] if old.startswith(_TITLE) else old
    path.write_text(_TITLE + "\n" + section + rest)


def to_json(results: Sequence[CaseResult], env: dict[str, str]) -> dict:
    """Every raw figure, with the case as plain data (the pattern in its text form)."""

    def case(r: CaseResult) -> dict:
        c = r.case
        return {
            "name": c.name,
            "pattern": format_pattern(c.pattern),
            "grid": list(c.grid.shape),
            "heads": c.heads,
            "head_dim": c.head_dim,
            "dtype": c.dtype,
            "batch": c.batch,
            "score": c.score.text,
        }

    return {
        "environment": env,
        "results": [
            {
                "case": case(r),
                "mode": r.mode,
                "density": r.density,
                "tile_bound": r.tile_bound,
                "plan": r.plan,
                "efficiency": r.efficiency,
                "term_cost": term_cost(r, results),
                "entries": [dataclasses.asdict(e) for e in r.entries],
            }
            for r in results
        ],
    }


def write_json(path: str | Path, results: Sequence[CaseResult], env: dict[str, str]) -> None:
    Path(path).write_text(json.dumps(to_json(results, env), indent=1, allow_nan=False) + "\n")


def plot(path: str | Path, results: Sequence[CaseResult], title: str) -> None:
    """Per case: attncc's speedup over each peer (log scale), and its efficiency against the
    tile-level bound. Missing figures leave a gap, never a zero bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = peers_of(results)
    names = [r.case.name for r in results]
    height = max(3.0, 0.38 * len(results) * max(1, len(peers)) ** 0.5 + 1.5)
    fig, (ax_speed, ax_eff) = plt.subplots(
        1, 2, figsize=(14, height), sharey=True, gridspec_kw={"width_ratios": [3, 1]}, constrained_layout=True
    )
    bar = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        points = [(j, r.speedup(peer)) for j, r in enumerate(results) if r.speedup(peer)]
        if points:
            ys, xs = zip(*points, strict=True)
            offset = (i - (len(peers) - 1) / 2) * bar
            ax_speed.barh([y + offset for y in ys], xs, height=bar, label=f"vs {peer}")
    ax_speed.axvline(1.0, color="black", linewidth=0.8)
    ax_speed.set_xscale("log")
    ax_speed.set_xlabel("speedup of attncc (peer ms / attncc ms, log scale)")
    ax_speed.set_yticks(range(len(names)), names)
    ax_speed.invert_yaxis()
    if ax_speed.get_legend_handles_labels()[0]:
        ax_speed.legend(loc="lower right")
    eff = [(j, r.efficiency) for j, r in enumerate(results) if r.efficiency]
    if eff:
        ax_eff.barh(*zip(*eff, strict=True), color="#2a6f97")
    ax_eff.axvline(1.0, color="black", linewidth=0.8)
    ax_eff.set_xlabel("efficiency vs tile bound")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)

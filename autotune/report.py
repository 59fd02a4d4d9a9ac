"""What the autotuner shows: the ranked table of a tuning run, and the model's pick for a spec."""

from __future__ import annotations

import math

from rich.markup import escape
from rich.table import Table

from attncc.autotune.cost import device_spec
from attncc.autotune.space import describe, rank
from attncc.autotune.tuner import TuneResult
from attncc.ir.canonical import canonicalize, resolve_heads
from attncc.ir.spec import Spec


def ranked_table(result: TuneResult, rows: int) -> Table:
    """The timed candidates and then the model's next ones, up to ``rows``, in the model's order."""
    timed = sorted((t for t in result.trials if t.timing or t.error), key=lambda t: t.measured_us)
    measured_rank = {id(t): i + 1 for i, t in enumerate(timed) if not t.error}
    best = result.best.measured_us
    table = Table(title=f"candidates by predicted time ({result.device.name} model)", title_justify="left")
    for col in ("rank", "candidate", "predicted us", "measured us", "vs best", "measured rank", "note"):
        table.add_column(col, justify="left" if col in ("candidate", "note") else "right")
    for t in result.trials[:rows]:
        r = t.ranked
        measured = t.measured_us
        shown = "-" if math.isnan(measured) else ("failed" if math.isinf(measured) else f"{measured:,.1f}")
        ratio = f"{measured / best:.2f}x" if math.isfinite(measured) else "-"
        note = t.error or ("default" if r.is_default else "")
        table.add_row(
            str(r.rank),
            describe(r.config),
            f"{r.prediction.us:,.1f}",
            shown,
            ratio,
            str(measured_rank.get(id(t), "-")),
            escape(note),
        )
    return table


def model_pick(spec: Spec) -> str:
    """The cost model's pick and predicted time for each distinct head pattern of ``spec``
    (batch 1, the spec's heads), beside lowering's default config: for ``attncc analyze``."""
    device = device_spec()
    heads = resolve_heads(spec.pattern, spec.heads)
    counts: dict = {}
    for h in heads:
        p = canonicalize(h, spec.grid)
        counts[p] = counts.get(p, 0) + 1
    lines = [f"cost model ({device.name}, {device.sms} SMs, batch 1; no GPU needed):"]
    for pattern, n_heads in list(counts.items())[:4]:
        ranked = rank(pattern, spec.grid, n_heads, spec.head_dim, spec.dtype, device)
        pick = ranked[0]
        default = next(r for r in ranked if r.is_default)
        p = pick.prediction
        lines.append(
            f"  {_count(n_heads, 'head')}: pick {describe(pick.config)}, predicted {p.us:,.1f} us "
            f"({p.programs:,} programs, {p.resident} resident per SM, {_count(p.waves, 'wave')}); "
            f"default {describe(default.config)}: {default.prediction.us:,.1f} us, "
            f"rank {default.rank} of {len(ranked)}"
        )
    if len(counts) > 4:
        lines.append(f"  ... and {len(counts) - 4} more head patterns")
    return escape("\n".join(lines))


def _count(n: int, noun: str) -> str:
    """``1 head``, ``2 heads``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"

"""The static profile as a table (terminal or markdown) and as JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from rich.table import Table

from attncc.machine.profile import KernelProfile, Profile, tile_ratio

_SHORT = {
    "attention_fwd_kernel": "fwd",
    "attention_bwd_dq_kernel": "dQ",
    "attention_bwd_dkdv_kernel": "dK/dV",
}
COLUMNS = (
    "kernel", "tiles", "warps", "regs", "spills", "smem KiB", "loop", "instr/tile", "HGMMA", "loads",
    "branches", "tiles run", "partial/full", "estimate",
)  # fmt: skip


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def rows(profile: Profile) -> list[list[str]]:
    """One row per loop of every kernel (kernel figures on its first row)."""
    out = []
    for k in profile.kernels:
        head = [_SHORT.get(k.kernel, k.kernel), k.tiles, str(k.warps), str(k.registers), str(k.spill_bytes)]
        head.append(f"{k.shared_bytes / 1024:.0f}")
        tail = [_pct(tile_ratio(k)), _pct(k.estimate) + (" ?" if k.unmatched else "")]
        if not k.loops:
            out.append([*head, "(none)", "", "", "", "", "", *tail])
        for i, loop in enumerate(k.loops):
            cells = [loop.name, str(loop.instructions), str(loop.hgmma), loop.loads, str(loop.branches)]
            cells.append(f"{loop.tiles:,}")
            out.append([*(head if i == 0 else [""] * 6), *cells, *(tail if i == 0 else ["", ""])])
    return out


def title(profile: Profile) -> str:
    shape = "x".join(map(str, profile.shape[2:]))
    score = f" {profile.score}" if profile.score != "softmax" else ""
    return (
        f"{profile.name or 'case'}: B={profile.shape[0]} H={profile.shape[1]} grid {shape} "
        f"D={profile.head_dim} {profile.dtype}{score} on {profile.target}, triton {profile.triton}: "
        f"forward {_pct(profile.forward_estimate)}, backward {_pct(profile.backward_estimate)}"
    )


def table(profile: Profile) -> Table:
    t = Table(title=title(profile), title_justify="left")
    for col in COLUMNS:
        t.add_column(col, justify="left" if col in ("kernel", "tiles", "loop", "loads") else "right")
    for row in rows(profile):
        t.add_row(*row)
    return t


def markdown(profiles: list[Profile]) -> str:
    """Every profile as one markdown table (a case column first), then the ptxas warnings."""
    lines = ["| case | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for p in profiles:
        for i, row in enumerate(rows(p)):
            lines.append(f"| {p.name if i == 0 else ''} | " + " | ".join(row) + " |")
    warned = [(p.name, k) for p in profiles for k in p.kernels if k.warnings]
    lines.append("")
    lines.append("ptxas warnings: " + ("none" if not warned else ""))
    for name, k in warned:
        lines.extend(f"- {name} {_SHORT.get(k.kernel, k.kernel)}: {w}" for w in k.warnings)
    return "\n".join(lines) + "\n"


def summary(profiles: list[Profile]) -> str:
    """Per case, the forward and backward estimates as a markdown table."""
    lines = ["| case | forward | backward |", "|---|---|---|"]
    lines += [f"| {p.name} | {_pct(p.forward_estimate)} | {_pct(p.backward_estimate)} |" for p in profiles]
    return "\n".join(lines) + "\n"


def to_json(profiles: list[Profile]) -> list[dict]:
    out = []
    for p in profiles:
        d = dataclasses.asdict(p)
        d["forward_estimate"], d["backward_estimate"] = p.forward_estimate, p.backward_estimate
        for kd, k in zip(d["kernels"], p.kernels):
            kd["estimate"], kd["partial_over_full"] = k.estimate, tile_ratio(k)
        out.append(d)
    return out


def write_json(profiles: list[Profile], path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_json(profiles), indent=1) + "\n")


def problems(k: KernelProfile) -> list[str]:
    """What keeps a kernel from the static targets that do not depend on the case (issue 15):
    spills, ptxas warnings, a loop that is not software-pipelined or branches."""
    out = []
    if k.spill_bytes:
        out.append(f"{k.spill_bytes} B of spills")
    out.extend(f"ptxas: {w}" for w in k.warnings)
    for loop in k.loops:
        if not loop.pipelined and loop.loads != "none":
            out.append(f"{loop.name} loop: {loop.loads} loads (not pipelined)")
    return out


def write_section(path: Path, text: str) -> None:
    """Put ``text``, a markdown section whose first line is its ``## `` title, into the file at
    ``path``: in place of the section of the same title, or appended (one per triton version)."""
    old = path.read_text() if path.exists() else ""
    title = text.splitlines()[0]
    pattern = re.compile(re.escape(title) + r"\n.*?(?=\n+## |\Z)", re.S)
    new = pattern.sub(lambda _: text.rstrip("\n"), old) if title in old else old.rstrip("\n") + "\n\n" + text
    path.write_text(new if new.endswith("\n") else new + "\n")


def section_main(doc: str, section: Callable[[], tuple[str, list[str]]]) -> None:
    """A profiling script's command line: print ``section()``'s text, write it with ``--markdown
    FILE`` (:func:`write_section`), and exit 1 when it found problems (printed to stderr)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path, help="write the section into this file")
    args = parser.parse_args()
    text, failed = section()
    print(text)
    if args.markdown:
        write_section(args.markdown, text)
    for line in failed:
        print("FAILED", line, file=sys.stderr)
    sys.exit(1 if failed else 0)

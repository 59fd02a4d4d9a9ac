"""The static profile of the issue3 cases and of the backward of dense, causal, 2-D and 3-D
neighborhoods, for sm_90, with no GPU: writes benchmarks/STATIC.md.

    env -u TRITON_INTERPRET python benchmarks/static_profile.py --markdown benchmarks/STATIC.md
    env -u TRITON_INTERPRET python benchmarks/static_profile.py --terms-only --markdown benchmarks/STATIC.md

Every case is compiled at bf16 and fp16, head dim 64 and 128, exactly as attncc.attention
launches it (attncc.machine), and checked against the targets of issue 15. The markdown file
keeps one section per triton version: run the script once with each triton (the GPU
machines' 3.6.0 and the one a fresh install gets) to fill both. Exits non-zero when a target
is missed or a kernel fails to compile.

Each section ends with the score terms' kernels (issue 17): the ``terms`` bench suite's cases
(bf16, head dim 128), forward and backward (the 2-D neighborhood's table learned), and a few
more terms forward, each beside the same case without terms; ``--terms-only`` profiles those
alone and replaces that part of this triton's section. Their per-score costs are the cost
model's term constants (attncc.autotune.constants).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import textwrap
import time
from pathlib import Path

from attncc.bench.suite import Case, load_cases
from attncc.ir import Grid, causal, neighborhood, parse_score
from attncc.machine import profile, tile_ratio
from attncc.machine.profile import Profile, ops_per_score
from attncc.machine.report import markdown, problems, to_json

BACKWARD = (
    "dense-16384",
    "causal-16384",
    "na2d-128x128-w31",
    "na2d-128x128-w15-d4",
    "na3d-16x48x48-w7x15x15",
)
FORWARD_TARGET = {"dense-16384": 0.95, "causal-16384": 0.95}  # others listed in issue 15: 0.85
FORWARD_TARGET_DEFAULT = {
    "swa-2048-32768",
    "na2d-128x128-w31",
    "na2d-128x128-w15-d4",
    "na3d-16x48x48-w7x15x15",
}
BACKWARD_TARGET = 0.75
RATIO_TARGET = 1.5  # partial-tile loop over full-tile loop, instructions
FULL_VS_DENSE = 1.15  # a neighborhood's full-tile loop over the dense kernel's
VARIANTS = [("bfloat16", 128), ("float16", 128), ("bfloat16", 64), ("float16", 64)]


def _forward_target(name: str) -> float | None:
    return FORWARD_TARGET.get(name, 0.85 if name in FORWARD_TARGET_DEFAULT else None)


def run(variants: list[tuple[str, int]]) -> tuple[list, list[str]]:
    cases = load_cases("issue3")
    profiles, misses = [], []
    for dtype, d in variants:
        dense_full = None
        for case in cases:
            t = time.time()
            p = profile(
                case.pattern, case.grid, case.batch, case.heads, d, dtype, backward=case.name in BACKWARD,
                name=f"{case.name} {dtype} D{d}",
            )  # fmt: skip
            profiles.append(p)
            print(
                f"{p.name}: fwd {p.forward_estimate}, bwd {p.backward_estimate} ({time.time() - t:.0f} s)",
                flush=True,
            )
            misses += [f"{p.name} {k.kernel}: {x}" for k in p.kernels for x in problems(k)]
            fwd = p.kernels[0]
            if case.name.startswith("dense"):
                dense_full = fwd.loop("full")
            target = _forward_target(case.name)
            if target is not None and (p.forward_estimate or 0) < target:
                misses.append(f"{p.name}: forward estimate {p.forward_estimate or 0:.4f} < {target}")
            if case.name in BACKWARD and (p.backward_estimate or 0) < BACKWARD_TARGET:
                misses.append(
                    f"{p.name}: backward estimate {p.backward_estimate or 0:.4f} < {BACKWARD_TARGET}"
                )
            for k in p.kernels:
                ratio = tile_ratio(k)
                if ratio is not None and ratio > RATIO_TARGET:
                    misses.append(f"{p.name} {k.kernel}: partial/full {ratio:.2f} > {RATIO_TARGET}")
            full = fwd.loop("full")
            if case.name.startswith("na") and full and dense_full:
                if full.instructions > FULL_VS_DENSE * dense_full.instructions:
                    misses.append(
                        f"{p.name}: full-tile loop {full.instructions} > {FULL_VS_DENSE} x dense's "
                        f"{dense_full.instructions}"
                    )
    return profiles, misses


def section(profiles: list, misses: list[str]) -> str:
    import triton

    lines = [
        f"## triton {triton.__version__}",
        "",
        f"Profiled {datetime.date.today()} by `benchmarks/static_profile.py`.",
    ]
    lines += ["", "| case | " + " | ".join(f"{dt} D{d} fwd / bwd" for dt, d in VARIANTS) + " |"]
    lines += ["|---|" + "---|" * len(VARIANTS)]
    by_case: dict[str, dict] = {}
    for p in profiles:
        case, dt, d = p.name.rsplit(" ", 2)
        by_case.setdefault(case, {})[(dt, int(d[1:]))] = p
    for case, per in by_case.items():
        cells = []
        for v in VARIANTS:
            p = per.get(v)
            f = "-" if p is None or p.forward_estimate is None else f"{p.forward_estimate:.2f}"
            b = "" if p is None or p.backward_estimate is None else f" / {p.backward_estimate:.2f}"
            cells.append(f + b)
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += ["", "Targets missed: " + ("none." if not misses else "")]
    lines += [f"- {m}" for m in misses]
    for v in VARIANTS:
        chosen = [p for p in profiles if p.name.endswith(f"{v[0]} D{v[1]}")]
        lines += ["", f"### {v[0]}, head dim {v[1]}", "", markdown(chosen).rstrip()]
    return "\n".join(lines) + "\n"


TERMS_HEADING = "### Score terms (issue 17), bfloat16, head dim 128"
# Terms the bench suite does not time, profiled forward beside its plain cases.
TERMS_MORE = [
    Case("causal-4096+temperature", causal(), Grid((4096,)), score=parse_score("temperature")),
    Case("causal-4096+query-bias", causal(), Grid((4096,)), score=parse_score("query_bias")),
    Case(
        "na2d-64x64-w13+alibi-axes",
        neighborhood(13),
        Grid((64, 64)),
        score=parse_score("alibi(distance='axes')"),
    ),
]


def run_terms() -> tuple[list[Profile], list[str]]:
    """The terms suite's cases (forward and backward) and :data:`TERMS_MORE` (forward)."""
    profiles, problems_found = [], []
    for case in [*load_cases("terms"), *TERMS_MORE]:
        t = time.time()
        p = profile(
            case.pattern, case.grid, case.batch, case.heads, case.head_dim, case.dtype,
            backward=case not in TERMS_MORE, score=case.score.form.text, name=case.name,
        )  # fmt: skip
        profiles.append(p)
        print(
            f"{p.name}: fwd {p.forward_estimate}, bwd {p.backward_estimate} ({time.time() - t:.0f} s)",
            flush=True,
        )
        problems_found += [f"{p.name} {k.kernel}: {x}" for k in p.kernels for x in problems(k)]
    return profiles, problems_found


TERMS_INTRO = (
    "Each term's kernels beside the same case without terms (`+softmax`): B=1, H=16, as the "
    "`terms` bench suite runs them (the backward of `na2d-64x64-w13+rpb` learns its table). "
    "*added* = instructions per warp per tile over the plain kernel's same loop; *per score* = "
    "those as lane operations per score element (x warps x 32 / scores per tile), the unit of "
    "the cost model's term constants (`attncc/autotune/constants.py`)."
)
TERMS_COLUMNS = (
    "case", "score", "kernel", "tiles", "warps", "regs", "spills", "loop", "instr/tile", "added", "per score",
    "estimate",
)  # fmt: skip
_SHORT = {
    "attention_fwd_kernel": "fwd",
    "attention_bwd_dq_kernel": "dQ",
    "attention_bwd_dkdv_kernel": "dK/dV",
}


def _plain_of(p: Profile, profiles: list[Profile]) -> Profile | None:
    """The profile of the same case without terms (the terms suite's ``+softmax`` twin)."""
    base = p.name.split("+", 1)[0] + "+softmax"
    return None if p.name == base else next((o for o in profiles if o.name == base), None)


def terms_section(profiles: list[Profile], found: list[str]) -> str:
    """Per case and kernel loop: registers, spills, SASS instructions per tile, the instructions
    the terms add over the plain case's same loop (and per score element: the cost model's
    unit), and the estimate."""
    lines = [
        TERMS_HEADING,
        "",
        textwrap.fill(TERMS_INTRO, width=95),
        "",
        "| " + " | ".join(TERMS_COLUMNS) + " |",
        "|" + "---|" * len(TERMS_COLUMNS),
    ]
    for p in profiles:
        plain = _plain_of(p, profiles)
        for ki, k in enumerate(p.kernels):
            base = next((b for b in plain.kernels if b.kernel == k.kernel), None) if plain else None
            for li, loop in enumerate(k.loops):
                other = base.loop(loop.name) if base else None
                added = loop.instructions - other.instructions if other else None
                cells = [
                    p.name if ki == li == 0 else "",
                    p.score if ki == li == 0 else "",
                    _SHORT[k.kernel] if li == 0 else "",
                    k.tiles if li == 0 else "",
                    str(k.warps) if li == 0 else "",
                    str(k.registers) if li == 0 else "",
                    str(k.spill_bytes) if li == 0 else "",
                    loop.name,
                    str(loop.instructions),
                    "-" if added is None else f"{added:+d}",
                    "-" if added is None else f"{ops_per_score(added, k):+.2f}",
                    f"{k.estimate:.2f}" if li == 0 and k.estimate is not None else "",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Problems (spills, ptxas warnings, loops not pipelined): " + ("none." if not found else "")]
    lines += [f"- {x}" for x in found]
    return "\n".join(lines) + "\n"


def splice_terms(section_text: str, terms: str) -> str:
    """``section_text`` (one triton's section) with its score-terms part replaced by ``terms``
    (or ``terms`` added at its end)."""
    start = section_text.find(TERMS_HEADING)
    if start < 0:
        return section_text.rstrip() + "\n\n" + terms
    end = section_text.find("\n### ", start + len(TERMS_HEADING))
    rest = section_text[end + 1 :] if end >= 0 else ""
    return section_text[:start] + terms + ("\n" + rest if rest else "")


def cutlass_section() -> str:
    """The CUTLASS forward of each issue3 case it takes (bf16, D=128), read from its machine code."""
    from attncc.lower.lowering import lower
    from attncc.machine.cutlass import profile_cutlass, unavailable
    from attncc.runtime import cutlass_kernel, ops

    cases = load_cases("issue3")
    if unavailable():
        return f"\n### CUTLASS forward\n\nNot built here: {unavailable()}.\n"
    plans = []
    for case in cases:  # build side by side first: one nvcc run takes a core for a minute
        plan = lower(case.pattern, case.grid, 128, "bfloat16", config=ops.cutlass_config(128))
        cplan = cutlass_kernel.plan_for(case.pattern, case.grid, plan)
        if not isinstance(cplan, str):
            plans.append(cplan)
    cutlass_kernel.prebuild(plans)
    lines = ["", "### CUTLASS forward, bfloat16, head dim 128", ""]
    lines += ["| case | registers | spills (local) | stack | instructions | HGMMA | TMA copies |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for case in cases:
        functions = profile_cutlass(case.pattern, case.grid, 128, "bfloat16")
        if isinstance(functions, str):
            lines.append(f"| {case.name} | not taken: {functions} | | | | | |")
            continue
        for f in functions:
            lines.append(
                f"| {case.name} | {f.registers} | {f.local_bytes} | {f.stack_bytes} | {f.instructions} | "
                f"{f.hgmma} | {f.tma} |"
            )
    return "\n".join(lines) + "\n"


HEADER = """# Static profile of the kernels on sm_90 (no GPU)

Every kernel that `attncc.attention` launches for the issue3 cases (B=1, H=16) and for
the backward of dense, causal, 2-D and 3-D neighborhoods, compiled for sm_90 exactly as a
launch specialises it and read from its SASS (`attncc inspect`, `attncc.machine`). Per
kernel: registers, spill bytes, shared memory; per tile loop: SASS instructions per warp
per tile, HGMMA per tile, how the tiles are loaded (cp.async/TMA: software-pipelined), the
branches besides the back edge, and the tiles the launch runs through it. The estimate
is Note [Issue model] (`attncc/machine/model.py`): tensor-core cycles over modelled cycles
(a tile costs the larger of its tensor cycles and its instructions x warps / 4 schedulers;
per-program set-up is added; latencies, bandwidth and pipeline fill are ignored), over the
plan's exact tile mix. An estimate, not a measurement: no attncc kernel has run on a GPU
yet (`bash benchmarks/gpu_check.sh smoke` writes the measured efficiency beside it).

Targets (issue 15): no spills and no ptxas warning; both loops pipelined; partial-tile loop
at most 1.5x the full-tile loop; a neighborhood's full-tile loop within 15% of dense's;
forward estimate at least 0.95 (dense, causal) and 0.85 (window, 2-D and 3-D
neighborhoods); backward at least 0.75. Each section lists what it misses; the reasons:

- Head dim 64: a tile's dots are half those of head dim 128 while the softmax's work per
  score is the same (max, one FMA, exp2, sum, convert: about 4.5 instructions), so a 128x64
  tile has about 8 instructions per score to spend before issue, not the tensor cores,
  bounds it; its exp2s alone (16 per clock per SM on the MUFU pipe, which the model does
  not count) take as long as its dots. Full tiles fit (dense 0.95-0.97, causal 0.94-0.96); a
  partial tile's mask adds about 3 per score, so neighborhoods, whose tiles are mostly
  partial, reach 0.62-0.83 forward (the dilated one 0.62-0.72 backward), and the 1-D
  window's and the 3-D neighborhood's partial loops are 1.51-1.55x their full ones.
- Dilated neighborhoods (w15 d4, head dim 128): every tile is partial and a Q tile visits
  7.5 KV tiles, so the per-program set-up (Q load, bounds, pipeline prologue, epilogue:
  ~670 instructions) is a tenth of the work: 0.8499 on triton 3.6 (short by 0.0001), 0.8501
  on 3.9.
- Branches: the dK/dV loops that show one (triton 3.6 at head dim 64 and for the dilated
  case, 3.9 in the partial loops) hold ptxas's skip over the second 4-byte cp.async of the
  Q tile's lse and delta rows in the threads that load none (BSSY/BSYNC around four
  instructions): no branch of the source, and the loop stays software-pipelined.
- Score terms (issue 17): each section ends with the kernels of the `terms` bench suite (and a
  few more terms), each beside the same case without terms; what a term adds per tile and per
  score there is what the cost model charges for it (`attncc/autotune/constants.py`).
- TMA: not used. Every loop's cp.async loads are software-pipelined and, at head dim 128,
  the loops are tensor-bound in the model; at head dim 64 the loads and their address
  arithmetic are some 45 of a tile's 525-711 instructions, so TMA could recover at most ~6%
  there, not the gap.
"""


def current_section(path: Path) -> str:
    """This triton's section of the file at ``path`` (its heading alone when it has none)."""
    import triton

    heading = f"## triton {triton.__version__}"
    text = path.read_text() if path.exists() else ""
    found = [s for s in re.split(r"(?m)^(?=## triton )", text) if s.startswith(heading + "\n")]
    return found[0] if found else heading + "\n"


def merge(path: Path, new_section: str) -> str:
    """The file with this triton's section replaced (or added), other versions' kept."""
    text = path.read_text() if path.exists() else ""
    sections = re.split(r"(?m)^(?=## triton )", text)
    kept = [s for s in sections[1:] if not s.startswith(new_section.split("\n", 1)[0])]
    return (
        HEADER + "\n" + "\n".join(s.rstrip() + "\n" for s in sorted([*kept, new_section]))
        if kept
        else (HEADER + "\n" + new_section)
    )


def main() -> int:
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: interpreter kernels cannot be compiled")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", type=Path, help="write (merge) this triton's section into this file")
    ap.add_argument("--json", type=Path, help="write every profile as JSON")
    ap.add_argument("--quick", action="store_true", help="bf16, head dim 128 only")
    ap.add_argument("--cutlass", action="store_true", help="also build and read the CUTLASS forwards (nvcc)")
    ap.add_argument(
        "--terms-only",
        action="store_true",
        help="profile the score terms alone; keep the rest of the section",
    )
    args = ap.parse_args()
    variants = VARIANTS[:1] if args.quick else VARIANTS
    profiles, misses = ([], []) if args.terms_only else run(variants)
    for m in misses:
        print("MISSED", m)
    term_profiles, found = run_terms()
    terms = terms_section(term_profiles, found)
    if args.terms_only:
        text = splice_terms(current_section(args.markdown) if args.markdown else "", terms)
    else:
        text = section(profiles, misses) + (cutlass_section() if args.cutlass else "") + "\n" + terms
    if args.markdown:
        args.markdown.write_text(merge(args.markdown, text))
    if args.json:
        args.json.write_text(json.dumps(to_json(profiles + term_profiles), indent=1) + "\n")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())

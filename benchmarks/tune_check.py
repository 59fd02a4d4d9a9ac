"""How good is the cost model? Its pick against the best measured candidate, on a GPU.

    python benchmarks/tune_check.py --markdown benchmarks/RESULTS.md --json benchmarks/out/tune.json

The benchmark suite's ``issue3`` cases (attncc.bench.suite; bf16, B=1, H=16, D=128). Timing
every candidate does not fit a 10-minute run (the 3-D case has about 13,000),
so each case times a documented subset: the model's top ``--top`` (what
``attncc tune --top`` times), ``--spread`` candidates evenly spaced over the
rest of the model's order (to catch a fast candidate the model ranks low), and
lowering's default config. Reported per case: the pick's measured time over the
best measured one (target: within 10%), where the best sits in the model's
order, the default's time, the rank correlation of predicted and measured
times, and the tuning time of ``attncc tune --top`` (ranking, compiling and
timing its candidates). The JSON file keeps every timed candidate with its
prediction, for refitting the constants in attncc/autotune/constants.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import time

import numpy as np
import torch
import triton

from attncc.autotune.space import describe, rank
from attncc.autotune.tuner import input_sets, target_device, time_candidate
from attncc.bench.report import prepend
from attncc.bench.suite import load_cases
from attncc.lower.lowering import LaunchConfig

DTYPE = "bfloat16"
CASES = load_cases("issue3")
H, D = CASES[0].heads, CASES[0].head_dim


def _subset(ranked: list, top: int, spread: int) -> list:
    rest = ranked[top:]
    picks = {int(i) for i in np.linspace(0, len(rest) - 1, spread)} if rest and spread else set()
    chosen = ranked[:top] + [rest[i] for i in sorted(picks)]
    default = next(r for r in ranked if r.is_default)
    return chosen if default in chosen else [*chosen, default]


def _case(name, pattern, grid, device, top: int, spread: int, budget: float, warmup: int, runs: int) -> dict:
    start = time.perf_counter()
    default = LaunchConfig.default(device.type, D, DTYPE)
    ranked = rank(pattern, grid, H, D, DTYPE, target_device(device), default=default)
    rank_seconds = time.perf_counter() - start
    inputs = input_sets(1, H, grid, D, DTYPE, device)
    trials, top_seconds, cut = [], 0.0, False
    for r in _subset(ranked, top, spread):
        if time.perf_counter() - start > budget and r.rank > top and not r.is_default:
            cut = True
            continue
        t0 = time.perf_counter()
        trials.append(time_candidate(r, pattern, grid, inputs, device, warmup, runs))
        if r.rank <= top:
            top_seconds += time.perf_counter() - t0
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ok = [t for t in trials if not t.error]
    best = min(ok, key=lambda t: t.measured_us)
    pick = trials[0]  # the model's rank 1
    default = next(t for t in trials if t.ranked.is_default)
    predicted = np.array([t.ranked.prediction.us for t in ok])
    measured = np.array([t.measured_us for t in ok])
    rho = float(np.corrcoef(predicted.argsort().argsort(), measured.argsort().argsort())[0, 1])
    row = {
        "case": name,
        "candidates": len(ranked),
        "timed": len(trials),
        "budget_cut": cut,
        "pick": describe(pick.ranked.config),
        "pick_predicted_us": pick.ranked.prediction.us,
        "pick_us": pick.measured_us,
        "best": describe(best.ranked.config),
        "best_us": best.measured_us,
        "best_model_rank": best.ranked.rank,
        "default": describe(default.ranked.config),
        "default_us": default.measured_us,
        "spearman": rho,
        "tune_seconds": rank_seconds + top_seconds,
        "rank_seconds": rank_seconds,
        "trials": [
            {
                "config": describe(t.ranked.config),
                "model_rank": t.ranked.rank,
                "predicted_us": t.ranked.prediction.us,
                "measured_us": None if t.error else t.measured_us,
                "first_call_ms": t.timing.first_call if t.timing else None,
                "error": t.error,
                "prediction": dataclasses.asdict(t.ranked.prediction),
            }
            for t in trials
        ],
    }
    ratio = row["pick_us"] / row["best_us"]
    print(f"{name}: pick {row['pick']} {row['pick_us']:.1f} us, best {row['best']} {row['best_us']:.1f} us "
          f"(model rank {row['best_model_rank']}), pick/best {ratio:.3f}, tune {row['tune_seconds']:.1f} s",
          flush=True)  # fmt: skip
    return row


def _report(rows: list[dict], device_name: str, top: int, spread: int, markdown: str | None) -> None:
    within = sum(r["pick_us"] <= 1.1 * r["best_us"] for r in rows)
    head = [
        f"## Cost model vs measured, {datetime.date.today().isoformat()}, {device_name}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}; {DTYPE}, B=1, H={H}, D={D}. "
        f"Timed per case: the model's top {top}, {spread} spread over the rest of its order, "
        "and the default config; median of attncc.timing.measure (rotated inputs, warm-up excluded), "
        "microseconds.",
        f"Pick within 10% of the best timed candidate: {within} of {len(rows)} cases. Tune s: ranking "
        f"plus compiling and timing the top {top} (`attncc tune --top {top}`).",
        "",
        "| case | candidates | timed | model pick | predicted us | pick us | best timed | best us "
        "| best's model rank | pick / best | default us | rank corr. | tune s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines = [
        f"| {r['case']} | {r['candidates']} | {r['timed']}{' (cut)' if r['budget_cut'] else ''} "
        f"| {r['pick']} | {r['pick_predicted_us']:.1f} | {r['pick_us']:.1f} "
        f"| {r['best']} | {r['best_us']:.1f} | {r['best_model_rank']} "
        f"| {r['pick_us'] / r['best_us']:.3f} | {r['default_us']:.1f} "
        f"| {r['spearman']:.2f} | {r['tune_seconds']:.1f} |"
        for r in rows
    ]
    text = "\n".join(head + lines) + "\n"
    print(text)
    if markdown:
        prepend(markdown, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="prepend the results table to this file")
    parser.add_argument("--json", help="write every timed candidate here")
    parser.add_argument("--top", type=int, default=4, help="the model's top candidates timed per case")
    parser.add_argument("--spread", type=int, default=6, help="candidates spread over the rest of the order")
    parser.add_argument("--seconds", type=float, default=480, help="time budget for all cases")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_check.py needs a CUDA GPU")
    budget = args.seconds / len(CASES)
    device = torch.device("cuda")
    rows = []
    for case in CASES:
        name, pattern, grid = case.name, case.pattern, case.grid
        rows.append(_case(name, pattern, grid, device, args.top, args.spread, budget, args.warmup, args.runs))
    _report(rows, torch.cuda.get_device_name(), args.top, args.spread, args.markdown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "cases": rows}, f, indent=1, default=str)
        print(f"wrote {args.json}")
    if any(math.isinf(r["pick_us"]) for r in rows):
        sys.exit("the model's pick failed to run in some case")


if __name__ == "__main__":
    main()

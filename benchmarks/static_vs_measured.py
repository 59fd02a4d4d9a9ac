"""The measured efficiency of each benchmarked forward beside its static estimate.

    python benchmarks/static_vs_measured.py BENCH.json --markdown benchmarks/RESULTS.md

BENCH.json is what ``attncc bench issue3 --fwd --json`` wrote on the GPU. For each case
the kernels are profiled as attncc.machine profiles them (Note [Issue model]: ``ideal``
is the tensor-core time of every tile the plan visits, at the device's dense tensor
peak), and the measured efficiency is that ideal time over the measured median. The
static estimate is what the model predicts for the same ratio, so the table checks
the model the day a GPU runs it: measured / estimate is 1 where the model is right,
below 1 where it ignores something that costs (latency, bandwidth, pipeline fill).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from attncc.autotune.constants import DEVICES
from attncc.bench.report import prepend
from attncc.ir import Grid, parse
from attncc.machine import model, profile

FLOP_PER_CYCLE = model.TENSOR_FLOP_PER_CLOCK  # per SM, at the peak the datasheet quotes


def _peak_tflops(device_name: str, dtype: str) -> float:
    spec = next((s for key, s in DEVICES.items() if key in device_name.upper()), DEVICES["H100"])
    return spec.fp32_tflops if dtype == "float32" else spec.tensor_tflops


def rows(bench: dict) -> list[list[str]]:
    device = bench["environment"].get("device", "")
    out = []
    for r in bench["results"]:
        c = r["case"]
        ours = next((e for e in r["entries"] if e["peer"] == "attncc"), None)
        p = profile(
            parse(c["pattern"]), Grid(tuple(c["grid"])), c["batch"], c["heads"], c["head_dim"], c["dtype"],
            backward=False, name=c["name"],
        )  # fmt: skip
        fwd = p.kernels[0]
        flops = sum(k.ideal_cycles for k in p.kernels) * FLOP_PER_CYCLE[c["dtype"]]
        ideal_ms = flops / (_peak_tflops(device, c["dtype"]) * 1e12) * 1e3
        measured = ideal_ms / ours["median_ms"] if ours and ours.get("median_ms") else None
        estimate = p.forward_estimate
        ratio = measured / estimate if measured and estimate else None
        out.append([
            c["name"], fwd.tiles, f"{ours['median_ms']:.4g}" if measured else ours["status"] if ours else "-",
            f"{ideal_ms:.4g}", "-" if measured is None else f"{measured:.2f}",
            "-" if estimate is None else f"{estimate:.2f}", "-" if ratio is None else f"{ratio:.2f}",
        ])  # fmt: skip
    return out


def markdown(bench: dict) -> str:
    env = bench["environment"]
    head = (
        "| case | tile boxes | attncc ms | ideal ms | measured efficiency | static estimate "
        "| measured / estimate |"
    )
    lines = [
        f"## Measured efficiency beside the static estimate ({env.get('date', '')}, {env.get('device', '')})",
        "",
        "Forward, bf16 unless the case says otherwise. Ideal: the tensor-core time of the tiles the plan",
        "visits at the dense peak (Note [Issue model], attncc/machine/model.py); measured efficiency: ideal",
        "over the measured median; static estimate: the model's prediction of that ratio, with no GPU.",
        "",
        head,
        "|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(bench)]
    return "\n".join(lines) + "\n\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path, help="the JSON of attncc bench --fwd")
    ap.add_argument("--markdown", type=Path, help="prepend the table to this file")
    args = ap.parse_args()
    if torch.cuda.is_available():
        torch.cuda.init()
    text = markdown(json.loads(args.bench.read_text()))
    print(text)
    if args.markdown:
        prepend(args.markdown, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Context parallelism planned from the pattern (issue 19): bytes and balance per rank, attncc's
plan against ring attention and Ulysses, from the analysis alone (no kernel runs, CPU is fine).

    python benchmarks/context_parallel.py [--markdown benchmarks/CONTEXT_PARALLEL.md]

(About ten minutes on two CPU cores: the packed documents have no per-axis closed form and are
counted pair by pair, for each sharding ``choose_sharding`` weighs.)

For each case and rank count: the bytes each rank receives in the forward pass (attncc's plan:
the key slices its queries see; ring attention: every other rank's k and v; Ulysses: the head
all-to-alls of q, k, v and the output; the backward returns as much: Note [Bytes of the methods]
in attncc.distributed.plan), the work per rank (kept query-key pairs over all heads; ring's is
attncc's on the same sharding), its max over its mean, the sharding ``choose_sharding`` picks
and the method the planner picks. The issue's bar, for every local pattern: less traffic than
ring attention on every rank, and work balanced within 10% (max / mean <= 1.10).
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import dataclass

import numpy as np

from attncc.distributed import Sharding, choose_sharding, plan
from attncc.ir import (
    Grid,
    Pattern,
    causal,
    dense,
    document,
    key_range,
    neighborhood,
    sliding_window,
)

HEADS, HEAD_DIM, ITEMSIZE = 16, 128, 2  # bf16


def _documents(n: int, seed: int = 0) -> list[int]:
    """Packed documents of 256 to 4096 tokens (uniform lengths, the last one cut)."""
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    while len(ids) < n:
        ids += [len(set(ids))] * int(rng.integers(256, 4097))
    return ids[:n]


@dataclass(frozen=True)
class Case:
    name: str
    pattern: Pattern
    grid: Grid
    local: bool  # a local pattern: the bar applies


CASES = [
    Case("na2d 128x128, window 31", neighborhood(31), Grid((128, 128)), True),
    Case("na2d 128x128, window 13, dilation 2", neighborhood(13, dilation=2), Grid((128, 128)), True),
    Case("na3d 16x48x48, window 7x15x15", neighborhood((7, 15, 15)), Grid((16, 48, 48)), True),
    Case("na3d 64x96x160, window 7x15x15", neighborhood((7, 15, 15)), Grid((64, 96, 160)), True),
    Case(
        "na3d 64x96x160, causal in time",
        neighborhood((7, 15, 15), causal=(True, False, False)),
        Grid((64, 96, 160)),
        True,
    ),
    Case(
        "1-D 32K, window 4096 + 4 sinks",
        sliding_window(4095) | (key_range(0, hi=3) & causal()),
        Grid(32768),
        True,
    ),
    Case("1-D 16K, packed documents", document(_documents(16384)), Grid(16384), True),
    Case("1-D 32K, causal", causal(), Grid(32768), False),
    Case("1-D 16K, dense", dense(), Grid(16384), False),
]
RANKS = (4, 8)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _order(sharding: Sharding, grid: Grid) -> str:
    if not sharding.cuts:
        return sharding.order
    return "balanced: " + " ".join(
        f"{lo}-{hi - 1}" for lo, hi in zip((0, *sharding.cuts), (*sharding.cuts, grid.shape[0]))
    )


def rows() -> list[list[str]]:
    out = []
    for case in CASES:
        for ranks in RANKS:
            if case.grid.shape[0] % ranks:
                continue
            sharding = choose_sharding(case.pattern, case.grid, ranks, HEADS)
            p = plan(case.pattern, case.grid, sharding, HEADS, head_dim=HEAD_DIM, itemsize=ITEMSIZE)
            ours = [p.p2p_bytes(r) for r in range(ranks)]
            ring = [p.ring_bytes(r) for r in range(ranks)]
            picked = [p.bytes(p.method, r) for r in range(ranks)]
            less = all(a < b for a, b in zip(picked, ring))
            met = less and p.imbalance(p.method) <= 1.10
            bar = "-" if not case.local else ("yes" if met else "**no**")
            fits = p.ulysses_fits
            out.append([
                case.name, str(ranks), _order(sharding, case.grid), " / ".join(_mib(b) for b in ours),
                " / ".join(_mib(b) for b in ring) if len(set(ring)) > 1 else _mib(ring[0]),
                _mib(p.ulysses_bytes(0)) if fits else "-", f"{max(ours) / max(ring):.3f}",
                f"{p.imbalance():.3f}", f"{p.imbalance('ulysses'):.3f}" if fits else "-", p.method, bar,
            ])  # fmt: skip
    return out


HEADER = [
    "case", "ranks", "sharding", "attncc MiB per rank", "ring MiB per rank", "Ulysses MiB",
    "attncc / ring (max)", "work max/mean (attncc, ring)", "work max/mean (Ulysses)", "planner picks",
    "bar met",
]  # fmt: skip


def markdown(table: list[list[str]] | None = None) -> str:
    table = rows() if table is None else table
    local = [r for r in table if r[-1] != "-"]
    met = sum(r[-1] == "yes" for r in local)
    lines = [
        f"## Context parallelism: bytes and balance ({datetime.date.today()})",
        "",
        f"`python benchmarks/context_parallel.py`: the plans of `attncc.distributed` (issue 19) from the "
        f"analysis, {HEADS} heads of {HEAD_DIM} in bf16, batch 1. Bytes: what one rank receives in the "
        "forward pass (the backward returns as much); Ulysses receives the same on every rank, ring too "
        "on equal shards. The planner picks the method whose busiest rank receives fewer bytes. "
        "Work: kept query-key pairs per rank over all heads; ring attention's equals attncc's on the same "
        "sharding (a ring that skips the keys its queries never see). Sharding: `choose_sharding`'s pick "
        "(least work on the busiest rank, then fewest bytes). Bar (local patterns): with the method "
        "picked, less traffic than ring attention on every rank and work max/mean <= 1.10.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    lines += [
        "",
        f"Bar met for {met} of {len(local)} local cases. Ulysses shows `-` where it does not apply "
        "(uneven shards from balanced cuts). Causal and dense are not local: attncc's plan moves as "
        "much as ring attention to the busiest rank there, and the planner picks Ulysses. Memory is "
        "not in these figures: attncc's execution keeps a buffer of the whole grid's k and v on every "
        "rank (O(N), where ring attention needs O(N / R); docs/distributed.md).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="write the table to this file")
    args = parser.parse_args()
    text = markdown()
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

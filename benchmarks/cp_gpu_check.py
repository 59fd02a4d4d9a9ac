"""Context parallelism (issue 19) on several GPUs over NCCL: each case's forward and backward
against the single-GPU attncc.attention on the same inputs, and the time of both.

    torchrun --nproc-per-node=N benchmarks/cp_gpu_check.py [--markdown benchmarks/RESULTS.md]

Every rank builds the same whole-grid inputs (seeded), runs its shard through
``attncc.distributed.attention`` and the whole grid through ``attncc.attention``, and compares
its rows of out, dq, dk, dv (bf16: within 3e-2 of the largest magnitude; the two sum their keys
in different orders). Rank 0 prints a table: case, sharding, method, max error, the
context-parallel step's median time beside one GPU's. A case whose grid does not cut into the
ranks is skipped, saying so.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist

import attncc
import attncc.distributed
from attncc.bench.report import prepend
from attncc.distributed import choose_sharding
from attncc.ir import Grid, Pattern, causal, key_range, neighborhood, sliding_window

HEADS, HEAD_DIM = 16, 128
CASES = [
    ("na2d 128x128, window 31", neighborhood(31), Grid((128, 128))),
    ("na3d 16x48x48, window 7x15x15", neighborhood((7, 15, 15)), Grid((16, 48, 48))),
    (
        "na3d 16x48x48, causal in time",
        neighborhood((7, 15, 15), causal=(True, False, False)),
        Grid((16, 48, 48)),
    ),
    ("1-D 32K, window 4096 + 4 sinks", sliding_window(4095) | (key_range(0, hi=3) & causal()), Grid(32768)),
    ("1-D 32K, causal", causal(), Grid(32768)),
]


def _time(step, runs: int = 5) -> float:
    times = []
    for _ in range(runs + 1):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:])


def _case(name: str, pattern: Pattern, grid: Grid, rank: int, world: int) -> list[str]:
    try:
        sharding = choose_sharding(pattern, grid, world, HEADS)
    except attncc.AttnccError as e:
        return [name, "-", "-", f"skipped: {e}", "-", "-"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    whole = [torch.randn(1, HEADS, grid.size, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
             for _ in range(4)]  # fmt: skip
    q, k, v, dout = whole
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = attncc.attention(*leaves, pattern, grid=grid)
    want.backward(dout)
    mine = [sharding.shard(t, rank, grid).detach().requires_grad_(True) for t in (q, k, v)]
    got = attncc.distributed.attention(*mine, pattern, grid, sharding)
    got.backward(sharding.shard(dout, rank, grid))
    err = 0.0
    for g, w in zip((got, *(t.grad for t in mine)), (want, *(t.grad for t in leaves))):
        w = sharding.shard(w.detach(), rank, grid)
        err = max(err, ((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-6)).item())
    worst = torch.tensor(err, device="cuda")
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)

    def cp_step() -> None:
        out = attncc.distributed.attention(*mine, pattern, grid, sharding)
        out.backward(sharding.shard(dout, rank, grid))

    def one_step() -> None:
        attncc.attention(*leaves, pattern, grid=grid).backward(dout)

    cp_ms, one_ms = _time(cp_step), _time(one_step)
    plan = attncc.distributed.plan(pattern, grid, sharding, HEADS, head_dim=HEAD_DIM)
    ok = "ok" if worst.item() <= 3e-2 else "**FAILED**"
    order = "balanced" if sharding.cuts else sharding.order
    return [name, order, plan.method, f"{worst.item():.2e} {ok}", f"{cp_ms:.2f}", f"{one_ms:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="prepend the table to this file (rank 0)")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rows = [_case(*case, rank, world) for case in CASES]
    if rank == 0:
        header = [
            "case",
            "sharding",
            "method",
            "max error / max |ref|",
            f"{world} GPUs fwd+bwd ms",
            "1 GPU ms",
        ]
        lines = [f"## Context parallelism on {world} GPUs ({torch.cuda.get_device_name()})", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        text = "\n".join(lines) + "\n"
        print(text)
        if args.markdown:
            prepend(args.markdown, text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

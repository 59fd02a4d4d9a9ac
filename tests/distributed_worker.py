"""Runs the cases of tests/distributed_cases.py on a gloo process group of ``world`` processes
(spawned here) and saves each rank's output and gradients: ``python distributed_worker.py WORLD
PORT OUT_DIR``. TRITON_INTERPRET must be set in the environment (the test sets it)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _case(case, rank: int) -> list[torch.Tensor]:
    import attncc.distributed

    q, k, v, dout = (case.sharding.shard(t, rank, case.grid) for t in case.inputs())
    for t in (q, k, v):
        t.requires_grad_(True)
    out = attncc.distributed.attention(q, k, v, case.pattern, case.grid, case.sharding, method=case.method)
    (out * dout).sum().backward()
    return [t.detach() for t in (out, q.grad, k.grad, v.grad)]


def _module(rank: int, compiled: bool = False) -> list[torch.Tensor]:
    from distributed_cases import MODULE_CASE, module, module_input

    from attncc.distributed import ContextParallelAttention

    attn = module()
    cp = ContextParallelAttention(attn, MODULE_CASE.sharding)
    if compiled:  # a training step under torch.compile: the exchange is a graph break
        cp = torch.compile(cp, backend="aot_eager")
    x, dout = (MODULE_CASE.sharding.shard(t, rank, MODULE_CASE.grid, dim=1) for t in module_input())
    x.requires_grad_(True)
    out = cp(x)
    (out * dout).sum().backward()
    grads = [p.grad for p in attn.parameters()]
    for g in grads:  # what DDP would do: sum the weights' gradients over the ranks
        dist.all_reduce(g)
    return [out.detach(), x.grad, *grads]


def _run(rank: int, world: int, port: int, out_dir: str) -> None:
    from distributed_cases import CASES, REPEATED

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for case in CASES[world]:
        results[case.name] = _case(case, rank)
        if case.name == REPEATED:
            results[case.name + "#again"] = _case(case, rank)
    if world == 2:
        results["module"] = _module(rank)
        results["module compiled"] = _module(rank, compiled=True)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    mp.spawn(_run, args=(world, port, out_dir), nprocs=world)

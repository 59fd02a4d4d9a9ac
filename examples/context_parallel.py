"""(5) Context parallelism: a video's frames split across ranks, each fetching only the frames its
queries can see (attncc.distributed), one training step checked against one process.

    TRITON_INTERPRET=1 python examples/context_parallel.py --size toy   # 2 CPU processes, gloo
    python examples/context_parallel.py                                 # every GPU, NCCL: 32x48x80 tokens
"""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import setup

from attncc.distributed import ContextParallelAttention, choose_sharding, plan
from attncc.ir import Grid, neighborhood
from attncc.nn import SparseAttention


def step(rank: int, world: int, port: int, size: str) -> None:
    cuda = size == "real"
    if cuda:
        torch.cuda.set_device(rank)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    grid, dim, heads = (Grid((4, 4, 6)), 16, 2) if size == "toy" else (Grid((32, 48, 80)), 1024, 8)
    pattern = neighborhood((3, 3, 5), causal=(True, False, False))  # causal in time, local in space
    sharding = choose_sharding(pattern, grid, world, heads)
    torch.manual_seed(0)  # the same weights and batch on every rank
    attn = SparseAttention(dim, heads, pattern, grid).to(device, dtype)
    x = torch.randn(1, grid.size, dim, device=device, dtype=dtype)
    mine = sharding.shard(x, rank, grid, dim=1)  # this rank's frames: [1, N / ranks, dim]
    out = ContextParallelAttention(attn, sharding)(mine)
    out.float().square().mean().backward()
    whole = sharding.shard(attn(x), rank, grid, dim=1)  # one process's result, this rank's rows
    error = torch.tensor((out - whole).abs().max().item(), device=device)
    dist.all_reduce(error, op=dist.ReduceOp.MAX)
    if rank == 0:
        p = plan(pattern, grid, sharding, heads, head_dim=dim // heads, itemsize=x.element_size())
        got = ", ".join(f"{p.p2p_bytes(r) / 2**10:,.0f} KiB" for r in range(world))
        ring = f"{p.ring_bytes(0) / 2**10:,.0f} KiB"
        print(f"{world} ranks, {sharding.order}: received {got} (ring: {ring} each), "
              f"work max/mean {p.imbalance():.3f}, method {p.method}")  # fmt: skip
        print(f"max |context-parallel - one process| = {error.item():.2e}")
    dist.destroy_process_group()


def main() -> None:
    args = setup(__doc__.splitlines()[0])
    world = 2 if args.size == "toy" else torch.cuda.device_count()
    if world < 2:
        print(f"skipped: context parallelism needs 2 or more GPUs, this machine has {world}")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(step, args=(world, port, args.size), nprocs=world)


if __name__ == "__main__":
    main()

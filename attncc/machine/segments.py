"""The static profile of the segments kernels (issue 16 part 4): sm_90 machine code, no GPU.

As for the other kernels (Note [As launched] in attncc.machine.launch), the launches are
recorded from the module's own ``launch`` and ``launch_backward`` (attncc.runtime.segments) on
meta tensors and compiled with Triton's binder, so the kernels are those a launch of the same
shapes runs. Per kernel (forward, dQ, dK/dV): registers, spills, shared memory, ptxas warnings,
and per marked loop (``full-p``/``partial-p``: the full and the partial tiles of pair p; ``heads``:
the query heads of a KV head in dK/dV) the SASS instructions per iteration and how its loads
reach shared memory (Note [Reading loops] in attncc.machine.sass). A loop appears once per
query segment that walks its pair (the template unrolls the segments): the table lists them
all. No issue-model estimate: the tile mix is that of the lists (Note [Segment kernels]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.runtime.jit import JITFunction

from attncc.errors import AttnccError
from attncc.ir.segments import BySegments
from attncc.ir.text import format_pattern
from attncc.machine.decode import DecodeKernelProfile, read_kernels
from attncc.machine.launch import HOPPER, Recorder
from attncc.runtime import segments

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class SegmentsProfile:
    """The three kernels of one case, with the plan's tiles."""

    name: str
    pattern: str
    shape: tuple[int, int, int, int]  # B, H, H_kv, N
    head_dim: int
    dtype: str
    boxes: str  # each segment's Q box / KV box
    visited: int  # tile pairs the forward visits (per batch element and head)
    tile_pairs: int  # tile pairs of the space
    block_m: int
    block_n: int
    stages: int
    target: str
    triton: str
    kernels: tuple[DecodeKernelProfile, ...]


def segments_profile(
    pattern: BySegments,
    batch: int = 1,
    heads: int = 24,
    kv_heads: int | None = None,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    name: str = "",
    softcap: float | None = None,
) -> SegmentsProfile:
    """Compile the kernels ``attncc.attention`` launches for ``pattern`` on ``[B, H, N, D]``
    tensors of its whole space (the scores capped by ``softcap`` when given) for sm_90, with no
    GPU, and read them. Needs the real Triton JIT: unset ``TRITON_INTERPRET`` first."""
    if dtype not in _TORCH_DTYPES:
        raise AttnccError(f"dtype = {dtype!r} is out of range; allowed: {', '.join(_TORCH_DTYPES)}")
    kernels = segments.compiled(pattern, head_dim, dtype, "cuda", softcap)
    if not isinstance(kernels.module.segments_fwd_kernel, JITFunction):
        raise AttnccError(
            "TRITON_INTERPRET = 1 is set: the kernels are interpreter functions; allowed: unset "
            "TRITON_INTERPRET in the process that profiles"
        )
    kv_heads = heads if kv_heads is None else kv_heads
    n, torch_dtype = pattern.space.size, _TORCH_DTYPES[dtype]
    q = torch.empty((batch, heads, n, head_dim), dtype=torch_dtype, device="meta")
    k, v = (torch.empty((batch, kv_heads, n, head_dim), dtype=torch_dtype, device="meta") for _ in "kv")
    o, do, dq = (torch.empty_like(q) for _ in range(3))
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    lse, delta = (torch.empty((batch, heads, n), dtype=torch.float32, device="meta") for _ in range(2))
    tables = tuple(torch.empty(t.shape, dtype=torch.int32, device="meta") for t in kernels.tables)
    recorder = Recorder()
    scale = head_dim**-0.5
    kernels.module.launch(q, k, v, o, lse, tables, scale, wrap=recorder)
    kernels.module.launch_backward(q, k, v, do, lse, delta, dq, dk, dv, tables, scale, wrap=recorder)
    plan = kernels.plan
    boxes = ", ".join(
        f"{s.name} {_box(s.q_box, g.rank)}/{_box(s.kv_box, g.rank)}"
        for s, g in zip(plan.segments, pattern.space.grids)
    )
    return SegmentsProfile(
        name=name or format_pattern(pattern),
        pattern=format_pattern(pattern),
        shape=(batch, heads, kv_heads, n),
        head_dim=head_dim,
        dtype=dtype,
        boxes=boxes,
        visited=int(kernels.tables[1][-1]),  # the last pair's end: every listed entry
        tile_pairs=plan.q_tiles * plan.kv_tiles,
        block_m=plan.block_m,
        block_n=plan.block_n,
        stages=plan.num_stages,
        target=f"sm_{HOPPER.arch}",
        triton=triton.__version__,
        kernels=read_kernels(recorder.calls),
    )


def _box(box: tuple[int, int, int], rank: int) -> str:
    return "x".join(map(str, box[3 - rank :]))


def problems(profile: SegmentsProfile) -> list[str]:
    """What the kernels must not have: spills, ptxas warnings."""
    out = []
    for k in profile.kernels:
        if k.spill_bytes:
            out.append(f"{k.kernel}: {k.spill_bytes} bytes of spills")
        out.extend(f"{k.kernel}: {w}" for w in k.warnings)
    return out


def markdown_rows(profiles: list[SegmentsProfile]) -> list[str]:
    """A markdown table: one row per kernel of every case."""
    head = (
        "| case | B, H:H_kv, N | boxes (Q/KV) | visited / tile pairs | kernel | programs | regs | spills | "
        "smem KiB | loops: instr/iter, mma, loads, branches |"
    )
    rows = [head, "|" + "---|" * 10]
    for p in profiles:
        b, h, h_kv, n = p.shape
        for i, k in enumerate(p.kernels):
            loops = "; ".join(
                f"{lp.name}: {lp.instructions}, {lp.mma}, {lp.loads}, {lp.branches}" for lp in k.loops
            )
            case = [p.name, f"{b}, {h}:{h_kv}, {n:,}", p.boxes, f"{p.visited:,} / {p.tile_pairs:,}"]
            cells = [*(case if i == 0 else [""] * 4), k.kernel, f"{k.programs:,}", str(k.registers)]
            cells += [str(k.spill_bytes), f"{k.shared_bytes / 1024:.0f}", loops or "(none)"]
            rows.append("| " + " | ".join(cells) + " |")
    return rows

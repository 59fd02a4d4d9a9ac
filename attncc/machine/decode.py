"""The static profile of the decode kernels (issue 16 part 2): sm_90 machine code, no GPU.

As for the general kernels (Note [As launched] in attncc.machine.launch), the calls are recorded
from attncc's own launch path (attncc.runtime.decode.forward) on meta tensors and compiled with
Triton's binder, so the kernels are those a launch of the same shapes runs. Per kernel (the
decode kernel, and the merge when the launch splits): registers, spills, shared memory, ptxas
warnings, and per loop (``kv``: one KV tile; ``splits``: one split row in the merge) the SASS
instructions per iteration and how its loads reach shared memory (Note [Reading loops] in
attncc.machine.sass). A decode tile is bound by its loads (Note [Decode masks every tile] in
attncc.lower.decode): what counts is that the ``kv`` loop is software-pipelined (cp.async) and
nothing spills, not an issue-model estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
from triton.runtime.jit import JITFunction

from attncc.errors import AttnccError
from attncc.ir.text import format_pattern
from attncc.machine import sass
from attncc.machine.launch import HOPPER, Recorder, compile_call
from attncc.runtime import decode

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class DecodeLoop:
    name: str
    instructions: int  # SASS instructions per iteration, per warp
    loads: str  # "tma", "cp.async", "plain" or "none"
    branches: int  # besides the back edge
    mma: int  # tensor-core instructions per iteration (HMMA / HGMMA)


@dataclass(frozen=True)
class DecodeKernelProfile:
    kernel: str
    programs: int
    warps: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    warnings: tuple[str, ...]
    loops: tuple[DecodeLoop, ...]

    def loop(self, name: str) -> DecodeLoop | None:
        return next((lp for lp in self.loops if lp.name == name), None)


@dataclass(frozen=True)
class DecodeProfile:
    """The decode kernels of one case, and the launch's split count and tiles."""

    name: str
    pattern: str
    score: str
    shape: tuple[int, int, int, int, int]  # B, H, H_kv, Lq, N
    head_dim: int
    dtype: str
    splits: int
    block_m: int
    block_n: int
    stages: int
    target: str
    triton: str
    kernels: tuple[DecodeKernelProfile, ...]


def decode_profile(
    pattern,
    keys: int,
    batch: int = 1,
    heads: int = 8,
    kv_heads: int = 1,
    queries: int = 1,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    score: str = "softmax",
    name: str = "",
    page: int | None = None,
) -> DecodeProfile:
    """Compile the kernels ``attncc.attention`` launches for a decode step of ``queries`` queries
    over ``keys`` keys (split as the cost model or ``ATTNCC_DECODE_SPLITS`` says; ``score`` the
    score's form, its terms given as contiguous tensors) for sm_90, with no GPU, and read them;
    ``page``: K/V in a pool of pages of that size (Note [Paged caches] in attncc.lower.decode).
    Needs the real Triton JIT: unset ``TRITON_INTERPRET`` first."""
    if dtype not in _TORCH_DTYPES:
        raise AttnccError(f"dtype = {dtype!r} is out of range; allowed: {', '.join(_TORCH_DTYPES)}")
    torch_dtype = _TORCH_DTYPES[dtype]
    text = format_pattern(pattern)
    paged = page is not None
    kern = decode.kernel(text, keys, queries, heads, kv_heads, head_dim, torch_dtype, "cuda", score, paged)
    if not isinstance(kern.module.decode_kernel, JITFunction):
        raise AttnccError(
            "TRITON_INTERPRET = 1 is set: the kernels are interpreter functions; allowed: unset "
            "TRITON_INTERPRET in the process that profiles"
        )
    q = torch.empty((batch, heads, queries, head_dim), dtype=torch_dtype, device="meta")
    shape = (batch * keys // page, page, kv_heads, head_dim) if paged else (batch, kv_heads, keys, head_dim)
    k, v = (torch.empty(shape, dtype=torch_dtype, device="meta") for _ in range(2))
    table = torch.empty((batch, keys // page), dtype=torch.int32, device="meta") if paged else None
    offsets = torch.empty((batch,), dtype=torch.int32, device="meta")
    recorder = Recorder()
    data = _placeholders(kern.plan, batch, heads)
    terms = [torch.empty((heads, 1)[: 1 + (name == "alibi")], device="meta") for name in kern.plan.inputs]
    decode.forward(q, k, v, kern, offsets, head_dim**-0.5, terms, data, wrap=recorder, block_table=table)
    plan = kern.plan
    return DecodeProfile(
        name=name or text,
        pattern=text,
        score=score,
        shape=(batch, heads, kv_heads, queries, keys),
        head_dim=head_dim,
        dtype=dtype,
        splits=recorder.calls[0].grid[1],
        block_m=plan.block_m,
        block_n=plan.block_n,
        stages=plan.num_stages,
        target=f"sm_{HOPPER.arch}",
        triton=triton.__version__,
        kernels=read_kernels(recorder.calls),
    )


def read_kernels(calls: list) -> tuple[DecodeKernelProfile, ...]:
    """Compile recorded launches (attncc.machine.launch) and read each kernel's resources and
    marked loops (also the static profile of the segments kernels: attncc.machine.segments)."""
    kernels = []
    for call in calls:
        compiled = compile_call(call)
        res = sass.resources(compiled.ptxas_log, compiled.name)
        found = sass.loops(sass.disassemble(compiled.cubin), compiled.source_file)
        loops = tuple(
            DecodeLoop(lp.name, lp.instructions, lp.loads, lp.counts["branches"], _mma(lp)) for lp in found
        )
        kernels.append(
            DecodeKernelProfile(
                kernel=compiled.name,
                programs=math.prod(call.grid),
                warps=compiled.num_warps,
                registers=res.registers,
                spill_bytes=res.spill_bytes,
                shared_bytes=compiled.shared_bytes,
                warnings=res.warnings,
                loops=loops,
            )
        )
    return tuple(kernels)


def _placeholders(plan, batch: int, heads: int) -> dict[str, torch.Tensor]:
    """Meta tensors shaped as a call's normalised data (Note [Runtime data forms] in
    attncc.runtime.data), per batch element and head."""
    out = {}
    for leaf in plan.runtime:
        if leaf.kind in ("block_mask", "topk_blocks"):
            blocks = math.ceil(plan.keys / leaf.block[2])
            out[leaf.kind] = torch.empty((batch, heads, blocks, blocks), dtype=torch.int8, device="meta")
        elif leaf.kind == "key_mask":
            out[leaf.kind] = torch.empty((batch, heads, plan.keys), dtype=torch.int8, device="meta")
        else:
            shape = (batch, plan.keys) if leaf.kind == "documents" else (batch,)
            out[leaf.kind] = torch.empty(shape, dtype=torch.int32, device="meta")
    return out


def _mma(loop: sass.Loop) -> int:
    return loop.counts["hgmma"] + loop.counts["hmma"]


def problems(profile: DecodeProfile) -> list[str]:
    """What the decode kernels must not have: spills, ptxas warnings, a KV loop that is not
    software-pipelined or has a branch in its body."""
    out = []
    for k in profile.kernels:
        if k.spill_bytes:
            out.append(f"{k.kernel}: {k.spill_bytes} bytes of spills")
        out.extend(f"{k.kernel}: {w}" for w in k.warnings)
    kv = profile.kernels[0].loop("kv")
    if kv is None:
        out.append("decode_kernel: no 'kv' loop in the SASS")
    elif kv.loads not in ("cp.async", "tma") or kv.branches:
        out.append(f"decode_kernel: the kv loop's loads are {kv.loads}, with {kv.branches} branches")
    return out


def markdown_rows(profiles: list[DecodeProfile]) -> list[str]:
    """A markdown table: one row per kernel of every case."""
    head = (
        "| case | B, H:H_kv, Lq, keys | splits | tiles (rows x keys, stages) | kernel | programs | regs | "
        "spills | smem KiB | loop: instr/iter, mma, loads, branches |"
    )
    rows = [head, "|" + "---|" * 10]
    for p in profiles:
        b, h, h_kv, lq, n = p.shape
        for i, k in enumerate(p.kernels):
            loops = "; ".join(
                f"{lp.name}: {lp.instructions}, {lp.mma}, {lp.loads}, {lp.branches}" for lp in k.loops
            )
            case = [
                p.name,
                f"{b}, {h}:{h_kv}, {lq}, {n:,}",
                str(p.splits),
                f"{p.block_m} x {p.block_n}, {p.stages}",
            ]
            cells = [*(case if i == 0 else [""] * 4), k.kernel, f"{k.programs:,}", str(k.registers)]
            cells += [str(k.spill_bytes), f"{k.shared_bytes / 1024:.0f}", loops or "(none)"]
            rows.append("| " + " | ".join(cells) + " |")
    return rows

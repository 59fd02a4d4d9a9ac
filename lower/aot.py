"""Compile a plan's Triton kernel for a GPU target ahead of time, with no GPU present.

Triton lowers to PTX and SASS given a target, so a kernel that the CPU
interpreter accepts but the GPU compiler rejects is caught on any machine.
The module must be loaded with ``TRITON_INTERPRET`` unset (``@triton.jit``
makes interpreter functions, which cannot be compiled, when it is set).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attncc.lower.plan import KernelPlan
from attncc.lower.render import load

HOPPER = GPUTarget("cuda", 90, 32)
_POINTER = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


@dataclass(frozen=True)
class Compiled:
    """What the GPU compiler made of a plan."""

    shared_bytes: int
    tensor_cores: str  # "wgmma", "mma" or "none"


def compile_plan(plan: KernelPlan, target: GPUTarget = HOPPER) -> Compiled:
    """Compile ``plan``'s kernel for ``target``; raises what the compiler raises."""
    kernel = load(plan).attention_fwd_kernel
    p = _POINTER[plan.dtype]
    signature = {name: "i64" for name in kernel.arg_names[9:28]}  # the strides
    signature.update(
        Q=p, K=p, V=p, O=p, LSE="*fp32", TABLES="*i32", TILE_OFF="*i32", TILE_ENT="*i32", HEAD_MAP="*i32",
        H_LAUNCH="i32", KV_GROUP="i32", qk_scale="fp32", bias="fp32", WRITE_LSE="constexpr",
    )  # fmt: skip
    source = ASTSource(fn=kernel, signature=signature, constexprs={"WRITE_LSE": True})
    options = {"num_warps": plan.num_warps, "num_stages": plan.num_stages}
    compiled = triton.compile(source, target=target, options=options)
    ptx = compiled.asm["ptx"]
    cores = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "none")
    return Compiled(compiled.metadata.shared, cores)

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


KERNELS = ("attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel")
_INT_TABLES = ("TABLES", "TILE_OFF", "TILE_ENT", "HEAD_MAP", "SLOT_OFF", "SLOT_HEADS", "SLOT_KV")
_CONSTEXPRS = {"WRITE_LSE": True, "ACCUMULATE": False}


def _signature(arg_names: list[str], pointer: str) -> dict[str, str]:
    """Triton types of a generated kernel's arguments, by the template's naming."""
    types = {}
    for name in arg_names:
        if name in _CONSTEXPRS:
            types[name] = "constexpr"
        elif name in _INT_TABLES:
            types[name] = "*i32"
        elif name in ("LSE", "DELTA"):
            types[name] = "*fp32"
        elif name.isupper() and len(name) <= 2:  # Q, K, V, O, DO, DQ, DK, DV
            types[name] = pointer
        elif name in ("qk_scale", "scale", "bias"):
            types[name] = "fp32"
        elif name in ("H_LAUNCH", "KV_GROUP", "N_SLOTS"):
            types[name] = "i32"
        else:
            types[name] = "i64"  # strides
    return types


def compile_plan(
    plan: KernelPlan, target: GPUTarget = HOPPER, kernels: tuple[str, ...] = KERNELS
) -> dict[str, Compiled]:
    """Compile ``plan``'s kernels (default: forward and backward) for ``target``."""
    module = load(plan)
    options = {"num_warps": plan.num_warps, "num_stages": plan.num_stages}
    result = {}
    for name in kernels:
        kernel = getattr(module, name)
        signature = _signature(kernel.arg_names, _POINTER[plan.dtype])
        constexprs = {k: v for k, v in _CONSTEXPRS.items() if k in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=target, options=options)
        ptx = compiled.asm["ptx"]
        cores = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "none")
        result[name] = Compiled(compiled.metadata.shared, cores)
    return result

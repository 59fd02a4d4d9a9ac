"""Attention over a space of segments: ``attncc.attention(q, k, v, by_segments(...))`` (issue
16 part 4) on ``[B, H, N, D]`` tensors of the whole space, forward and backward, by the kernels
of Note [Segment kernels] in attncc.lower.segments (one launch each for the forward, dQ and
dK/dV, whatever the number of segments and pairs).

The first call with a given (pattern, head dim, dtype, device type) lowers, renders and loads
the kernels and builds their tile lists; later calls reuse them (memoised per process, the
rendered module kept in the kernel cache like every other).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import torch

from attncc import settings
from attncc.ir.segments import BySegments
from attncc.lower.render import load_segments
from attncc.lower.segments import SegmentPlan, lower_segments, segment_tables
from attncc.memo import memo


@dataclass(frozen=True, eq=False)  # one per compiled plan: hashed by identity
class SegmentKernels:
    """The loaded module of a segments plan and its int32 host tables."""

    plan: SegmentPlan
    module: ModuleType
    tables: tuple[np.ndarray, ...] = field(repr=False)


def tiles(device_type: str, dtype: str) -> tuple[int, int, int, int, int]:
    """(block_m, block_n, warps, stages, dK/dV warps): 64-token tiles on a GPU (fp32 dots take
    32 keys, as the one-grid kernels' fp32 configs do: attncc.lower.lowering.LaunchConfig.default),
    16 under the interpreter, where small tiles make the CPU tests walk several tiles per segment.

    Note [Segment backward warps]: the three kernels share one tiling (their lists are one
    table, read by Q tile and by KV tile), and the dK/dV program holds two float32 accumulators
    of 64 keys x D besides its scores: at D = 128 on 4 warps that is 255 registers and spills
    (benchmarks/STATIC.md), on 8 warps it fits, so dK/dV launches 8 warps on a GPU."""
    if device_type != "cuda":
        return 16, 16, 4, 1, 4
    return (64, 32, 8, 2, 8) if dtype == "float32" else (64, 64, 4, 2, 8)


@memo
def compiled(pattern: BySegments, head_dim: int, dtype: str, device_type: str) -> SegmentKernels:
    """The kernels of ``pattern`` for ``[B, H, N, D]`` tensors of head dim ``head_dim``."""
    plan = lower_segments(pattern, head_dim, dtype, *tiles(device_type, dtype))
    return SegmentKernels(plan, load_segments(plan), segment_tables(pattern, plan))


@memo
def _device_tables(kernels: SegmentKernels, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(t).to(device) for t in kernels.tables)


def _output_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer; NaN-filled when ``ATTNCC_POISON=1`` (tests), so an element no kernel
    writes fails the comparison."""
    return torch.full_like(t, float("nan")) if settings.poison() else torch.empty_like(t)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kernels: SegmentKernels, scale: float):  # type: ignore[override]
        b, h, n, _ = q.shape
        o = _output_like(q)
        lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
        tables = _device_tables(kernels, q.device)
        kernels.module.launch(q, k, v, o, lse, tables, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.kernels, ctx.scale = kernels, scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        delta = (do.float() * o.float()).sum(-1)
        if dlse is not None:  # p * dlse joins the score gradient: Note at attncc.runtime.ops.backward
            delta = delta - dlse
        dq, dk, dv = (_output_like(t) for t in (q, k, v))
        tables = _device_tables(ctx.kernels, q.device)
        delta = delta.contiguous()
        ctx.kernels.module.launch_backward(q, k, v, do, lse, delta, dq, dk, dv, tables, ctx.scale)
        return dq, dk, dv, None, None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BySegments, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of ``[B, H, N, D]`` q over ``[B, H_kv, N, D]`` k and v (checked by the caller,
    attncc.runtime.library.attention), ``lse`` float32 ``[B, H, N]``, both differentiable."""
    kernels = compiled(pattern, q.shape[-1], str(q.dtype).removeprefix("torch."), q.device.type)
    return _Attention.apply(q, k, v, kernels, scale)

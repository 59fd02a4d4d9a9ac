"""Attention over a space of segments: ``attncc.attention(q, k, v, by_segments(...))`` (issue
16 part 4) on ``[B, H, N, D]`` tensors of the whole space, forward and backward, by the kernels
of Note [Segment kernels] in attncc.lower.segments (one launch each for the forward, dQ and
dK/dV, whatever the number of segments and pairs).

The first call with a given (pattern, head dim, dtype, device type) lowers, renders and loads
the kernels and builds their tile lists; later calls reuse them (memoised per process, the
rendered module kept in the kernel cache like every other). The kernels run as torch.library
ops (Note [Segment ops]).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import torch
from torch.library import custom_op, register_autograd, register_fake, triton_op, wrap_triton

from attncc import settings
from attncc.ir.segments import BySegments
from attncc.ir.text import format_pattern, parse
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
    (benchmarks/STATIC.md), on 8 warps it fits, so dK/dV launches 8 warps on a GPU. With a
    soft-cap (its tanh tile besides) it still spills 64 bytes at D = 128: a dK/dV tiling of its
    own (fewer queries per tile, as the one-grid kernels' Note [Backward tiles]) would fit it."""
    if device_type != "cuda":
        return 16, 16, 4, 1, 4
    return (64, 32, 8, 2, 8) if dtype == "float32" else (64, 64, 4, 2, 8)


@memo
def compiled(
    pattern: BySegments, head_dim: int, dtype: str, device_type: str, softcap: float | None = None
) -> SegmentKernels:
    """The kernels of ``pattern`` for ``[B, H, N, D]`` tensors of head dim ``head_dim``, the
    scores capped by ``softcap`` when given."""
    plan = lower_segments(pattern, head_dim, dtype, *tiles(device_type, dtype), softcap, device_type)
    return SegmentKernels(plan, load_segments(plan), segment_tables(pattern, plan))


def _tables(kernels: SegmentKernels, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels' int32 tables on ``like``'s device (cached for real tensors; made afresh for
    the fake ones of a trace, as attncc.runtime.ops does)."""
    if type(like) is torch.Tensor:
        return _device_tables(kernels, like.device)
    return tuple(torch.as_tensor(t, device=like.device) for t in kernels.tables)


@memo
def _device_tables(kernels: SegmentKernels, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(t, device=device) for t in kernels.tables)


def _output_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer; NaN-filled when ``ATTNCC_POISON=1`` (tests), so an element no kernel
    writes fails the comparison."""
    return torch.full_like(t, float("nan")) if settings.poison() else torch.empty_like(t)


@memo
def _pattern(text: str) -> BySegments:
    pattern = parse(text)
    assert isinstance(pattern, BySegments), text  # the ops take the text attention() wrote
    return pattern


def _kernels(text: str, q: torch.Tensor, softcap: float | None) -> SegmentKernels:
    dtype = str(q.dtype).removeprefix("torch.")
    return compiled(_pattern(text), q.shape[-1], dtype, q.device.type, softcap)


def _fwd(
    q, k, v, pattern: str, scale: float, softcap: float | None, wrap
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n, _ = q.shape
    kernels = _kernels(pattern, q, softcap)
    o = _output_like(q)
    lse = q.new_empty((b, h, n), dtype=torch.float32)
    kernels.module.launch(q, k, v, o, lse, _tables(kernels, q), scale, wrap=wrap)
    return o, lse


def _bwd(
    q, k, v, o, lse, do, dlse, pattern: str, scale: float, softcap: float | None, wrap
) -> tuple[torch.Tensor, ...]:
    """dq, dk, dv; a gradient of the log-sum-exp joins the score gradient as ``delta - dlse``
    (Note at attncc.runtime.ops.backward)."""
    kernels = _kernels(pattern, q, softcap)
    delta = ((do.float() * o.float()).sum(-1) - dlse).contiguous()
    dq, dk, dv = (_output_like(t) for t in (q, k, v))
    tables = _tables(kernels, q)
    kernels.module.launch_backward(q, k, v, do, lse.contiguous(), delta, dq, dk, dv, tables, scale, wrap=wrap)
    return dq, dk, dv


# Note [Segment ops]: as the one-grid kernels (attncc.runtime.library), the segments kernels are
# torch.library ops taking the pattern as its text: a triton_op on CUDA, whose kernels
# torch.compile sees through wrap_triton, and an opaque custom_op with a fake under the
# interpreter; each with its backward registered, so a model that calls them compiles with no
# graph break. The pattern must be built before the compiled region: by_segments is not one of
# the node classes registered as opaque values (Note [Patterns under torch.compile] in
# attncc.runtime.dynamo), so one built inside it reaches the text's function as a shell.


@triton_op("attncc::segments_fwd", mutates_args=())
def fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: str,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse float32 ``[B, H, N]``) of ``[B, H, N, D]`` q over ``[B, H_kv, N, D]`` k, v."""
    return _fwd(q, k, v, pattern, scale, softcap, wrap_triton)


@triton_op("attncc::segments_bwd", mutates_args=())
def bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
        do: torch.Tensor, dlse: torch.Tensor, pattern: str, scale: float,
        softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dq, dk, dv) given the gradients of out (``do``) and of lse (``dlse``)."""
    return _bwd(q, k, v, o, lse, do, dlse, pattern, scale, softcap, wrap_triton)


@custom_op("attncc::segments_fwd_opaque", mutates_args=())
def fwd_opaque(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: str,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fwd` as an opaque op (the CPU interpreter)."""
    return _fwd(q, k, v, pattern, scale, softcap, None)


@custom_op("attncc::segments_bwd_opaque", mutates_args=())
def bwd_opaque(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
               do: torch.Tensor, dlse: torch.Tensor, pattern: str, scale: float,
               softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`bwd` as an opaque op."""
    return _bwd(q, k, v, o, lse, do, dlse, pattern, scale, softcap, None)


@register_fake("attncc::segments_fwd_opaque")
def _fwd_fake(q, k, v, pattern, scale, softcap=None):
    b, h, n, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, n), dtype=torch.float32)


@register_fake("attncc::segments_bwd_opaque")
def _bwd_fake(q, k, v, o, lse, do, dlse, pattern, scale, softcap=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, pattern, scale, softcap = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.args = (pattern, scale, softcap)


def _backward_with(op):
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        dq, dk, dv = op(q, k, v, o, lse, do, dlse, *ctx.args)
        return dq, dk, dv, None, None, None

    return backward


register_autograd("attncc::segments_fwd", _backward_with(bwd), setup_context=_setup_context)
register_autograd("attncc::segments_fwd_opaque", _backward_with(bwd_opaque), setup_context=_setup_context)


@torch.compiler.assume_constant_result  # Note [Patterns under torch.compile] in attncc.runtime.dynamo
def _text(pattern: BySegments) -> str:
    return _checked_text(pattern)


@memo  # eager calls format a pattern once
def _checked_text(pattern: BySegments) -> str:
    return format_pattern(pattern)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BySegments,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of ``[B, H, N, D]`` q over ``[B, H_kv, N, D]`` k and v (checked by the caller,
    attncc.runtime.library.attention), ``lse`` float32 ``[B, H, N]``, both differentiable, by the
    ops of Note [Segment ops]; ``softcap``: the cap of the scaled scores, if any."""
    op = torch.ops.attncc.segments_fwd if q.device.type == "cuda" else torch.ops.attncc.segments_fwd_opaque
    return op(q, k, v, _text(pattern), scale, softcap)

"""Running a CUTLASS forward kernel: the compiled shared object and the token permutation around it.

The kernel (``templates/cutlass/attention_fwd.cu.j2``) reads Q, K and V in
tile order and writes O and the log-sum-exp in tile order (Note [Tile order]
in :mod:`attncc.lower.cutlass`); :func:`forward` permutes in and out with
two gathers and a scatter, on the current CUDA stream. Only the forward runs
here: the backward of a CUTLASS forward is the Triton backward of the same
plan, which needs nothing but the output and the log-sum-exp.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from attncc.errors import AttnccError, PatternError
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.lower.cutlass import CutlassPlan, cutlass_plan, kv_order, q_order, refusal, render, render_example
from attncc.lower.plan import KernelPlan
from attncc.memo import memo
from attncc.runtime import nvcc

CAPABILITY = (9, 0)  # sm_90a: wgmma and TMA as the Hopper FMHA uses them

_ARGTYPES = (
    [ctypes.c_void_p] * 4  # q, k, v, o
    + [ctypes.c_void_p]  # lse
    + [ctypes.c_int] * 3  # batch, heads, kv_group
    + [ctypes.c_int64] * 14  # strides: q, k, v, o (row, batch, head), lse (batch, head)
    + [ctypes.c_float, ctypes.c_void_p]  # scale, stream
)


def unavailable(device: torch.device | str) -> str | None:
    """Why CUTLASS kernels cannot run on ``device`` here, or None when they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device.type}: CUTLASS kernels run on a CUDA GPU"
    if torch.cuda.get_device_capability(device) != CAPABILITY:
        capability = torch.cuda.get_device_capability(device)
        return f"compute capability {capability}: the kernels are built for sm_90a"
    if nvcc.nvcc_path() is None:
        return "nvcc is not on PATH (or CUDA_HOME): it builds the kernels on first use"
    if nvcc.cutlass_root() is None:
        return 'the nvidia-cutlass headers are not installed: pip install "attncc[cutlass]"'
    return None


@dataclass(frozen=True, eq=False)  # one per compiled plan: hashed by identity
class CutlassKernel:
    """A built kernel, its C entry point, and the row of each token in the tile order."""

    cplan: CutlassPlan
    entry: ctypes._CFuncPtr
    error: ctypes._CFuncPtr
    q_rows: np.ndarray  # q_rows[token] = its row in the permuted Q (and O, LSE)
    kv_rows: np.ndarray


def _rows(order: np.ndarray, tokens: int) -> np.ndarray:
    rows = np.empty(tokens, dtype=np.int64)
    real = np.flatnonzero(order >= 0)
    rows[order[real]] = real
    return rows


def build(cplan: CutlassPlan) -> Path:
    """The shared object of ``cplan``'s kernel, built once into the kernel cache (keyed by the plan
    and the source's hash, which covers a table plan's tables)."""
    return nvcc.build(render(cplan), cplan.label, {"plan": dataclasses.asdict(cplan.plan)})


def prebuild(cplans: Iterable[CutlassPlan], workers: int | None = None) -> None:
    """Build many plans' kernels at once: one nvcc run uses one core for about a minute, so a
    suite's kernels build in parallel before it runs (the cache's lock keeps each build single)."""
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        for future in [pool.submit(build, cplan) for cplan in dict.fromkeys(cplans)]:
            future.result()


@memo
def plan_for(pattern: Pattern, grid: Grid, plan: KernelPlan) -> CutlassPlan | str:
    """The CUTLASS plan of ``plan`` (lowered from ``pattern`` on ``grid``), or why there is none.
    Kept per process: a table plan's tiles come from the exact analysis, which the tuner would
    otherwise run twice per candidate (to prebuild, then to time)."""
    reason = refusal(plan)
    if reason is not None:
        return reason
    try:
        return cutlass_plan(plan, pattern, grid)
    except PatternError as e:  # a table too large to bake in
        return str(e)


@memo
def load(cplan: CutlassPlan) -> CutlassKernel:
    """Build (once, in the kernel cache) and load the CUTLASS kernel of ``cplan``."""
    plan = cplan.plan
    library = nvcc.load(build(cplan))
    entry = library.attncc_fwd
    entry.argtypes = _ARGTYPES
    entry.restype = ctypes.c_int
    error = library.attncc_error
    error.argtypes = []
    error.restype = ctypes.c_char_p
    tokens = int(np.prod(plan.grid))
    return CutlassKernel(cplan, entry, error, _rows(q_order(cplan), tokens), _rows(kv_order(cplan), tokens))


@memo
def _indices(kernel: CutlassKernel, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(kernel.q_rows).to(device), torch.from_numpy(kernel.kv_rows).to(device)


def _to_tiles(x: torch.Tensor, rows: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, count, H, D]`` in tile order, pad rows zero."""
    out = x.new_zeros((x.shape[0], count, x.shape[1], x.shape[3]))
    return out.index_copy_(1, rows, x.transpose(1, 2))


def forward(kernel: CutlassKernel, q, k, v, o, lse, scale: float) -> None:
    """Write ``o`` ([B, H, N, D], like q) and ``lse`` ([B, H, N] float32, natural log) for all heads."""
    b, h = q.shape[:2]
    cplan = kernel.cplan
    q_rows, kv_rows = _indices(kernel, q.device)
    qt = _to_tiles(q, q_rows, cplan.rows_q)
    kt = _to_tiles(k, kv_rows, cplan.rows_k)
    vt = _to_tiles(v, kv_rows, cplan.rows_k)
    ot = torch.empty_like(qt)
    lt = torch.empty((b, h, cplan.rows_q), device=q.device, dtype=torch.float32)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    status = kernel.entry(
        qt.data_ptr(), kt.data_ptr(), vt.data_ptr(), ot.data_ptr(), lt.data_ptr(),
        b, h, h // k.shape[1],
        qt.stride(1), qt.stride(0), qt.stride(2), kt.stride(1), kt.stride(0), kt.stride(2),
        vt.stride(1), vt.stride(0), vt.stride(2), ot.stride(1), ot.stride(0), ot.stride(2),
        lt.stride(0), lt.stride(1), scale, stream,
    )  # fmt: skip
    if status != 0:
        raise AttnccError(f"the CUTLASS kernel {cplan.label} failed: {kernel.error().decode()}")
    o.copy_(ot.index_select(1, q_rows).transpose(1, 2))
    # The example's softmax marks a row with no key by lse = +inf; attncc's convention is -inf.
    lt = lt.index_select(2, q_rows)
    lse.copy_(lt.masked_fill(lt == float("inf"), float("-inf")))


_EXAMPLE_ARGTYPES = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_void_p]


@cache  # unbounded: one entry per (dtype, head dim, causal) a benchmark asks for
def example(dtype: str, head_dim: int, causal: bool) -> Callable[..., torch.Tensor]:
    """The CUTLASS example's own dense or causal forward as ``f(q, k, v) -> o`` on contiguous
    ``[B, H, N, D]`` tensors of one shape (scale 1/sqrt(D)): the benchmark's yardstick."""
    source = render_example(dtype, head_dim, causal)
    label = f"cutlass example {'causal' if causal else 'dense'} {dtype} d{head_dim}"
    library = nvcc.load(nvcc.build(source, label, {"example": label}))
    entry = library.attncc_example_fwd
    entry.argtypes = _EXAMPLE_ARGTYPES
    entry.restype = ctypes.c_int
    error = library.attncc_error
    error.restype = ctypes.c_char_p

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not (q.shape == k.shape == v.shape and all(t.is_contiguous() for t in (q, k, v))):
            raise AttnccError("the CUTLASS example takes contiguous q, k, v of one [B, H, N, D] shape")
        b, h, n, _ = q.shape
        o = torch.empty_like(q)
        lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
        stream = torch.cuda.current_stream(q.device).cuda_stream
        status = entry(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), b, h, n,
            q.stride(2), q.stride(0), q.stride(1), lse.stride(0), lse.stride(1), stream,
        )  # fmt: skip
        if status != 0:
            raise AttnccError(f"{label} failed: {error().decode()}")
        return o

    return run

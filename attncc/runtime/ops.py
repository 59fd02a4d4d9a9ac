"""Launching the generated kernels: forward and backward on ``[B, H, N, D]`` views.

The first call with a given (pattern, grid, head dim, dtype) lowers and renders
the kernel module; later calls reuse the loaded module and its tile tables.
Heads that share a pattern share one launch (see ``HEAD_MAP`` in the
template); per-head patterns launch once per distinct pattern. The public
entry point is :func:`attncc.attention` (``attncc.runtime.library``), which routes
through torch.library ops so autograd and torch.compile see one op.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from attncc import settings
from attncc.autotune.records import tuned_config
from attncc.errors import PatternError, field_error
from attncc.ir.canonical import canonicalize, resolve_heads
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.ir.text import format_pattern
from attncc.lower.lowering import LaunchConfig, kernel_tables, lower
from attncc.lower.plan import KernelPlan
from attncc.lower.render import load
from attncc.memo import memo
from attncc.runtime import cutlass_kernel, progress, terms
from attncc.runtime import tables as tables_
from attncc.runtime.progress import log

# The term gradients the dK/dV kernel writes (it holds a key's column of score gradients, and its
# tiles are the smaller: the table's per-pair stores spilled in dQ); dQ writes the others.
DKDV_GRADS = ("rel_pos_bias", "key_bias")
DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _output_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer; NaN-filled when ``ATTNCC_POISON=1`` (tests), so an element no kernel
    writes fails the comparison instead of passing on leftover memory."""
    if settings.poison():
        return torch.full_like(t, float("nan"))
    return torch.empty_like(t)


@dataclass(frozen=True, eq=False)  # one per compiled plan: hashed by identity
class Kernel:
    """The loaded kernel modules of one head pattern and their int32 host tables.

    ``module`` runs the forward and dQ, ``dkdv`` the dK/dV kernel of its own plan (Note
    [Backward tiles] in attncc.lower.lowering; the same module when the tiles agree).
    ``tables`` = (values, offsets, entries, kv_offsets, kv_entries): the rule's lookup
    values and, for table plans, the tile lists by Q tile and by KV tile (one set per plan).
    """

    plan: KernelPlan
    module: ModuleType
    tables: tuple[np.ndarray, ...]
    dkdv_plan: KernelPlan
    dkdv: ModuleType
    dkdv_tables: tuple[np.ndarray, ...]
    cutlass: cutlass_kernel.CutlassKernel | None = None  # runs the forward when set (all heads)
    # Runtime plans: their static parts' tile classes (Note [Runtime plans] in attncc.lower.plan).
    statics: tuple[np.ndarray, ...] = ()
    dkdv_statics: tuple[np.ndarray, ...] = ()


def _int32(values: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A small int32 table on ``like``'s device, made once per device for real tensors.

    Under tracing (fake or functional tensor subclasses) nothing is cached: a
    tensor made there must not outlive the trace.
    """
    if type(like) is torch.Tensor:
        return _cached_int32(values, like.device)
    return torch.tensor(values, dtype=torch.int32, device=like.device)


@memo
def _cached_int32(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def _tables(kernel: Kernel, like: torch.Tensor, dkdv: bool = False) -> tuple[torch.Tensor, ...]:
    """The kernel's host tables (the dK/dV plan's with ``dkdv``) on ``like``'s device (cached as
    :func:`_int32`)."""
    if type(like) is torch.Tensor:
        return _cached_tables(kernel, like.device, dkdv)
    return tuple(
        torch.as_tensor(t, device=like.device) for t in (kernel.dkdv_tables if dkdv else kernel.tables)
    )


@memo
def _cached_tables(kernel: Kernel, device: torch.device, dkdv: bool) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(t, device=device) for t in (kernel.dkdv_tables if dkdv else kernel.tables))


def cutlass_config(head_dim: int) -> LaunchConfig:
    """The CUTLASS tiles of the example's cooperative kernels: 128 x 128 (or x 64 for D = 64)."""
    return LaunchConfig(128, 128 if head_dim >= 128 else 64, 8, 2, backend="cutlass")


@memo
def compiled(
    pattern: Pattern, grid: Grid, head_dim: int, dtype: str, device_type: str, score: str, batch_heads: int,
    region: tuple[int, ...] | None = None,
) -> Kernel:  # fmt: skip
    """The kernel of one head-independent pattern (cached per process): the config of a
    tuning record (``attncc tune``) when one exists for this launch, else the default.

    A CUTLASS config runs the forward in CUTLASS and keeps a Triton module of the
    default config for the backward (it needs only the output and the log-sum-exp). ``region``:
    q's box, when it covers a part of the grid (Note [Query regions] in attncc.lower.plan).
    """
    setting = settings.backend()
    tuned = tuned_config(pattern, grid, batch_heads, head_dim, dtype, score, device_type)
    default = LaunchConfig.default(device_type, head_dim, dtype)
    config = tuned or default
    what = _label(pattern, grid, head_dim, dtype)
    log.debug("%s: %s", what, f"tuned config {config}" if tuned else "no tuning record: default config")
    if setting == "cutlass":
        config = cutlass_config(head_dim)
    elif setting == "triton" and config.backend == "cutlass":
        log.info("%s: the tuning record's CUTLASS config declined (ATTNCC_BACKEND=triton)", what)
        config = default
    if config.backend == "cutlass":
        plan = lower(
            pattern, grid, head_dim, dtype, score=score, config=config, device_type=device_type, region=region
        )
        cplan = cutlass_kernel.plan_for(pattern, grid, plan)
        reason = cplan if isinstance(cplan, str) else cutlass_kernel.unavailable(device_type)
        if reason is None:
            log.info("%s: CUTLASS forward, Triton backward (ATTNCC_BACKEND=%s)", what, setting)
            triton = kernel_for(pattern, grid, head_dim, dtype, device_type, score, default, region)
            return dataclasses.replace(triton, cutlass=cutlass_kernel.load(cplan))
        if setting == "cutlass":
            allowed = "triton here (ATTNCC_BACKEND=triton)"
            raise field_error(PatternError, "backend", "cutlass", allowed, reason)
        # "auto" with a tuning record that picked CUTLASS where it cannot run (say, no nvcc here).
        warnings.warn(f"attncc: the tuned CUTLASS kernel cannot run ({reason}); using Triton", stacklevel=2)
        config = default
    log.info("%s: Triton (ATTNCC_BACKEND=%s%s)", what, setting, ", tuned" if config == tuned else "")
    return kernel_for(pattern, grid, head_dim, dtype, device_type, score, config, region)


def kernel_for(
    pattern: Pattern,
    grid: Grid,
    head_dim: int,
    dtype: str,
    device_type: str,
    score: str,
    config: LaunchConfig,
    region: tuple[int, ...] | None = None,
) -> Kernel:
    """The Triton kernels of one head-independent pattern: forward and dQ in ``config``'s
    tiles, dK/dV in its own (Note [Backward tiles] in attncc.lower.lowering)."""
    options = dict(score=score, device_type=device_type, region=region)
    plan = lower(pattern, grid, head_dim, dtype, config=config, **options)
    dkdv_config = LaunchConfig.default_dkdv(device_type, head_dim, dtype)
    dkdv = lower(pattern, grid, head_dim, dtype, config=dkdv_config, **options)
    tables, dkdv_tables = kernel_tables(pattern, grid, plan), kernel_tables(pattern, grid, dkdv)
    statics = (tables_.static_classes_of(plan, grid), tables_.static_classes_of(dkdv, grid))
    return Kernel(plan, load(plan), tables, dkdv, load(dkdv), dkdv_tables, None, *statics)


def _label(pattern: Pattern, grid: Grid, head_dim: int, dtype: str) -> str:
    """How logs and progress name a kernel: ``causal() on grid 64, D=16 float32``."""
    return f"{format_pattern(pattern)} on grid {'x'.join(map(str, grid.shape))}, D={head_dim} {dtype}"


@dataclass(frozen=True)
class Launch:
    """One launch: the kernel of a head pattern and the query heads it serves."""

    kernel: Kernel
    heads: tuple[int, ...]


@memo
def launches(
    pattern: Pattern,
    grid: Grid,
    batch: int,
    heads: int,
    head_dim: int,
    dtype: str,
    device_type: str,
    score: str,
    region: tuple[int, ...] | None = None,
) -> tuple[Launch, ...]:
    """The launches of ``pattern`` over ``heads`` query heads: one per distinct head pattern
    (``region``: q's box of the grid, if not all of it)."""
    with progress.step(f"kernels for {_label(pattern, grid, head_dim, dtype)}"):
        return tuple(
            Launch(compiled(p, grid, head_dim, dtype, device_type, score, batch * len(ids), region), ids)
            for p, ids in head_groups(pattern, grid, heads)
        )


def head_groups(pattern: Pattern, grid: Grid, heads: int) -> list[tuple[Pattern, tuple[int, ...]]]:
    """The distinct canonical head patterns of ``pattern`` and the query heads of each."""
    groups: dict[Pattern, list[int]] = {}
    for head, head_pattern in enumerate(resolve_heads(pattern, heads)):
        groups.setdefault(canonicalize(head_pattern, grid), []).append(head)
    return [(p, tuple(ids)) for p, ids in groups.items()]


Wrap = Callable | None  # torch.library.wrap_triton under triton_op, else None


def _term_args(plan: KernelPlan, params: list[torch.Tensor], dropout_p: float, heads: int) -> list:
    """The score terms' kernel arguments (Note [Term inputs] in attncc.lower.plan): each tensor
    (the seed last, with dropout) and its strides, then dropout's threshold and the kept
    probabilities' factor, and the head count."""
    args: list = []
    for name, t in zip((*plan.inputs, "seed"), params):
        args += [t, *(t.stride()[:1] if name == "rel_pos_bias" else t.stride())]  # a head's table: contiguous
    if plan.dropout:  # Note [Dropout] in the template: p as a threshold on Philox's 32 bits
        args += [min(int(dropout_p * 2**32), 2**32 - 1), 1.0 / (1.0 - dropout_p)]
    if plan.dropout or plan.grads:
        args.append(heads)
    return args


def _runtime_args(kernel: Kernel, data: dict, device: torch.device, dkdv: bool = False) -> list:
    """A runtime plan's kernel arguments (Note [Runtime plans] in attncc.lower.plan): each leaf's
    data and strides, then this call's tile lists (by KV tile for dK/dV) and their strides."""
    plan = kernel.dkdv_plan if dkdv else kernel.plan
    if plan.iteration != "runtime":
        return []
    args: list = []
    for leaf in plan.runtime:
        t = data[leaf.kind]
        args += [t, *_broadcast_strides(t)]
    statics = kernel.dkdv_statics if dkdv else kernel.statics
    counts, lists = tables_.build(plan, statics, data, device, by_kv=dkdv)
    return [*args, counts, *_broadcast_strides(counts)[:3], lists, *_broadcast_strides(lists)[:3]]


def _broadcast_strides(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides, 0 on a dimension of size 1: the data and lists of a runtime plan are
    ``[B' or 1, H' or 1, ...]``, and the kernels index them with the call's batch and head."""
    return tuple(0 if size == 1 else stride for size, stride in zip(t.shape, t.stride()))


def _region_args(plan: KernelPlan, q_offsets: torch.Tensor | None) -> list:
    """q's offsets in the grid ``[B, 3]`` int32 and their batch stride, for a plan whose queries
    cover a box of it (Note [Query regions] in attncc.lower.plan)."""
    return [q_offsets, q_offsets.stride(0)] if plan.region else []


def forward(q, k, v, plan_launches, scale: float, bias: float, write_lse: bool, params=(),
            dropout_p: float = 0.0, wrap: Wrap = None, data=None, q_offsets=None):  # fmt: skip
    """(out, lse) of ``[B, H, N, D]`` views; ``lse`` is float32 ``[B, H, N]``. ``params``: the
    score terms' tensors (attncc.runtime.terms.inputs) and, with dropout, the seed."""
    b, h, n, _ = q.shape
    o = _output_like(q)
    # Sigmoid attention writes no log-sum-exp: the op still returns a defined tensor.
    lse = (torch.empty if write_lse else torch.zeros)((b, h, n), device=q.device, dtype=torch.float32)
    for launch in plan_launches:
        if launch.kernel.cutlass is not None and len(launch.heads) == h and wrap is None:
            cutlass_kernel.forward(launch.kernel.cutlass, q, k, v, o, lse, scale)
            continue
        values, offsets, entries, _, _ = _tables(launch.kernel, q)
        head_map = _int32(launch.heads, q)
        terms = _term_args(launch.kernel.plan, list(params), dropout_p, h)
        runtime = _runtime_args(launch.kernel, data or {}, q.device)
        launch.kernel.module.launch(
            q, k, v, o, lse, values, offsets, entries, head_map, scale, write_lse, bias, wrap=wrap,
            terms=terms, runtime=runtime, region=_region_args(launch.kernel.plan, q_offsets),
        )  # fmt: skip
    return o, lse


def backward(q, k, v, o, lse, do, dlse, plan_launches, scale: float, bias: float, params=(),
             dropout_p: float = 0.0, wrap: Wrap = None, data=None, q_offsets=None):  # fmt: skip
    """(dq, dk, dv, term gradients) in the inputs' dtypes. Deterministic: no atomics (see the
    template). The term gradients are those of the plan's ``grads``, in its order, shaped as
    the views in ``params`` (Note [Term gradients] in attncc.runtime.terms).

    The score gradient is ``p * (dp - delta)`` with ``delta = rowsum(dO * O)``;
    a gradient of the log-sum-exp adds ``p * dlse``, so it enters as ``delta - dlse``.

    dK/dV of a KV head sum its query heads (GQA) inside one program. When
    several launches (per-head patterns) feed the same KV head, they add in
    turn, on one stream, into float32 buffers.
    """
    b, h, n, _ = q.shape
    h_kv = k.shape[1]
    group = h // h_kv
    delta = ((do.float() * o.float()).sum(-1) - dlse).contiguous()  # [B, H, N], laid out like lse
    lse = lse.contiguous()
    dq = _output_like(q)
    accumulate = len(plan_launches) > 1
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32) if accumulate else _output_like(k)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32) if accumulate else _output_like(v)
    params = list(params)
    first = plan_launches[0].kernel.plan
    parts = terms.buffers(first, params, b, h, n, k.shape[2], q.device)
    for launch in plan_launches:
        plan = launch.kernel.plan
        values, offsets, entries, _, _ = _tables(launch.kernel, q)
        head_map = _int32(launch.heads, q)
        dq_parts = [parts[n] for n in plan.grads if n not in DKDV_GRADS]
        args = _term_args(plan, params, dropout_p, h) + dq_parts
        launch.kernel.module.launch_dq(
            q,
            k,
            v,
            do,
            lse,
            delta,
            dq,
            values,
            offsets,
            entries,
            head_map,
            scale,
            bias,
            wrap=wrap,
            terms=args,
            runtime=_runtime_args(launch.kernel, data or {}, q.device),
            region=_region_args(plan, q_offsets),
        )
        values, _, _, kv_offsets, kv_entries = _tables(launch.kernel, q, dkdv=True)
        slots = (_int32(t, q) for t in _slots(launch.heads, group, h_kv, accumulate))
        launch.kernel.dkdv.launch_dkdv(
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk,
            dv,
            values,
            kv_offsets,
            kv_entries,
            *slots,
            scale,
            accumulate,
            bias,
            wrap=wrap,
            terms=_term_args(launch.kernel.dkdv_plan, params, dropout_p, h)
            + [parts[n] for n in plan.grads if n in DKDV_GRADS],
            runtime=_runtime_args(launch.kernel, data or {}, q.device, dkdv=True),
            region=_region_args(launch.kernel.dkdv_plan, q_offsets),
        )
    if accumulate:
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    grads = [
        terms.gradient(name, parts[name], params[first.inputs.index(name)], scale) for name in first.grads
    ]
    return dq, dk, dv, grads


@memo
def _slots(heads: tuple[int, ...], group: int, h_kv: int, accumulate: bool):
    """CSR of query heads per KV head for the dK/dV kernel.

    Without accumulation every KV head gets a slot (an empty one writes zeros:
    a KV head no query head reads has zero gradient).
    """
    per_kv: list[list[int]] = [[] for _ in range(h_kv)]
    for h in heads:
        per_kv[h // group].append(h)
    kv = [i for i in range(h_kv) if per_kv[i] or not accumulate]
    offsets = np.concatenate([[0], np.cumsum([len(per_kv[i]) for i in kv])]).tolist()
    return tuple(offsets), tuple(h for i in kv for h in per_kv[i]), tuple(kv)

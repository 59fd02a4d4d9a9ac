"""The cost model: a predicted kernel time in microseconds for a plan, with no GPU.

Note [Cost model]: a program (one Q tile of one head) walks its KV tiles; each
tile costs a fixed loop overhead, its dots (4 * BLOCK_M * BLOCK_N * D FLOPs on the tensor cores),
the softmax bookkeeping and exponentials, and, when partial, the per-element
mask arithmetic; its K and V (2 * BLOCK_N * D elements) come from L2. Compute
and loads of one program overlap with those of the other programs resident on
the SM, so a tile takes ``max(c, l) + min(c, l) / resident``. An SM runs
``ceil(programs / SMs)`` programs' work (the wave quantisation: one program
more than a multiple of the SM count costs a whole program's time), and no
kernel is faster than its longest program or than reading Q, K, V and writing
O once from DRAM. Residency is limited by shared memory (Q, K and V tiles),
registers (the fp32 accumulator and score tiles) and threads. Constants:
:mod:`attncc.autotune.constants`.

A plan's score terms (Note [Term costs] in attncc.autotune.constants) add their lane and
special-function operations per score to a tile's compute, their registers to the program's,
and their tensors' bytes to a tile's loads: a dense bias's ``[M, N]`` tile, a key bias's ``N``
values (in the kernel's dtype, as a model's tensors are), and the dense bias to the DRAM floor,
read once per visited pair. With the machine code's instruction counts the terms' operations
are in those counts; their loads are still added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from attncc.autotune.constants import (
    DEFAULT_DEVICE,
    DEVICES,
    DTYPE_BYTES,
    KERNEL,
    TERM_MUFU,
    TERM_OPS,
    TERM_REGISTERS,
    DeviceSpec,
)
from attncc.errors import TuneError, field_error
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.lower.lowering import tile_table
from attncc.lower.plan import KernelPlan
from attncc.lower.visits import tile_counts

if TYPE_CHECKING:
    from attncc.machine.counts import LoopInstructions

SCHEDULERS = 4  # warp schedulers per SM (attncc.machine.model, Note [Issue model])


def device_spec(name: str | None = None, sms: int | None = None) -> DeviceSpec:
    """The table entry whose key occurs in ``name`` (e.g. ``"NVIDIA H100 80GB HBM3"``).

    ``None`` is the default target (an H100). An unknown GPU gets the default's
    rates with its own SM count ``sms``, which the caller reads from the device.
    """
    if name is None:
        return DEVICES[DEFAULT_DEVICE]
    upper = name.upper()
    for key, spec in DEVICES.items():  # most specific names first
        if key in upper:
            return spec
    if sms is None:
        raise field_error(TuneError, "device", name, ", ".join(DEVICES) + " (or give its SM count)")
    return DeviceSpec(**{**DEVICES[DEFAULT_DEVICE].__dict__, "name": name, "sms": sms})


@dataclass(frozen=True)
class TileCounts:
    """Per real program of one head: KV tiles visited, and how many of them are full."""

    visited: np.ndarray
    full: np.ndarray

    @staticmethod
    def of(plan: KernelPlan, pattern: Pattern, grid: Grid) -> TileCounts:
        if plan.iteration == "range":
            return TileCounts(*tile_counts(plan))
        offsets, entries = tile_table(pattern, grid, plan)
        full = np.concatenate([[0], np.cumsum(entries % 2)])
        return TileCounts(np.diff(offsets).astype(np.int64), (full[offsets[1:]] - full[offsets[:-1]]))


def shared_bytes(plan: KernelPlan) -> int:
    """Shared memory of one forward program: the Q tile and ``num_stages`` K and V tiles (the
    KV loops are software-pipelined); fp32, whose dots run on the FMA pipes, keeps one K and
    one V tile and stages P for its dot. Matches what Triton reports for sm_90
    (tests/test_autotune.py checks it). A dense bias's tile and a relative position table's
    gathered tile are pipelined too: each takes ``num_stages - 1`` tiles of 4 bytes a score
    (measured on sm_90, bf16: +32, +64 and +96 KiB for a 128 x 64 tile at 2, 3 and 4 stages)."""
    size = DTYPE_BYTES[plan.dtype]
    stages = 1 if plan.dtype == "float32" else plan.num_stages
    tiles = (plan.block_m + 2 * stages * plan.block_n) * plan.head_dim_padded * size
    gathered = (plan.bias + (plan.rel_pos_bias is not None)) * (stages - 1) * plan.block_m * plan.block_n * 4
    return tiles + gathered + (plan.block_m * plan.block_n * 4 if plan.dtype == "float32" else 0)


def term_names(plan: KernelPlan) -> tuple[str, ...]:
    """The keys of the plan's score terms in the term constants (Note [Term costs])."""
    found = [name for name in TERM_OPS if " " not in name and getattr(plan, name, False) not in (None, False)]
    if plan.alibi == "axes":
        found[found.index("alibi")] = "alibi axes"
    return tuple(found)


def term_costs(plan: KernelPlan) -> tuple[float, float]:
    """(lane operations, special-function operations) the plan's terms add per score."""
    names = term_names(plan)
    mufu = 0.0 if plan.softcap is None else TERM_MUFU["softcap" if plan.fast_tanh else "softcap exact"]
    return sum(TERM_OPS[n] for n in names), mufu


def term_bytes(plan: KernelPlan) -> int:
    """Bytes of term tensors one tile loads: the dense bias's tile and the key bias's row."""
    size = DTYPE_BYTES[plan.dtype]
    return (plan.block_m * plan.block_n * plan.bias + plan.block_n * plan.key_bias) * size


def registers(plan: KernelPlan) -> int:
    """Registers per thread: the fp32 accumulator and the score and probability tiles, spread
    over the program's threads, plus the rest and the score terms' (an estimate; see
    KernelConstants and Note [Term costs])."""
    threads = 32 * plan.num_warps
    held = plan.block_m * plan.head_dim_padded + 2 * plan.block_m * plan.block_n
    extra = sum(TERM_REGISTERS[n] for n in term_names(plan))
    return KERNEL.base_registers + math.ceil(held / threads) + extra


def fits(plan: KernelPlan, device: DeviceSpec) -> bool:
    """Whether one program fits an SM without spilling registers."""
    return shared_bytes(plan) <= device.smem_per_block and registers(plan) <= KERNEL.max_registers


def resident(plan: KernelPlan, device: DeviceSpec) -> int:
    """Programs that can be resident on one SM at once (at least one)."""
    threads = 32 * plan.num_warps
    regs = -(-registers(plan) // 8) * 8  # allocated in units of 8 per thread
    by_regs = device.regs_per_sm // (regs * threads)
    by_smem = device.smem_per_sm // (shared_bytes(plan) + 1024)  # 1 KB reserved per block
    return max(1, min(by_regs, by_smem, device.threads_per_sm // threads, device.blocks_per_sm))


@dataclass(frozen=True)
class Prediction:
    """What the model predicts for one launch, and the figures behind it."""

    us: float  # kernel time, microseconds
    programs: int  # launched programs (Q tiles x groups x batch*heads)
    per_sm: int  # programs one SM runs in turn: ceil(programs / SMs)
    resident: int  # programs resident per SM at once
    waves: int  # ceil(programs / (SMs * resident))
    visited: int  # KV tiles visited, all programs
    partial: int  # of which masked
    bytes_moved: int  # Q and O once per program, K, V and the terms' tensors once per visited tile
    shared_bytes: int
    registers: int


def _mask_ops(plan: KernelPlan) -> int:
    if plan.iteration != "range":
        return KERNEL.mask_ops_table
    axes = sum(1 + len(axis.congruences) for term in plan.terms for axis in term)
    return KERNEL.mask_ops_base + KERNEL.mask_ops_per_term_axis * axes


def predict(
    plan: KernelPlan,
    counts: TileCounts,
    batch_heads: int,
    device: DeviceSpec,
    instructions: LoopInstructions | None = None,
) -> Prediction:
    """Predicted time of ``plan`` launched over ``batch_heads`` (batch x heads) heads.

    With ``instructions`` (the forward's sm_90 machine code, :mod:`attncc.machine.counts`) a
    tile's compute is the larger of its dots and the issue of its loop's instructions (Note
    [Issue model] in attncc.machine.model) and a program's set-up is the issue of its
    instructions outside the loops; without them, the estimates of :data:`KERNEL`.
    """
    m, n, d = plan.block_m, plan.block_n, plan.head_dim_padded
    size = DTYPE_BYTES[plan.dtype]
    cycles_per_us = device.clock_ghz * 1e3
    dot_tflops = device.fp32_tflops if plan.dtype == "float32" else device.tensor_tflops
    dot_rate = dot_tflops * 1e6 / device.sms * KERNEL.tensor_efficiency  # FLOP per us per SM
    elements = m * n
    dots = 4 * elements * d / dot_rate
    if instructions is None:
        exps = 1 if plan.score == "softmax" else 2  # sigmoid: an exponential and a reciprocal
        term_ops, term_mufu = term_costs(plan)
        compute = (
            KERNEL.tile_overhead_cycles / cycles_per_us
            + dots
            + elements * (KERNEL.softmax_ops + term_ops) / (device.fp32_per_clock * cycles_per_us)
            + elements * (exps + term_mufu) / (device.mufu_per_clock * cycles_per_us)
        )
        mask = elements * _mask_ops(plan) / (device.int_per_clock * cycles_per_us)
        full_compute, partial_compute, setup = compute, compute + mask, KERNEL.program_overhead_us
    else:

        def issue(count: float) -> float:
            return count * instructions.warps / SCHEDULERS / cycles_per_us

        partials = instructions.partial or ((instructions.full or 0),)
        full_compute = max(dots, issue(instructions.full or max(partials)))
        partial_compute = max(dots, issue(sum(partials) / len(partials)))
        setup = issue(instructions.setup)
    tile_bytes = 2 * n * d * size + term_bytes(plan)  # K and V, and the terms' tensors
    load = tile_bytes / (device.l2_tbps * 1e6 / device.sms)  # bytes / (bytes per us per SM)
    per_sm_resident = resident(plan, device)

    def tile(c: float) -> float:
        return max(c, load) + min(c, load) / per_sm_resident

    full, partial = counts.full, counts.visited - counts.full
    work = setup + full * tile(full_compute) + partial * tile(partial_compute)
    launched = math.prod(plan.q_tiles()) * plan.group_count  # per head; extra ones exit at once
    idle = launched - len(work)
    mean = (work.sum() + idle * KERNEL.empty_program_us) / launched
    programs = launched * batch_heads
    per_sm = -(-programs // device.sms)
    makespan = max(per_sm * mean, float(work.max(initial=0.0)))
    tokens = math.prod(plan.grid)
    visited = int(counts.visited.sum())
    dram_bytes = batch_heads * tokens * (4 * plan.head_dim * size + 4)  # Q, K, V, O and the LSE
    dram_bytes += batch_heads * visited * m * n * size * plan.bias  # a dense bias: once per pair
    dram = dram_bytes / (device.hbm_tbps * 1e6)
    moved = batch_heads * (len(work) * 2 * m * d * size + visited * tile_bytes)
    return Prediction(
        us=max(makespan, dram) + KERNEL.launch_us,
        programs=programs,
        per_sm=per_sm,
        resident=per_sm_resident,
        waves=-(-programs // (device.sms * per_sm_resident)),
        visited=visited * batch_heads,
        partial=int(partial.sum()) * batch_heads,
        bytes_moved=moved,
        shared_bytes=shared_bytes(plan),
        registers=registers(plan),
    )

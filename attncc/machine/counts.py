"""The forward kernel's instructions per tile loop, for the autotuner's cost model.

A candidate plan's forward is compiled for sm_90 exactly as launched
(:mod:`attncc.machine.launch`) and read (:mod:`attncc.machine.sass`); the figures are
kept in the kernel cache as a record (kind ``sass``) keyed by the plan and the
toolchain, so a plan is compiled once per toolchain however often it is ranked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.lower.lowering import kernel_tables
from attncc.lower.plan import KernelPlan
from attncc.lower.render import load
from attncc.machine import sass
from attncc.machine.launch import HOPPER, capture, compile_call
from attncc.runtime import cache, ops

KIND = "sass"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class LoopInstructions:
    """SASS instructions per warp: per tile of the full and of each partial loop (in the
    walk's order; None for a loop the kernel does not have), and once per program."""

    full: int | None
    partial: tuple[int, ...]
    setup: int
    warps: int


def forward_instructions(pattern: Pattern, grid: Grid, plan: KernelPlan) -> LoopInstructions:
    """The forward kernel of ``plan`` (which lowered ``pattern`` on ``grid``), compiled for sm_90."""
    parts = {"plan": dataclasses.asdict(plan), "target": f"sm_{HOPPER.arch}"}
    record = cache.get_record(KIND, parts)
    if record is None:
        record = dataclasses.asdict(_measure(pattern, grid, plan))
        cache.put_record(KIND, parts, record, label=f"sass {plan.iteration} q{plan.q_tile} kv{plan.kv_tile}")
    return LoopInstructions(record["full"], tuple(record["partial"]), record["setup"], record["warps"])


def _measure(pattern: Pattern, grid: Grid, plan: KernelPlan) -> LoopInstructions:
    module, tables = load(plan), kernel_tables(pattern, grid, plan)
    kernel = ops.Kernel(plan, module, tables, plan, module, tables)  # the forward only is launched
    shape = (1, 1, grid.size, plan.head_dim)
    (call,) = capture(
        (ops.Launch(kernel, (0,)),), shape, 1, _DTYPES[plan.dtype], backward=False, score=plan.score
    )
    compiled = compile_call(call)
    text = sass.disassemble(compiled.cubin)
    loops = sass.loops(text, compiled.source_file)
    full = next((lp.instructions for lp in loops if lp.name == "full"), None)
    partial = tuple(lp.instructions for lp in loops if lp.name == "partial")
    setup = sass.instruction_count(text) - sum(lp.instructions for lp in loops)
    return LoopInstructions(full, partial, setup, compiled.num_warps)

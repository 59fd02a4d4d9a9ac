"""The static profile of a case: every kernel it launches, compiled for sm_90 as launched, read
loop by loop, and the estimate of Note [Issue model] from the plans' exact tile mix."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
from triton.runtime.jit import JITFunction

from attncc.errors import AttnccError
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.ir.validate import validate
from attncc.lower.lowering import LaunchConfig
from attncc.lower.plan import KernelPlan
from attncc.lower.visits import LoopTiles, inverse_walk, walk
from attncc.machine import model, sass
from attncc.machine.launch import HOPPER, capture, compile_call
from attncc.runtime import ops

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class LoopProfile:
    """One tile loop of a kernel: what one iteration (one tile, per warp) issues, and how many
    tiles the launch runs through it."""

    name: str
    instructions: int
    hgmma: int
    loads: str  # "tma", "cp.async", "plain" or "none"
    branches: int  # besides the back edge
    tiles: int
    tensor_cycles: float
    issue_cycles: float
    counts: dict[str, int] = field(repr=False)

    @property
    def pipelined(self) -> bool:
        return self.loads in ("tma", "cp.async")


@dataclass(frozen=True)
class KernelProfile:
    """One compiled kernel of one launch."""

    kernel: str  # attention_fwd_kernel, attention_bwd_dq_kernel, attention_bwd_dkdv_kernel
    tiles: str  # the plan's Q and KV boxes, e.g. "q 1x8x16 kv 1x8x8"
    scores: int  # score elements per tile (BLOCK_M x BLOCK_N)
    warps: int
    stages: int
    registers: int
    spill_bytes: int  # spill stores + spill loads (ptxas -v)
    stack_bytes: int
    shared_bytes: int
    warnings: tuple[str, ...]
    loops: tuple[LoopProfile, ...]
    setup_instructions: int  # outside the tile loops, issued once per program
    programs: int
    instructions: int  # the whole kernel
    ideal_cycles: float  # Note [Issue model], summed over the launch
    modelled_cycles: float
    unmatched: str = ""  # why the tile mix could not be matched to the loops, if it could not

    @property
    def estimate(self) -> float | None:
        if self.unmatched:
            return None
        return self.ideal_cycles / self.modelled_cycles if self.modelled_cycles else 1.0

    def loop(self, name: str) -> LoopProfile | None:
        """The first loop named ``name`` that runs tiles (the partial loop of a term, say)."""
        return next((lp for lp in self.loops if lp.name == name), None)


@dataclass(frozen=True)
class Profile:
    """The static profile of one case."""

    name: str
    shape: tuple[int, ...]  # B, H, grid...
    head_dim: int
    dtype: str
    target: str
    triton: str
    kernels: tuple[KernelProfile, ...]
    score: str = "softmax"  # the kernels' form of the score (attncc.ir.score)

    def _ratio(self, names: tuple[str, ...]) -> float | None:
        ks = [k for k in self.kernels if k.kernel in names]
        if not ks or any(k.unmatched for k in ks):
            return None
        return sum(k.ideal_cycles for k in ks) / sum(k.modelled_cycles for k in ks)

    @property
    def forward_estimate(self) -> float | None:
        return self._ratio(("attention_fwd_kernel",))

    @property
    def backward_estimate(self) -> float | None:
        return self._ratio(("attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel"))


def profile(
    pattern: Pattern,
    grid: Grid,
    batch: int = 1,
    heads: int = 16,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    kv_heads: int | None = None,
    backward: bool = True,
    config: LaunchConfig | None = None,
    score: str = "softmax",
    name: str = "",
    region: tuple[int, ...] | None = None,
) -> Profile:
    """Compile every kernel that ``attncc.attention`` launches for this case on an sm_90 GPU
    (the default config, or ``config`` for the forward and dQ), with no GPU, and read them.
    ``region``: the box of the grid the queries cover, if not all of it (at the grid's end:
    Note [Walks of a region] in attncc.lower.visits).

    Needs the real Triton JIT: unset ``TRITON_INTERPRET`` before triton is imported.
    """
    if dtype not in _TORCH_DTYPES:
        raise AttnccError(f"dtype = {dtype!r} is out of range; allowed: {', '.join(_TORCH_DTYPES)}")
    kv_heads = heads if kv_heads is None else kv_heads
    if kv_heads < 1 or heads % kv_heads:
        raise AttnccError(f"kv_heads = {kv_heads} is out of range; allowed: a divisor of heads = {heads}")
    validate(pattern, grid, heads)
    config = config or LaunchConfig.default("cuda", head_dim, dtype)
    launches = tuple(
        ops.Launch(ops.kernel_for(p, grid, head_dim, dtype, "cuda", score, config, region), ids)
        for p, ids in ops.head_groups(pattern, grid, heads)
    )
    if not isinstance(launches[0].kernel.module.attention_fwd_kernel, JITFunction):
        raise AttnccError(
            "TRITON_INTERPRET = 1 is set: the kernels are interpreter functions; allowed: unset "
            "TRITON_INTERPRET in the process that profiles (attncc inspect does not set it)"
        )
    shape = (batch, heads, grid.size, head_dim)
    n_q = None if region is None else math.prod(region)
    calls = capture(launches, shape, kv_heads, _TORCH_DTYPES[dtype], backward, score, n_q)
    group = heads // kv_heads
    kernels = []
    for call in calls:
        launch, dkdv = _owner(call, launches)
        kernel = launch.kernel
        plan, tables = (kernel.dkdv_plan, kernel.dkdv_tables) if dkdv else (kernel.plan, kernel.tables)
        walked = inverse_walk(plan, tables) if dkdv else walk(plan, tables)
        slots = len({h // group for h in launch.heads}) if dkdv else 0
        kernels.append(_kernel_profile(call, plan, walked, batch, len(launch.heads), slots))
    return Profile(
        name=name,
        shape=(batch, heads, *grid.shape),
        head_dim=head_dim,
        dtype=dtype,
        target=f"sm_{HOPPER.arch}",
        triton=triton.__version__,
        kernels=tuple(kernels),
        score=score,
    )


def _owner(call, launches: tuple[ops.Launch, ...]) -> tuple[ops.Launch, bool]:
    for launch in launches:
        if call.kernel is launch.kernel.dkdv.attention_bwd_dkdv_kernel:
            return launch, True
        module = launch.kernel.module
        if call.kernel in (module.attention_fwd_kernel, module.attention_bwd_dq_kernel):
            return launch, False
    raise AssertionError(f"a launch of {call.kernel} that no plan owns")


def _kernel_profile(call, plan: KernelPlan, walked: list[LoopTiles], batch: int, heads: int, slots: int):
    compiled = compile_call(call)
    res = sass.resources(compiled.ptxas_log, compiled.name)
    text = sass.disassemble(compiled.cubin)
    found = sass.loops(text, compiled.source_file)
    tensor = model.tensor_cycles(compiled.name, plan.block_m, plan.block_n, plan.head_dim_padded, plan.dtype)
    # Per head, the walk's programs; the launch runs them for every batch element and head
    # (dK/dV: per KV head of a slot, each of its query heads walks the Q tiles).
    per_head = walked[0].per_program.size
    programs = per_head * batch * (slots or heads)
    unmatched, loops = "", []
    expected = list(walked)
    for lp in found:
        match = next((w for w in expected if w.name == lp.name), None)
        if match is None:
            unmatched = f"no tile count for the SASS loop {lp.name!r}"
            tiles = 0
        else:
            expected.remove(match)
            tiles = match.total * batch * heads
        loops.append(
            LoopProfile(
                name=lp.name,
                instructions=lp.instructions,
                hgmma=lp.counts["hgmma"],
                loads=lp.loads,
                branches=lp.counts["branches"],
                tiles=tiles,
                tensor_cycles=tensor,
                issue_cycles=model.issue_cycles(lp.instructions, compiled.num_warps),
                counts=lp.counts,
            )
        )
    missing = [w.name for w in expected if w.total]
    if missing:  # the compiler removes a loop it proves empty; one that runs tiles must be there
        unmatched = f"the walk's loop(s) {missing} run tiles but are not in the SASS"
    costs = [
        model.LoopCost(
            lp.name,
            lp.tiles,
            lp.instructions,
            lp.tensor_cycles,
            lp.issue_cycles,
            0.0 if lp.pipelined else model.L2_LATENCY,
        )
        for lp in loops
    ]
    total = sass.instruction_count(text)
    setup = total - sum(lp.instructions for lp in loops)
    ideal, spent = model.cycles(costs, programs, setup, compiled.num_warps)
    return KernelProfile(
        kernel=compiled.name,
        tiles=f"q {'x'.join(map(str, _trim(plan.q_tile)))} kv {'x'.join(map(str, _trim(plan.kv_tile)))}",
        scores=plan.block_m * plan.block_n,
        warps=compiled.num_warps,
        stages=plan.num_stages,
        registers=res.registers,
        spill_bytes=res.spill_bytes,
        stack_bytes=res.stack_bytes,
        shared_bytes=compiled.shared_bytes,
        warnings=res.warnings,
        loops=tuple(loops),
        setup_instructions=setup,
        programs=programs,
        instructions=total,
        ideal_cycles=ideal,
        modelled_cycles=spent,
        unmatched=unmatched,
    )


def _trim(box: tuple[int, ...]) -> tuple[int, ...]:
    while len(box) > 1 and box[0] == 1:
        box = box[1:]
    return box


def ops_per_score(instructions: float, k: KernelProfile) -> float:
    """Lane operations per score element of ``instructions`` per warp per tile of kernel ``k``:
    each warp instruction works 32 lanes, the kernel's warps split the tile's scores (the unit
    of the cost model's per-score constants, attncc.autotune.constants)."""
    return instructions * k.warps * 32 / k.scores


def tile_ratio(p: KernelProfile) -> float | None:
    """The partial-tile loop's instructions over the full-tile loop's (None without both)."""
    full, partial = p.loop("full"), p.loop("partial")
    if full is None or partial is None:
        return None
    return partial.instructions / full.instructions

"""The search space of one kernel, and its candidates ranked by the cost model.

A candidate is a :class:`LaunchConfig` with explicit boxes, lowered to its
:class:`KernelPlan`. Range plans try every power-of-two box of each token count
that fits the dilation group (the box shape decides the visited and partial
tiles); table plans keep lowering's box per token count, because each box needs
its own exact tile table. Candidates that do not fit an SM (shared memory per
block, registers without spilling) are left out; lowering's default config is
always in, so the space is never empty and the model's pick can be compared
with it. With ``cutlass`` among the backends, the plans the CUTLASS templates
take (:func:`attncc.lower.cutlass.refusal`) join as CUTLASS candidates: the
example's 128-row Q tiles and 64 or 128-token KV tiles, each in the boxes
that visit the fewest tiles (every candidate is an nvcc build of about a
minute). The model ranks them as Triton plans of the same tiles; only timing
tells the backends apart, so the tuner times every CUTLASS candidate.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from attncc.autotune.constants import DeviceSpec
from attncc.autotune.cost import Prediction, TileCounts, fits, predict
from attncc.errors import TuneError, field_error
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.lower.cutlass import BLOCK_M as CUTLASS_BLOCK_M
from attncc.lower.cutlass import BLOCK_NS as CUTLASS_BLOCK_NS
from attncc.lower.cutlass import refusal
from attncc.lower.lowering import LaunchConfig, boxes, lower, with_full_loops
from attncc.lower.plan import KernelPlan

Q_BLOCKS = (32, 64, 128, 256)
KV_BLOCKS = (32, 64, 128)
WARPS = (4, 8)  # 8 only for Q tiles of 128 tokens or more: each warp needs 16 rows of work
STAGES = (2, 3)


def _warps(block_m: int) -> tuple[int, ...]:
    return tuple(w for w in WARPS if w == 4 or block_m >= 128)


def describe(config: LaunchConfig) -> str:
    """A short readable name: ``q8x16 kv8x8 w8 s3 triton`` (boxes in group coordinates)."""
    q = "x".join(map(str, _trim(config.q_box))) if config.q_box else str(config.q_block)
    kv = "x".join(map(str, _trim(config.kv_box))) if config.kv_box else str(config.kv_block)
    return f"q{q} kv{kv} w{config.num_warps} s{config.num_stages} {config.backend}"


def _trim(box: tuple[int, ...]) -> tuple[int, ...]:
    while len(box) > 1 and box[0] == 1:
        box = box[1:]
    return box


def _config(plan: KernelPlan) -> LaunchConfig:
    """The config that lowers to ``plan`` (its boxes made explicit)."""
    return LaunchConfig(
        plan.block_m, plan.block_n, plan.num_warps, plan.num_stages, plan.q_tile, plan.kv_tile
    )


def search_space(
    pattern: Pattern,
    grid: Grid,
    head_dim: int,
    dtype: str,
    device: DeviceSpec,
    score: str = "softmax",
    default: LaunchConfig | None = None,
    backends: tuple[str, ...] = ("triton",),
    device_type: str = "cuda",
) -> list[tuple[LaunchConfig, KernelPlan]]:
    """Every candidate for a head-independent ``pattern``: the default config first (lowering's
    GPU default unless given), then the space in a fixed order (CUTLASS last). ``device_type``
    is where the candidates run (lowering spells the soft-cap's tanh for it)."""
    default = default or LaunchConfig.default("cuda", head_dim, dtype)
    base = lower(pattern, grid, head_dim, dtype, score=score, config=default, device_type=device_type)
    out = [(_config(base), base)]
    group0 = base.group_lengths((0, 0, 0))
    seen = {(base.q_tile, base.kv_tile, base.num_warps, base.num_stages)}
    for block_m, block_n in itertools.product(Q_BLOCKS, KV_BLOCKS):
        if base.iteration == "range":
            pairs = list(itertools.product(boxes(block_m, group0), boxes(block_n, group0)))
        else:
            config = LaunchConfig(block_m, block_n)
            plan = lower(pattern, grid, head_dim, dtype, score=score, config=config, device_type=device_type)
            whole = plan.block_m == block_m and plan.block_n == block_n  # the grid holds such boxes
            pairs = [(plan.q_tile, plan.kv_tile)] if whole else []
        for (q_box, kv_box), warps, stages in itertools.product(pairs, _warps(block_m), STAGES):
            key = (q_box, kv_box, warps, stages)
            plan = with_full_loops(
                dataclasses.replace(base, q_tile=q_box, kv_tile=kv_box, num_warps=warps, num_stages=stages)
            )
            if key in seen or not fits(plan, device):
                continue
            seen.add(key)
            out.append((LaunchConfig(block_m, block_n, warps, stages, q_box, kv_box), plan))
    if "cutlass" in backends:
        for block_n in CUTLASS_BLOCK_NS:  # lowering's fewest-visits boxes: each costs an nvcc build
            config = LaunchConfig(CUTLASS_BLOCK_M, block_n, 8, 2, backend="cutlass")
            plan = lower(pattern, grid, head_dim, dtype, score=score, config=config, device_type=device_type)
            if refusal(plan) is None:
                out.append((dataclasses.replace(config, q_box=plan.q_tile, kv_box=plan.kv_tile), plan))
    return out


@dataclass(frozen=True)
class Ranked:
    """A candidate with the model's prediction; ``rank`` 1 is the model's pick."""

    rank: int
    config: LaunchConfig
    plan: KernelPlan
    prediction: Prediction
    is_default: bool


def rank(
    pattern: Pattern,
    grid: Grid,
    batch_heads: int,
    head_dim: int,
    dtype: str,
    device: DeviceSpec,
    score: str = "softmax",
    default: LaunchConfig | None = None,
    backends: tuple[str, ...] = ("triton",),
    static: bool = False,
    device_type: str = "cuda",
) -> list[Ranked]:
    """The search space sorted by predicted time; ties keep the space's order (deterministic).

    With ``static`` each candidate's forward is compiled for sm_90 and the model reads its
    instructions per tile loop (:func:`attncc.machine.counts.forward_instructions`, kept
    in the cache): the ranking needs no GPU, but the first ranking of a spec compiles
    every candidate (a second or two each). ``device_type``: as :func:`search_space`.
    """
    if isinstance(batch_heads, bool) or not isinstance(batch_heads, int) or batch_heads < 1:
        raise field_error(TuneError, "batch_heads", batch_heads, "an integer >= 1 (batch x heads)")
    counts: dict[tuple, TileCounts] = {}  # the counts depend on the boxes only
    scored = []
    space = search_space(pattern, grid, head_dim, dtype, device, score, default, backends, device_type)
    for i, (config, plan) in enumerate(space):
        key = (plan.q_tile, plan.kv_tile)
        if key not in counts:
            counts[key] = TileCounts.of(plan, pattern, grid)
        instructions = None
        if static and config.backend == "triton":
            from attncc.machine.counts import forward_instructions

            instructions = forward_instructions(pattern, grid, plan)
        scored.append((predict(plan, counts[key], batch_heads, device, instructions), i, config, plan))
    scored.sort(key=lambda s: (s[0].us, s[1]))
    return [
        Ranked(r + 1, config, plan, prediction, i == 0)
        for r, (prediction, i, config, plan) in enumerate(scored)
    ]

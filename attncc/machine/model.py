"""A static efficiency estimate of a kernel from its machine code and its plan's tile mix.

Note [Issue model]: a first-order model of one SM running one program at a time.

What it counts, per tile a loop iteration processes:
- tensor cycles: the FLOPs of the tile's dots at the SM's dense tensor-core rate
  (4096 FLOP per clock for fp16/bf16 wgmma on H100/H200: 989 TFLOP/s over 132 SMs
  at 1.83 GHz); fp32 dots run in IEEE fp32 on the FMA pipes, 256 FLOP per clock.
  The forward's dots are QK^T and PV (4 M N D FLOPs for M queries, N keys, head
  dim D, padded to a power of two), dQ's are QK^T, dO V^T and dS K (6 M N D),
  dK/dV's are the same three and P^T dO (8 M N D);
- issue cycles: the loop body's SASS instructions times the program's warps over the
  SM's 4 schedulers (each scheduler issues one instruction per clock);
- a tile costs the larger of the two (tensor work and instruction issue overlap), plus,
  for a loop whose loads are synchronous (no cp.async or TMA: not software-pipelined),
  an exposed L2 latency of ``L2_LATENCY`` cycles;
- once per program, the instructions outside its tile loops (set-up, bisection,
  epilogue), counted once each at the same issue rate.
The estimate is the tensor cycles of every tile the plan visits over the modelled
cycles: 1 means tensor-bound on every tile the plan visits (its own tile-level
bound, not the pattern's density).

What it ignores: instruction latencies and dependencies (a tile that waits on its
own wgmma), dual issue and the MUFU and FMA pipes' own limits, shared-memory and
L2/DRAM bandwidth, the pipeline's fill and drain at each loop, other resident
programs (which hide some of all that), wave quantisation and launch overhead. It
is an upper bound for a kernel that issues what it counts, not a prediction:
``benchmarks/gpu_check.sh smoke`` writes the measured efficiency beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULERS = 4
TENSOR_FLOP_PER_CLOCK = {"float16": 4096, "bfloat16": 4096, "float32": 256}
L2_LATENCY = 600  # cycles; an H100 L2 hit is ~260 ns at the 1.83 GHz boost clock, some 450-650 cycles
DOTS = {"attention_fwd_kernel": 4, "attention_bwd_dq_kernel": 6, "attention_bwd_dkdv_kernel": 8}


@dataclass(frozen=True)
class LoopCost:
    """One loop's tiles and what each costs in the model (cycles)."""

    name: str
    tiles: int
    instructions: int
    tensor: float
    issue: float
    exposed_latency: float

    @property
    def per_tile(self) -> float:
        return max(self.tensor, self.issue) + self.exposed_latency


def tensor_cycles(kernel: str, block_m: int, block_n: int, head_dim_padded: int, dtype: str) -> float:
    """Tensor-core cycles of one tile pair of ``kernel`` (Note [Issue model])."""
    return DOTS[kernel] * block_m * block_n * head_dim_padded / TENSOR_FLOP_PER_CLOCK[dtype]


def issue_cycles(instructions: int, warps: int) -> float:
    return instructions * warps / SCHEDULERS


def cycles(loops: list[LoopCost], programs: int, setup_instructions: int, warps: int) -> tuple[float, float]:
    """``(tensor, modelled)`` cycles of ``programs`` programs running ``loops`` (Note [Issue
    model]); their ratio is the estimate."""
    ideal = sum(loop.tiles * loop.tensor for loop in loops)
    spent = sum(loop.tiles * loop.per_tile for loop in loops) + programs * issue_cycles(
        setup_instructions, warps
    )
    return ideal, spent

"""The context-parallel cases of tests/test_distributed.py, shared with the process group that
runs them (tests/distributed_worker.py): each names a pattern on a grid, its sharding and world
size, the heads, and the method (None: the planner's pick)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attncc.distributed import Sharding, balanced_sharding
from attncc.ir import Grid, Pattern, causal, dense, document, global_tokens, neighborhood, sliding_window

D = 16


@dataclass(frozen=True)
class Case:
    name: str
    pattern: Pattern
    grid: Grid
    sharding: Sharding
    heads: int = 2
    kv_heads: int = 2
    method: str | None = None

    def inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Whole-grid q, k, v and the output's gradient, ``[1, H, N, D]``."""
        gen = torch.Generator().manual_seed(seed)
        n = self.grid.size
        shapes = [
            (1, self.heads, n, D),
            (1, self.kv_heads, n, D),
            (1, self.kv_heads, n, D),
            (1, self.heads, n, D),
        ]
        return tuple(torch.randn(s, generator=gen) for s in shapes)


# Document 0 is rank 0's rows exactly: rank 0 needs nothing from any other rank, nor gives.
_DOCS = [0] * 8 + [1] * 5 + [2] * 14 + [3] * 5

# Mixed lengths: equal halves would give one rank most of the work; balanced cuts even it out.
_MIXED = [0] * 4 + [1] * 16 + [2] * 4 + [3] * 8
_MIXED_SHARDING = balanced_sharding(document(_MIXED), Grid(32), 2)

CASES = {
    2: [
        Case("na2d-rows", neighborhood(3), Grid((8, 6)), Sharding(2)),
        Case("na3d-time", neighborhood((3, 3, 3)), Grid((4, 3, 4)), Sharding(2)),
        Case(
            "na3d-causal-time",
            neighborhood((3, 3, 3), causal=(True, False, False)),
            Grid((8, 3, 3)),
            Sharding(2, "zigzag"),
        ),
        Case("documents-balanced", document(_MIXED), Grid(32), _MIXED_SHARDING),
        Case("dense-ulysses", dense(), Grid(16), Sharding(2), heads=4, kv_heads=2, method="ulysses"),
    ],
    4: [
        Case("na2d-rows-halo", neighborhood((7, 3)), Grid((8, 4)), Sharding(4), heads=4, kv_heads=2),
        Case("causal-zigzag", causal(), Grid(32), Sharding(4, "zigzag")),
        Case(
            "window-sinks-zigzag",
            sliding_window(5) | (global_tokens([0, 1]) & causal()),
            Grid(32),
            Sharding(4, "zigzag"),
        ),
        Case("documents", document(_DOCS), Grid(32), Sharding(4)),
        Case("dense-planned", dense(), Grid(16), Sharding(4), heads=4, kv_heads=4),
    ],
}

# The module path (world 2): attncc.nn.SparseAttention of these, run by ContextParallelAttention.
MODULE_DIM, MODULE_HEADS = 16, 2
MODULE_CASE = Case("module-na2d", neighborhood(3), Grid((4, 4)), Sharding(2))
REPEATED = "window-sinks-zigzag"  # run twice (world 4): the results must be bitwise equal


def module(case: Case = MODULE_CASE) -> torch.nn.Module:
    from attncc.nn import SparseAttention

    torch.manual_seed(0)
    return SparseAttention(MODULE_DIM, MODULE_HEADS, case.pattern, case.grid)


def module_input(case: Case = MODULE_CASE) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-grid ``x`` ``[1, N, dim]`` and the output's gradient."""
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(1, case.grid.size, MODULE_DIM, generator=gen) for _ in range(2))

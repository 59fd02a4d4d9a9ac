"""The CUTLASS forward's sm_90a machine code, where the CUTLASS templates take the plan.

The kernel is built as the backend builds it (:func:`attncc.runtime.cutlass_kernel.build`, nvcc into
the kernel cache: a minute or more the first time), its cubin is taken out of the shared
object with ``cuobjdump -xelf`` and read as the Triton kernels are (:mod:`attncc.machine.sass`):
registers, stack and local memory (spills) per kernel function from ``cuobjdump -res-usage``,
and the kernel's instructions, HGMMA and TMA copies. No loops and no estimate: the FMHA is a
persistent, warp-specialised kernel (a producer warpgroup loads with TMA while consumers
compute) whose loops nest the whole tile schedule, not one loop per kind of tile.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from triton import knobs

from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.lower.lowering import lower
from attncc.machine import sass
from attncc.runtime import cutlass_kernel, nvcc, ops

_USAGE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass(frozen=True)
class CutlassFunction:
    """One kernel function of the CUTLASS shared object."""

    name: str
    registers: int
    stack_bytes: int
    local_bytes: int  # spills land here
    shared_bytes: int  # static; the FMHA asks for its tiles' shared memory at launch
    instructions: int
    hgmma: int
    tma: int


def unavailable() -> str | None:
    """Why CUTLASS kernels cannot be built here, or None."""
    if nvcc.nvcc_path() is None:
        return "nvcc is not on PATH"
    if nvcc.cutlass_root() is None:
        return 'the CUTLASS headers are missing (pip install "attncc[cutlass]")'
    return None


def profile_cutlass(
    pattern: Pattern, grid: Grid, head_dim: int, dtype: str, score: str = "softmax"
) -> list[CutlassFunction] | str:
    """The CUTLASS forward of every head pattern, read from its machine code, or why there is none."""
    reason = unavailable()
    if reason:
        return reason
    out = []
    for p, _ in ops.head_groups(pattern, grid, 1):
        plan = lower(p, grid, head_dim, dtype, score=score, config=ops.cutlass_config(head_dim))
        cplan = cutlass_kernel.plan_for(p, grid, plan)
        if isinstance(cplan, str):
            return cplan
        out.extend(read(cutlass_kernel.build(cplan)))
    return out


def read(library: Path) -> list[CutlassFunction]:
    """The kernel functions of a shared object built for sm_90a."""
    tool = knobs.nvidia.cuobjdump.path
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([tool, "-xelf", "all", str(library)], cwd=tmp, capture_output=True, check=True)
        for cubin in sorted(Path(tmp).glob("*.cubin")):
            usage = subprocess.run(
                [tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True
            )
            opcodes = [ins.opcode for ins in sass.parse(sass.disassemble(cubin.read_bytes()))[0]]
            hgmma = sum(op.startswith("HGMMA") for op in opcodes)
            tma = sum(op.startswith(("UTMALDG", "UBLKCP")) for op in opcodes)
            for m in _USAGE.finditer(usage.stdout):
                regs, stack, shared, local = (int(m.group(i)) for i in range(2, 6))
                out.append(CutlassFunction(m.group(1), regs, stack, local, shared, len(opcodes), hgmma, tma))
    return out

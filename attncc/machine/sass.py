"""Reading sm_90 machine code: the loops of a kernel and what each iteration issues.

Note [Reading loops]: ``nvdisasm -g`` prints the SASS with the source line of each
instruction. A loop is a backward branch and the instructions from its target to the
branch; the tile loops are the innermost ones. A loop is named by the ``# loop: NAME``
comment on the ``for`` of the rendered module (templates/triton) whose body holds the
most of its instructions' lines: the pipeliner moves code across iterations, and
instructions inlined from helpers carry the helpers' lines, but the loop's own
statements keep lines inside its body. The instruction count of a loop is that of one
iteration of its body, which every warp issues once per tile.
"""

from __future__ import annotations

import ast
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from triton import knobs

from attncc.memo import memo

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LINE = re.compile(r'//## File "(.*)", line (\d+)')
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA(?:\.[A-Z.]+)?\s+`\((\.L_x_\d+)\)")
_LOOP_COMMENT = re.compile(r"#\s*loop:\s*([\w-]+)")


@dataclass(frozen=True)
class Instruction:
    address: int
    text: str  # predicate, opcode and operands
    file: str
    line: int

    @property
    def opcode(self) -> str:
        words = self.text.split()
        return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -c -g`` of a cubin (the disassembler Triton ships)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run(
            [knobs.nvidia.nvdisasm.path, "-c", "-g", f.name], capture_output=True, text=True, check=True
        )
    return done.stdout


def parse(sass: str) -> tuple[list[Instruction], dict[str, int]]:
    """The instructions of a disassembly, with their source lines, and the address of each label."""
    instructions: list[Instruction] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    file, line = "", 0
    for text in sass.splitlines():
        if m := _LINE.search(text):
            file, line = m.group(1), int(m.group(2))
        elif m := _LABEL.match(text):
            pending.append(m.group(1))
        elif m := _INSTR.search(text):
            address = int(m.group(1), 16)
            for label in pending:
                labels[label] = address
            pending = []
            instructions.append(Instruction(address, m.group(2), file, line))
    return instructions, labels


@dataclass(frozen=True)
class Loop:
    """One innermost loop of a kernel (Note [Reading loops])."""

    name: str  # the template's name for it ("full", "partial", ...), "?" when none matched
    source_line: int  # the line of its ``for`` in the rendered module (0 when unnamed)
    instructions: int  # SASS instructions per iteration, per warp
    counts: dict[str, int]  # per kind (see :func:`_kinds`)

    @property
    def loads(self) -> str:
        """How the loop's loads reach shared memory: ``tma``, ``cp.async``, ``plain`` or ``none``."""
        if self.counts["tma"]:
            return "tma"
        if self.counts["cp.async"]:
            return "cp.async"
        return "plain" if self.counts["ldg"] else "none"

    @property
    def pipelined(self) -> bool:
        """Its loads are asynchronous: issued for a later tile while this one computes."""
        return self.loads in ("tma", "cp.async")


_KIND_PATTERNS = {
    "hgmma": r"^HGMMA",
    "hmma": r"^HMMA",  # mma.sync: Triton's dots of fewer than 64 rows (the decode kernel's)
    "cp.async": r"^LDGSTS",
    "tma": r"^(UTMALDG|UBLKCP)",
    "ldg": r"^LDG\b|^LDG\.",
    "sts": r"^STS",
    "lds": r"^LDS",
    "bar": r"^BAR\.",
    "mufu": r"^MUFU",
    "local": r"^(STL|LDL)",
    "wgmma-wait": r"^WARPGROUP\.DEPBAR",
}


def _kinds(body: list[Instruction], back_edge: Instruction) -> dict[str, int]:
    counts = Counter()
    for ins in body:
        op = ins.opcode
        for kind, pattern in _KIND_PATTERNS.items():
            if re.match(pattern, op):
                counts[kind] += 1
        if op.startswith("BRA") and ins is not back_edge:
            counts["branches"] += 1
    return {kind: counts[kind] for kind in (*_KIND_PATTERNS, "branches")}


@memo
def _marked_loops(source_file: str) -> tuple[tuple[str, int, int], ...]:
    """``(name, first line, last line)`` of every ``for`` marked ``# loop: NAME`` in a module."""
    text = Path(source_file).read_text()
    lines = text.splitlines()
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.For) and (m := _LOOP_COMMENT.search(lines[node.lineno - 1])):
            out.append((m.group(1), node.lineno, node.end_lineno or node.lineno))
    return tuple(out)


def loops(sass: str, source_file: str) -> list[Loop]:
    """The innermost loops of a kernel's disassembly, in address order, named from its source."""
    instructions, labels = parse(sass)
    spans = []
    for i, ins in enumerate(instructions):
        m = _BRANCH.search(ins.text)
        if m and labels.get(m.group(1), ins.address) < ins.address:
            spans.append((labels[m.group(1)], ins.address, i))
    innermost = [s for s in spans if not any(o is not s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    marked = _marked_loops(source_file)
    out = []
    for start, end, branch in sorted(innermost):
        body = [ins for ins in instructions if start <= ins.address <= end]
        votes: Counter = Counter()
        for ins in body:
            if ins.file == source_file:  # each line votes for the innermost marked loop holding it
                holding = [m for m in marked if m[1] <= ins.line <= m[2]]
                if holding:
                    votes[min(holding, key=lambda m: m[2] - m[1])] += 1
        (name, line, _), _ = votes.most_common(1)[0] if votes else (("?", 0, 0), 0)
        out.append(Loop(name, line, len(body), _kinds(body, instructions[branch])))
    return out


def instruction_count(sass: str) -> int:
    return len(parse(sass)[0])


@dataclass(frozen=True)
class Resources:
    """What ptxas reports for a kernel (``ptxas -v``)."""

    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    warnings: tuple[str, ...]

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes


def resources(ptxas_log: str, kernel: str) -> Resources:
    """Registers, stack and spills of ``kernel`` and every ptxas warning, from its ``-v`` log."""
    regs = stack = stores = loads = -1
    for m in re.finditer(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill "
                         r"stores, (\d+) bytes spill loads", ptxas_log):  # fmt: skip
        if m.group(1) == kernel:
            stack, stores, loads = (int(m.group(i)) for i in (2, 3, 4))
    if m := re.search(r"Used (\d+) registers", ptxas_log):
        regs = int(m.group(1))
    if min(regs, stack, stores, loads) < 0:
        raise ValueError(f"no ptxas -v figures for {kernel} in its log:\n{ptxas_log[:2000]}")
    warnings = tuple(line.strip() for line in ptxas_log.splitlines() if "warning" in line.lower())
    return Resources(regs, stack, stores, loads, warnings)

"""Every ```python block of docs/migrating.md runs as written and checks its own result.

The blocks run as a reader would run them: in a fresh Python with ``TRITON_INTERPRET=1`` (CPU
tensors, Triton's interpreter), each block in its own namespace, so a block cannot lean on names
another one defined. One process runs them all (the imports cost seconds); a failure reports the
traceback with docs/migrating.md's own line numbers.

A block that must not run (it needs NATTEN itself, or a GPU) says so on the line right above its
fence with ``<!-- not run: REASON -->``. Such blocks are counted: at most ``MAX_NOT_RUN``, each
with a reason, so the page's examples stay checked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

DOC = REPO / "docs" / "migrating.md"
NOT_RUN = re.compile(r"<!--\s*not run:(.*?)-->")
MAX_NOT_RUN = 2


@dataclass(frozen=True)
class Block:
    line: int  # the line of docs/migrating.md that holds the block's first code line
    language: str
    source: str
    not_run: str | None  # the reason given by a `<!-- not run: ... -->` line above the fence


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced code block, indented ones (inside a list) included."""
    lines = text.splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = lines[i].strip()
        if not fence.startswith("```"):
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{DOC.name}:{i + 1}: a fence that is never closed"
        marker = NOT_RUN.fullmatch(lines[i - 1].strip()) if i else None
        source = textwrap.dedent("\n".join(lines[i + 1 : end]))
        found.append(Block(i + 2, fence[3:].strip(), source, marker.group(1).strip() if marker else None))
        i = end + 1
    return found


BLOCKS = fenced_blocks(DOC.read_text())
PYTHON = [b for b in BLOCKS if b.language == "python"]
RUN = [b for b in PYTHON if b.not_run is None]

_RUNNER = """
import json, sys, traceback
blocks, results = json.load(open(sys.argv[1])), []
for line, source in blocks:
    try:  # padded so that tracebacks give the page's line numbers
        exec(compile("\\n" * (line - 1) + source, sys.argv[3], "exec"), {"__name__": "__main__"})
        results.append(None)
    except BaseException:
        results.append(traceback.format_exc())
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[int, str | None]:
    """Run every runnable block in one fresh interpreter: line -> None or the traceback."""
    tmp = tmp_path_factory.mktemp("migrating")
    blocks, results = tmp / "blocks.json", tmp / "results.json"
    blocks.write_text(json.dumps([(b.line, b.source) for b in RUN]))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-c", _RUNNER, str(blocks), str(results), str(DOC)]
    proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and results.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    return dict(zip((b.line for b in RUN), json.loads(results.read_text())))


def test_the_page_has_its_examples():
    text = DOC.read_text()
    assert "## NATTEN" in text and "## FlexAttention" in text
    assert len(RUN) >= 5, "the NATTEN section's examples are not found"
    odd = [b.line for b in BLOCKS if b.language != "python" and "py" in b.language.lower()]
    assert not odd, f"lines {odd}: a Python block's fence must say `python`, or it is never run"


def test_not_run_markers_are_few_and_give_a_reason():
    skipped = [b for b in PYTHON if b.not_run is not None]
    markers = NOT_RUN.findall(DOC.read_text())
    assert len(markers) == len(skipped), "a `not run` marker must sit on the line right above a python fence"
    assert len(skipped) <= MAX_NOT_RUN, [f"line {b.line}: {b.not_run}" for b in skipped]
    assert all(len(b.not_run.split()) >= 3 for b in skipped), "say why the block cannot run"


@pytest.mark.parametrize("block", RUN, ids=[f"line-{b.line}" for b in RUN])
def test_block_runs_and_checks_its_result(block: Block, outcomes: dict[int, str | None]):
    assert "assert" in block.source, f"line {block.line}: a block must check what it shows (an assert)"
    assert outcomes[block.line] is None, outcomes[block.line]


def test_a_failing_block_is_reported_at_its_line(tmp_path: Path):
    """The runner itself: a block that raises gives a traceback naming the page's line."""
    blocks, results = tmp_path / "b.json", tmp_path / "r.json"
    # A block that fails on purpose (its assert is on the page's line 8), then one that passes.
    blocks.write_text(json.dumps([(7, "x = 1\nassert x == 2\n"), (20, "assert True\n")]))
    command = [sys.executable, "-c", _RUNNER, str(blocks), str(results), "page.md"]
    subprocess.run(command, check=True, timeout=60)
    failed, passed = json.loads(results.read_text())
    assert 'File "page.md", line 8' in failed and "AssertionError" in failed
    assert passed is None

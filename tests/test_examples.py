"""Every example runs at toy size on the CPU (Triton's interpreter), as a user would run it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = [
    "vit_neighborhood.py",
    "video_block.py",
    "lm_long_context.py",
    "jit_predicate.py",
    "context_parallel.py",
    "cli_workflow.sh",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_at_toy_size(script, tmp_path):
    # The shell example calls `python` and `attncc`: those of this interpreter's environment.
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    command = ["bash", str(EXAMPLES / script)] if script.endswith(".sh") else [
        sys.executable, str(EXAMPLES / script), "--size", "toy"]  # fmt: skip
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip()


def test_every_example_is_run():
    shipped = {
        p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh") and not p.name.startswith("_")
    }
    assert shipped == set(SCRIPTS)

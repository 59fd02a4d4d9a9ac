"""Shared test set-up: kernels run under the Triton interpreter when there is no GPU."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Must be set before triton is imported anywhere: with no GPU, kernels run on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Rendered kernels go to a fresh directory, not the user's cache (removed at the end).
_OWN_CACHE = "ATTNCC_CACHE_DIR" not in os.environ
os.environ.setdefault("ATTNCC_CACHE_DIR", tempfile.mkdtemp(prefix="attncc-test-cache-"))
os.environ["ATTNCC_POISON"] = "1"  # outputs start as NaN: an unwritten element fails (attncc.runtime.ops)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["ATTNCC_CACHE_DIR"], ignore_errors=True)


REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "examples" / "specs"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def specs_dir() -> Path:
    return SPECS

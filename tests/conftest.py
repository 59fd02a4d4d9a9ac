"""Shared test helpers."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "examples" / "specs"


@pytest.fixture
def specs_dir() -> Path:
    return SPECS

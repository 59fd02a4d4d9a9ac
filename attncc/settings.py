"""Every environment setting attncc reads, typed, in one place.

Each is read on every call (not at import), so a test or a process can change it between
calls. The allowed values are checked here; an unknown value is an error naming the
setting, never a silent default.

========================  ==============================================================
``ATTNCC_CACHE_DIR``      the kernel cache's directory (default: the platform cache dir)
``ATTNCC_BACKEND``        ``triton`` (default), ``auto`` (a tuning record may pick
                          CUTLASS) or ``cutlass`` (every plan it takes)
``ATTNCC_POISON``         ``1``: output buffers start as NaN (tests: an element no kernel
                          writes fails the comparison)
``TRITON_INTERPRET``      Triton's own: ``1`` runs kernels on CPU tensors in its
                          interpreter (it must be set before triton is imported)
========================  ==============================================================
"""

from __future__ import annotations

import os
from pathlib import Path

from attncc.errors import PatternError, field_error

BACKENDS = ("triton", "auto", "cutlass")


def cache_dir() -> Path | None:
    """``ATTNCC_CACHE_DIR``, or None for the platform cache directory."""
    value = os.environ.get("ATTNCC_CACHE_DIR")
    return Path(value) if value else None


def backend() -> str:
    """``ATTNCC_BACKEND``: ``triton`` (the default until CUTLASS has GPU figures), ``auto`` (a
    tuning record may pick CUTLASS) or ``cutlass`` (every plan it takes; others refused)."""
    value = os.environ.get("ATTNCC_BACKEND", "triton")
    if value not in BACKENDS:
        raise field_error(PatternError, "ATTNCC_BACKEND", value, ", ".join(BACKENDS))
    return value


def poison() -> bool:
    """``ATTNCC_POISON=1``: output buffers are NaN-filled before the kernels write them."""
    return os.environ.get("ATTNCC_POISON") == "1"


def interpreter() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (the values Triton's own
    boolean settings take as true)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")

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
``ATTNCC_LOG``            ``debug``, ``info``, ``warning`` or ``error``: log the ``attncc``
                          logger to stderr at that level (default: no handler; read
                          when attncc is imported)
``ATTNCC_PROGRESS``       ``0``: no spinner and build times on a terminal (default ``1``)
``TRITON_INTERPRET``      Triton's own: ``1`` runs kernels on CPU tensors in its
                          interpreter (it must be set before triton is imported)
``ATTNCC_LOCK_TIMEOUT``   seconds a process waits for another's build of the same cache
                          entry before it gives up with an error naming the lock and its
                          holder (default 600: a CUTLASS build can take minutes)
``ATTNCC_MEMO_SIZE``      entries each per-process memo keeps (kernels, launch plans, tile
                          tables, pattern texts), least recently used dropped first
                          (default 256, 1 to 1048576; read when attncc is imported:
                          :mod:`attncc.memo`)
``ATTNCC_DECODE_SPLITS``  the split count of every decode launch, 1 to 256 (default: the
                          cost model's, Note [Split count] in attncc.autotune.decode)
========================  ==============================================================
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from attncc.errors import AttnccError, CacheError, PatternError, field_error

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


LOCK_TIMEOUT_S = 600.0


def lock_timeout() -> float:
    """``ATTNCC_LOCK_TIMEOUT``: seconds to wait for a cache entry's lock (default 600)."""
    value = os.environ.get("ATTNCC_LOCK_TIMEOUT", "")
    if not value:
        return LOCK_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise field_error(CacheError, "ATTNCC_LOCK_TIMEOUT", value, "a finite number of seconds > 0")
    return seconds


LOG_LEVELS = ("debug", "info", "warning", "error")


def log_level() -> int | None:
    """``ATTNCC_LOG``: the ``logging`` level to log the ``attncc`` logger at, or None (unset)."""
    value = os.environ.get("ATTNCC_LOG", "").lower()
    if not value:
        return None
    if value not in LOG_LEVELS:
        raise field_error(PatternError, "ATTNCC_LOG", value, ", ".join(LOG_LEVELS))
    return getattr(logging, value.upper())


def progress() -> bool:
    """``ATTNCC_PROGRESS``: ``1`` (default) shows slow steps on a terminal, ``0`` hides them."""
    value = os.environ.get("ATTNCC_PROGRESS", "1")
    if value not in ("0", "1"):
        raise field_error(PatternError, "ATTNCC_PROGRESS", value, "0 or 1")
    return value == "1"


MEMO_SIZE = 256
MAX_MEMO_SIZE = 1 << 20


def memo_size() -> int:
    """``ATTNCC_MEMO_SIZE``: entries per per-process memo (default 256, 1 to 1048576)."""
    value = os.environ.get("ATTNCC_MEMO_SIZE", "")
    if not value:
        return MEMO_SIZE
    size = int(value) if value.strip().isdigit() else 0
    if not 1 <= size <= MAX_MEMO_SIZE:
        raise field_error(AttnccError, "ATTNCC_MEMO_SIZE", value, f"an integer from 1 to {MAX_MEMO_SIZE}")
    return size


MAX_DECODE_SPLITS = 256  # the decode kernels' bound (attncc.lower.decode.MAX_SPLITS)


def decode_splits() -> int | None:
    """``ATTNCC_DECODE_SPLITS``: a fixed split count for the decode kernels, or None (the cost
    model chooses: Note [Split count] in attncc.autotune.decode)."""
    value = os.environ.get("ATTNCC_DECODE_SPLITS", "")
    if not value:
        return None
    splits = int(value) if value.strip().isdigit() else 0
    if not 1 <= splits <= MAX_DECODE_SPLITS:
        allowed = f"an integer from 1 to {MAX_DECODE_SPLITS} (unset: the cost model's)"
        raise field_error(AttnccError, "ATTNCC_DECODE_SPLITS", value, allowed)
    return splits

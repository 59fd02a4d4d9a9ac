"""Per-process memos, bounded: a server that sees many shapes and patterns keeps the most recent.

``@memo`` is ``functools.lru_cache`` with ``ATTNCC_MEMO_SIZE`` entries (:func:`attncc.settings.
memo_size`, read when the decorated function is defined, i.e. when attncc is imported), and
remembers every memo it makes so :func:`forget_all` can clear them
(``attncc.runtime.library.forget_kernels``). Each memo keeps that many entries of its own: the
kernels, launch plans, tile tables and pattern texts of the shapes and patterns seen last.

A memo whose keys are few and fixed (the toolchain's versions, a file per template) stays a
plain ``functools.cache``, with a comment saying so.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from attncc import settings

F = TypeVar("F", bound=Callable[..., Any])

_MEMOS: list[Any] = []


def memo(fn: F) -> F:
    """``fn`` memoised in a least-recently-used cache of ``ATTNCC_MEMO_SIZE`` entries."""
    cached = functools.lru_cache(maxsize=settings.memo_size())(fn)
    _MEMOS.append(cached)
    return cached  # type: ignore[return-value]


def forget_all() -> None:
    """Clear every memo made by :func:`memo`."""
    for cached in _MEMOS:
        cached.cache_clear()

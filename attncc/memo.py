"""Per-process memos, bounded: a server that sees many shapes and patterns keeps the most recent.

``@memo`` is ``functools.lru_cache`` with ``ATTNCC_MEMO_SIZE`` entries (:func:`attncc.settings.
memo_size`, read when the decorated function is defined, i.e. when attncc is imported), and
remembers every memo it makes so :func:`forget_all` can clear them
(``attncc.runtime.library.forget_kernels``). Each memo keeps that many entries of its own: the
kernels, launch plans, tile tables and pattern texts of the shapes and patterns seen last.

A memo that is written as well as read is a :class:`Bounded` dict of the same size. A memo
whose keys are few and fixed (the toolchain's versions, a file per template) stays a
plain ``functools.cache``, with a comment saying so.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
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


class Bounded(OrderedDict):
    """A dict that keeps the ``ATTNCC_MEMO_SIZE`` entries read or written last, for memos that
    are written as well as read (the cache's entries and records: attncc.runtime.cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.size = settings.memo_size()

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)

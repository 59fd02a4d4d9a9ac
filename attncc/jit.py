"""``@attncc.jit``: sparse attention written as a predicate over query/key coordinates.

::

    @attncc.jit(grid=("T", "H", "W"))
    def local_video(q, k):
        return (abs(q.t - k.t) <= 2) & (abs(q.h - k.h) <= 7) & (abs(q.w - k.w) <= 7)

    out = local_video(q, k, v)              # q, k, v: [B, T, H, W, heads, D]
    out = local_video(q, k, v, score_mod=lambda score, b, h, q, k: score - s[h] * abs(q.t - k.t))
    out = local_video(q, k, v, grid=(T, H, W))  # or SDPA [B, heads, T*H*W, D]
    print(local_video.pattern((T, H, W)))   # the pattern it compiles to

The predicate is traced once per grid (:mod:`attncc.trace`) and matched into
the pattern IR exactly (:mod:`attncc.predicate`); the kernel is then lowered,
rendered and cached per (pattern, shape, dtype, device) by
:func:`attncc.attention`.

Grammar. ``q`` and ``k`` have one attribute per grid axis, named as in
``grid=`` but lower-case (``q.t``, ``q.h``, ``q.w``; also ``q[0]``, ``q[1]``, ...
by number), and ``q.index``, the flat row-major index. A ``score_mod`` function
given to the call sees the same names (:mod:`attncc.score_fn`). Integer
expressions: coordinates, integer constants (0-d integer tensors too), ``+``,
``-`` (also unary), ``abs``, ``min``/``max``
(see Note [Traced min and max]), ``// c`` and ``% c`` by a positive constant
``c``, and ``t[x]``, a lookup of a coordinate ``x`` in a 1-D integer tensor
``t``. Conditions: ``<, <=, >, >=, ==, !=`` between integer expressions,
joined with ``&``, ``|`` and ``~`` (parenthesise each comparison: in Python
``&`` binds tighter), or a constant ``True``/``False``. The torch spellings of
these (``torch.abs``, ``torch.minimum``, ``torch.logical_and``, tensor methods
such as ``x.abs()``) trace too (Note [Torch functions] in :mod:`attncc.trace`).
Python's ``and``/``or``/``not``, ``if`` and chained comparisons ``a <= b <=
c`` branch on a value that is not known while tracing and are refused.

What has a pattern: per axis, bounds on ``k.x - q.x`` (``band``; ``abs``,
``min``, ``max`` and ``//`` of such differences reduce to these), ``q.x // b
== k.x // b`` (``block_diagonal``), block-causal ``k.x // b <= q.x // b``
(or ``>=``: ``band | block_diagonal``), ``q.x % m == k.x % m`` and ``(k.x -
q.x) % m`` compared with a constant (``congruent``), bounds on the key alone
(``k.x < 16``: ``key_range``; prefix LM: ``(k.index < 16) | (k.index <=
q.index)``), ``t[q.x] == t[k.x]`` (``document`` of ``t``'s values), and the
same on ``index`` (bands that hold the diagonal, blocks as ``document``,
``strided``, key ranges). Anything else, such as a condition on ``q`` alone
that holds for some queries only, two different axes, or a band of the flat
index that leaves the diagonal of a 2-D grid, raises a
:class:`~attncc.errors.TraceError` that quotes the comparison as written and
says why. A predicate that keeps no pair (``k.index < 0``) is refused too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from attncc import settings
from attncc.errors import TraceError, field_error
from attncc.ir.canonical import canonicalize
from attncc.ir.grid import MAX_RANK, Grid
from attncc.ir.nodes import Band, Pattern, dense
from attncc.ir.segments import Segments
from attncc.layouts import to_sdpa_views
from attncc.predicate import Matcher
from attncc.runtime.library import attend, checked_text
from attncc.score_fn import ScoreFunction
from attncc.trace import Cond, trace

__all__ = ["JitAttention", "jit", "match"]


class JitAttention:
    """A predicate compiled to sparse attention; call it like :func:`attncc.attention`."""

    def __init__(self, fn: Callable, names: tuple[str, ...]) -> None:
        try:
            inspect.signature(fn).bind(None, None)
        except TypeError:
            raise TraceError(f"{fn.__name__} must take two arguments (q, k)") from None
        self.fn, self.names = fn, names
        # Traced once per grid, the last ATTNCC_MEMO_SIZE grids kept (attncc.memo).
        self._patterns = functools.lru_cache(maxsize=settings.memo_size())(self._match)
        functools.update_wrapper(self, fn)

    def pattern(self, grid: Grid | tuple[int, ...]) -> Pattern:
        """The canonical pattern of the predicate on ``grid`` (traced once per grid)."""
        grid = grid if isinstance(grid, Grid) else Grid(tuple(grid))
        if grid.rank != len(self.names):
            raise field_error(
                TraceError, "grid", grid.shape, f"{len(self.names)} sizes, for axes {', '.join(self.names)}"
            )
        return self._patterns(grid)

    def _match(self, grid: Grid) -> Pattern:
        where = f"@attncc.jit {self.fn.__name__} on grid {grid}"
        try:
            cond = trace(self.fn, self.names)
        except TraceError as e:
            raise TraceError(f"{where}: {e}") from None
        return match(cond, grid, self.names, where)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        grid: Any = None,
        layout: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """``attncc.attention(q, k, v, pattern, ...)``: spatial ``[B, *grid, H, D]`` (the
        grid sizes come from the shape) or SDPA ``[B, H, N, D]`` with ``grid=`` sizes; q may
        cover a box of k's grid (``q_offset=``, as attncc.attention takes it)."""
        if isinstance(grid, Segments):
            raise _segments_refused("grid", grid)
        found = to_sdpa_views(q, k, v, grid, layout).grid
        if found.rank != len(self.names):
            allowed = (
                f"{len(self.names)} axes ({', '.join(self.names)}): [B, *grid, heads, D] tensors, "
                "or [B, heads, N, D] with grid=(sizes)"
            )
            raise field_error(TraceError, "grid", found.shape, allowed)
        if callable(kwargs.get("score_mod")):  # a score function's q and k use this grid's names
            kwargs["score_mod"] = ScoreFunction(kwargs["score_mod"], "coords", self.names)
        return attend(q, k, v, functools.partial(_text, self), grid=found, layout=layout, **kwargs)

    def __repr__(self) -> str:
        return f"<attncc.jit {self.fn.__name__} over ({', '.join(self.names)})>"


@torch.compiler.assume_constant_result  # Note [Patterns under torch.compile] in attncc.runtime.dynamo
def _text(jitted: JitAttention, grid: tuple[int, ...], heads: int) -> str:
    """The text of ``jitted``'s pattern on ``grid``, checked (torch.compile traces once and keeps it)."""
    return checked_text(jitted.pattern(grid), grid, heads)


def match(cond: Cond | bool, grid: Grid, names: tuple[str, ...], where: str) -> Pattern:
    """The canonical pattern of a traced condition on ``grid``; a :class:`TraceError` that
    starts with ``where`` if it has none or keeps no pair."""
    try:
        found = Matcher(grid, names).formula(cond)
    except TraceError as e:
        raise TraceError(f"{where}: {e}") from None
    if found is True:
        return dense()
    canon = None if found is False else canonicalize(found, grid)
    # The canonical form of a pattern that keeps nothing is an empty band.
    if canon is None or (isinstance(canon, Band) and (canon.lo or 0) >= grid.shape[canon.axis]):
        raise TraceError(f"{where}: the predicate keeps no (query, key) pair: its mask is empty")
    return canon


def _segments_refused(name: str, space: Segments) -> TraceError:
    """A predicate is traced on one grid: a space of segments is refused, saying what to write."""
    why = (
        "a predicate over a space of segments is not defined yet: write by_segments(space, "
        "{(q segment, k segment): pattern}) and call attncc.attention (Note [Segment spaces])"
    )
    return field_error(TraceError, name, str(space), "one grid", why)


def jit(fn: Callable | None = None, *, grid: tuple[str, ...] | str) -> Any:
    """Decorate a predicate ``f(q, k)`` over the axes named by ``grid`` (see the module doc)."""
    if isinstance(grid, Segments):
        raise _segments_refused("jit grid", grid)
    names = (grid,) if isinstance(grid, str) else tuple(grid) if isinstance(grid, (tuple, list)) else None
    allowed = f"1 to {MAX_RANK} distinct axis names (identifiers other than 'index'), e.g. ('T', 'H', 'W')"
    if names is None or not 1 <= len(names) <= MAX_RANK:
        raise field_error(TraceError, "jit grid", grid, allowed)
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or name.lower() == "index":
            raise field_error(TraceError, "jit grid axis name", name, allowed)
    lowered = tuple(n.lower() for n in names)
    if len(set(lowered)) != len(lowered):
        raise field_error(TraceError, "jit grid", names, allowed)
    if fn is None:
        return lambda f: JitAttention(f, lowered)
    return JitAttention(fn, lowered)

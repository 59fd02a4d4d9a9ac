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

Cross-attention: ``f(q, k, v, q_grid=...)`` puts q on a grid of its own (Note
[Cross-attention] in attncc.runtime.cross); the predicate's axes are then the keys' grid's, and
it may read the key alone (``k.index < 16``, ``k.x < 5``) or be constant ``True``: no query has
a place among the keys, so a comparison that reads ``q`` is refused, quoted. The keys it keeps
run as ``key_range`` runs of k's row-major order (Note [Key runs]).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from attncc import settings
from attncc.errors import TraceError, field_error
from attncc.ir.analysis import keys_of
from attncc.ir.canonical import canonicalize
from attncc.ir.grid import MAX_RANK, Grid
from attncc.ir.nodes import Band, Pattern, dense, key_range, union
from attncc.ir.segments import Segments
from attncc.layouts import as_grid, cross_views, to_sdpa_views
from attncc.predicate import Matcher
from attncc.runtime.library import attend, attention, checked_text
from attncc.score_fn import ScoreFunction
from attncc.trace import Cond, Int, trace

MAX_KEY_RUNS = 64  # Note [Key runs]: the key_range runs a cross-attention predicate may keep

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
        self._key_patterns = functools.lru_cache(maxsize=settings.memo_size())(self._match_keys)
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

    def key_pattern(self, grid: Grid | tuple[int, ...]) -> Pattern:
        """The pattern a cross-attention call (``q_grid=``) over keys on ``grid`` runs, on the
        keys' flat sequence of ``grid.size`` tokens (Note [Key runs]); traced once per grid."""
        grid = grid if isinstance(grid, Grid) else Grid(tuple(grid))
        self._check_rank(grid)
        return self._key_patterns(grid)

    def _check_rank(self, grid: Grid) -> None:
        if grid.rank != len(self.names):
            allowed = (
                f"{len(self.names)} axes ({', '.join(self.names)}): [B, *grid, heads, D] tensors, "
                "or [B, heads, N, D] with grid=(sizes)"
            )
            raise field_error(TraceError, "grid", grid.shape, allowed)

    def _match_keys(self, grid: Grid) -> Pattern:
        where = f"@attncc.jit {self.fn.__name__} across grids (q_grid) over keys on {grid}"
        try:
            cond = trace(self.fn, self.names)
        except TraceError as e:
            raise TraceError(f"{where}: {e}") from None
        _refuse_queries(cond, where)
        kept = keys_of(match(cond, grid, self.names, where), grid, 0)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], kept.astype(np.int8), [0]])))
        runs = list(zip(edges[::2].tolist(), (edges[1::2] - 1).tolist()))
        if len(runs) > MAX_KEY_RUNS:
            why = "a cross call keeps keys by key_range runs of k's row-major order (Note [Key runs])"
            raise field_error(TraceError, f"{where}: runs of kept keys", len(runs), f"1..{MAX_KEY_RUNS}", why)
        if runs == [(0, grid.size - 1)]:
            return dense()
        return union(*(key_range(0, lo, hi) for lo, hi in runs))

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
        cover a box of k's grid (``q_offset=``, as attncc.attention takes it), or, with
        ``q_grid=``, lie on a grid of its own (cross-attention: the predicate reads keys alone)."""
        if isinstance(grid, Segments):
            raise _segments_refused("grid", grid)
        if kwargs.get("q_grid") is not None:
            return self._cross(q, k, v, grid, layout, **kwargs)
        found = to_sdpa_views(q, k, v, grid, layout).grid
        self._check_rank(found)
        if callable(kwargs.get("score_mod")):  # a score function's q and k use this grid's names
            kwargs["score_mod"] = ScoreFunction(kwargs["score_mod"], "coords", self.names)
        return attend(q, k, v, functools.partial(_text, self), grid=found, layout=layout, **kwargs)

    def _cross(self, q, k, v, grid, layout, q_grid, out=None, return_lse=False, **kwargs) -> Any:
        """A call with ``q_grid``: attncc.attention's cross-attention of :meth:`key_pattern`
        over k's flat sequence, in the caller's layout."""
        views = cross_views(q, k, v, grid, as_grid("q_grid", q_grid), layout)
        self._check_rank(views.grid)
        found = attention(
            views.q, views.k, views.v, self.key_pattern(views.grid), grid=(views.grid.size,), layout="sdpa",
            q_grid=views.q_grid.size, out=None if out is None else views.out(out), return_lse=return_lse,
            **kwargs,
        )  # fmt: skip
        if not return_lse:
            return views.out.output(found)
        return views.out.output(found[0]), views.out.lse(found[1])

    def __repr__(self) -> str:
        return f"<attncc.jit {self.fn.__name__} over ({', '.join(self.names)})>"


@torch.compiler.assume_constant_result  # Note [Patterns under torch.compile] in attncc.runtime.dynamo
def _text(jitted: JitAttention, grid: tuple[int, ...], heads: int) -> str:
    """The text of ``jitted``'s pattern on ``grid``, checked (torch.compile traces once and keeps it)."""
    return checked_text(jitted.pattern(grid), grid, heads)


# Note [Key runs]: across grids (a call with q_grid) no query has a place among the keys, so a
# predicate may read the key alone; matched on the keys' grid, its pattern keeps the same keys
# for every query. The cross kernels read k as one flat sequence (key_range takes a 1-D k:
# attncc.ir.validate.validate_cross), so those keys become key_range runs of k's row-major
# order: one run for ``k.index < 16`` or ``k.x < 5`` (whole rows), one per row for ``k.y < 5``
# on a 2-D grid. At most MAX_KEY_RUNS runs are taken (a union of that many ranges).


def _refuse_queries(cond: Cond | bool, where: str) -> None:
    """Raise a :class:`TraceError` quoting the first comparison of ``cond`` that reads ``q``."""
    if isinstance(cond, bool):
        return
    if cond.kind == "cmp":
        if any(_reads_query(side) for side in cond.args[1:]):
            why = "cross-attention (q_grid) takes conditions on keys alone: q has no place among the keys"
            raise TraceError(f"{where}: {cond.text}: {why}")
        return
    for part in cond.args:
        if isinstance(part, Cond):
            _refuse_queries(part, where)


def _reads_query(value: object) -> bool:
    if not isinstance(value, Int):
        return False
    if value.kind == "var":
        return value.args[0] == "q"
    return any(_reads_query(arg) for arg in value.args)


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

"""Score functions as score terms: ``attncc.attention(..., score_mod=fn)``, ``@attncc.jit``'s
calls and FlexAttention's ``score_mod`` (:mod:`attncc.flex`).

A score function ``fn(score, b, h, q, k)`` is traced (:mod:`attncc.score_trace`) and matched
into the terms of Note [Score terms] (:mod:`attncc.score_match`); the result is a
:class:`~attncc.ir.score.Score` whose tensors are the ones ``fn`` captured (or views of them,
Note [Term views]), so gradients reach them and new values never recompile.

Note [Score functions under torch.compile]: the tracer must not run on dynamo's fake
tensors in the graph, and a Score made in the graph cannot be handed to a constant
function (Note [Constants under torch.compile] in attncc.runtime.library). So the work is
split in two:

- :func:`_recipe`, an ``assume_constant_result`` function, traces and matches ``fn`` (a
  real function object: dynamo hands it over as a constant) and returns plain data: the
  cap, each term with where its tensor lives in ``fn`` (a *path*: closure cell, default,
  global or ``self``, then attribute names) and the view steps to apply, and the plain
  numbers ``fn`` captures with their values. Eagerly it is memoised per code object and
  fingerprint of what ``fn`` captures (:class:`_Keyed`): the values of numbers, the
  shapes of tensors, the identity of other objects.
- :func:`_build`, in the graph, fetches each tensor by its path (dynamo follows
  ``fn.__closure__[i].cell_contents``, ``fn.__globals__[name]``, attributes), applies
  the steps, builds the Score with the term builders, and compares each captured number
  with its recorded value: dynamo guards on what the graph reads, so a new number or a
  new shape retraces, and new tensor values do not. Eagerly a mismatch (a tensor an
  attribute holds changed shape) drops the memo and traces again.

A function defined inside the compiled region cannot be followed this way (dynamo does
not expose its closure): it is refused with a TraceError that says to define it outside.
What the trace reads through helper functions' own globals is not guarded.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attncc.errors import TraceError, form_error
from attncc.ir.canonical import canonicalize, resolve_heads
from attncc.ir.grid import Grid
from attncc.ir.score import Score, alibi, bias, key_bias, query_bias, rel_pos_bias, softcap, temperature
from attncc.ir.score import table_units as _table_units
from attncc.ir.text import parse
from attncc.memo import memo
from attncc.score_match import Context, Source, match
from attncc.score_trace import leaves, trace_score
from attncc.trace import Coords, Int

_BUILDERS = {
    "temperature": temperature,
    "rel_pos_bias": rel_pos_bias,
    "query_bias": query_bias,
    "key_bias": key_bias,
    "bias": bias,
}
_PLAIN = (bool, int, float, str, type(None))
Path = tuple  # (root, key, attribute names): root closure, default, kwdefault, global or self


def axis_names(rank: int) -> tuple[str, ...]:
    """The coordinates' names of ``attncc.attention``'s score functions: ``q.n`` on a
    sequence, ``q.h, q.w`` on an image, ``q.t, q.h, q.w`` on a video (and ``q.index``)."""
    return {1: ("n",), 2: ("h", "w"), 3: ("t", "h", "w")}[rank]


@dataclass(frozen=True)
class ScoreFunction:
    """A score function and how it takes its arguments: ``form`` 'coords' is ``fn(score, b, h,
    q, k)``, ``q``/``k`` with coordinates named ``names`` (None: :func:`axis_names` of the
    grid); 'flex' is FlexAttention's ``fn(score, b, h, q_idx, kv_idx)`` on a 1-D grid."""

    fn: Callable
    form: str = "coords"
    names: tuple[str, ...] | None = None


def score_terms(
    fn: Callable | ScoreFunction, pattern_text: str, grid: Grid, heads: int, device: torch.device
) -> Score:
    """The score terms of the score function ``fn`` (a plain function takes the 'coords'
    form, :class:`ScoreFunction`) for a call of ``pattern_text`` (its text form) on ``grid``
    with ``heads`` query heads (Note [Score functions under torch.compile]). Raises
    :class:`~attncc.errors.TraceError` naming the sub-expression that has no term."""
    if not isinstance(fn, ScoreFunction):
        fn = ScoreFunction(fn)
    func, owner = _split(fn.fn)
    names = axis_names(grid.rank) if fn.names is None else fn.names
    call = (fn.form, names, pattern_text, grid.shape, heads)
    try:
        return _build(func, owner, _recipe(func, owner, *call), device)
    except _Stale:
        _traced.cache_clear()
        return _build(func, owner, _recipe(func, owner, *call), device)


def _split(fn: Any) -> tuple[types.FunctionType, Any]:
    """``(function, self)`` of a bound method, ``(fn, None)`` of a function; a TraceError for
    another callable, or for a function made inside a compiled region (Note [Score functions
    under torch.compile]: dynamo takes a method apart but cannot hand one to a constant)."""
    if isinstance(fn, types.MethodType):
        func, owner = fn.__func__, fn.__self__
    elif isinstance(fn, types.FunctionType):
        func, owner = fn, None
    else:
        expected = "a Python function score_mod(score, b, h, q, k) (def or lambda) or a bound method"
        raise form_error(TraceError, "score_mod", fn, expected)
    try:
        func.__closure__  # noqa: B018 (dynamo raises here for a function made in the graph)
    except AttributeError:
        raise TraceError(
            f"score_mod {func.__name__} was defined inside the compiled region: torch.compile cannot "
            "follow its captured tensors there; define it outside (at module level, or once in a "
            "module's __init__)"
        ) from None
    return func, owner


# --- the recipe: trace and match, as plain data ------------------------------------------------


@torch.compiler.assume_constant_result
def _recipe(func: types.FunctionType, owner: Any, form: str, names: tuple[str, ...], pattern_text: str,
            grid: tuple[int, ...], heads: int) -> tuple:  # fmt: skip
    """``(softcap, entries, numbers)``: see Note [Score functions under torch.compile]."""
    return _traced(_Keyed(func, owner, (form, names, pattern_text, grid, heads)))


class _Keyed:
    """A score function and its call, equal to another where the trace would be the same (the
    memo keeps it, but not the function or ``self``: :func:`_traced` lets go of them)."""

    def __init__(self, func: types.FunctionType, owner: Any, call: tuple) -> None:
        self.func, self.owner, self.call = func, owner, call
        roots = _Roots(func, owner)
        self.key = (func.__code__, call, tuple(_fingerprint(v) for _, v in roots.values))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Keyed) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


def _fingerprint(value: Any) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, _PLAIN):
        return ("value", type(value), value)
    if isinstance(value, types.FunctionType):
        return ("function", value.__code__)
    if _is_module(value):
        return ("module", value.__name__)
    return ("object", type(value), id(value))


@memo  # the last ATTNCC_MEMO_SIZE functions and calls
def _traced(keyed: _Keyed) -> tuple:
    func, owner, (form, names, pattern_text, grid, heads) = keyed.func, keyed.owner, keyed.call
    keyed.func = keyed.owner = None  # the memo keeps the key, not the function's captures
    name = func.__name__
    where = f"attncc.flex score_mod {name} on {grid[0]} tokens" if form == "flex" else (
        f"score_mod {name} on grid {Grid(grid)}"
    )  # fmt: skip
    args = _arguments(func, owner, form, names)
    roots = _Roots(func, owner)
    try:
        node = trace_score(func, args)
        terms = match(node, Context(heads, grid, _units(pattern_text, Grid(grid), heads)))
        entries = tuple((term, distance, _plain(source, roots)) for term, distance, source in terms.entries)
    except TraceError as e:
        raise TraceError(f"{where}: {e}") from None
    numbers = tuple((path, v) for path, v in roots.values if isinstance(v, _PLAIN) and v == v)  # not NaN
    return terms.softcap, entries, numbers


def _is_module(value: Any) -> bool:
    return isinstance(value, types.ModuleType)


def _arguments(func: types.FunctionType, owner: Any, form: str, names: tuple[str, ...]) -> tuple:
    """The traced arguments of ``func`` (``self`` first for a method)."""
    what = "(score, b, h, q_idx, kv_idx)" if form == "flex" else "(score, b, h, q, k)"
    front = () if owner is None else (owner,)
    try:
        signature = inspect.signature(func)
        signature.bind(*front, *[None] * 5)
    except (TypeError, ValueError):
        raise TraceError(f"score_mod {func.__name__} must take five arguments {what}") from None
    params = [p.name for p in signature.parameters.values()][len(front) : len(front) + 5]
    params += ["score", "b", "h", "q", "k"][len(params) :]
    score, b, h = leaves((params[0], params[1], params[2]))
    if form == "flex":
        q, k = Int("var", ("q", 0), params[3]), Int("var", ("k", 0), params[4])
    else:
        q, k = Coords("q", names), Coords("k", names)
    return (*front, score, b, h, q, k)


def _units(pattern_text: str, grid: Grid, heads: int) -> tuple[int, ...] | None:
    """The relative position table's unit per axis (None: the heads' patterns disagree)."""
    found = {_table_units(canonicalize(p, grid), grid) for p in resolve_heads(parse(pattern_text), heads)}
    return found.pop() if len(found) == 1 else None


class _Roots:
    """What a score function can read: its closure cells, defaults, the globals its code
    names, and ``self`` of a bound method, each with its path."""

    def __init__(self, func: types.FunctionType, owner: Any) -> None:
        code = func.__code__
        values: list[tuple[Path, Any]] = []
        for i, cell in enumerate(func.__closure__ or ()):
            try:
                values.append((("closure", i, ()), cell.cell_contents))
            except ValueError:  # a cell not yet bound
                continue
        values += [(("default", i, ()), v) for i, v in enumerate(func.__defaults__ or ())]
        values += [(("kwdefault", k, ()), v) for k, v in (func.__kwdefaults__ or {}).items()]
        values += [(("global", n, ()), func.__globals__[n]) for n in code.co_names if n in func.__globals__]
        if owner is not None:
            values.append((("self", None, ()), owner))
        self.values = values
        self.names = {("closure", i, ()): n for i, n in enumerate(code.co_freevars)}
        self.attributes = code.co_names

    def find(self, tensor: torch.Tensor, name: str) -> Path | None:
        """The path of ``tensor``: a root of that name first, then any root or an attribute
        (named in the code) of one, two levels deep."""
        named = [p for p, v in self.values if v is tensor and name in (self.names.get(p), p[1])]
        if named:
            return named[0]
        frontier = list(self.values)
        for _ in range(3):
            hit = next((p for p, v in frontier if v is tensor), None)
            if hit is not None:
                return hit
            frontier = [
                ((p[0], p[1], (*p[2], a)), _attribute(v, a))
                for p, v in frontier
                if not isinstance(v, (torch.Tensor, *_PLAIN)) and not _is_module(v)
                for a in self.attributes
            ]
        return None


def _attribute(value: Any, name: str) -> Any:
    try:
        return getattr(value, name, None)
    except Exception:  # a property that fails is not where the tensor is
        return None


def _plain(source: Source, roots: _Roots) -> tuple:
    """A matched source with each tensor replaced by its path and shape (plain data)."""
    kind = source[0]
    if kind == "read":
        _, tensor, steps, name = source
        path = roots.find(tensor, name)
        if path is None:
            raise TraceError(
                f"{name}: a tensor the score function neither captured nor found in its globals "
                "(made inside it, or reached through a helper): capture it in a closure variable, "
                "a default argument, a global or an attribute of one"
            )
        return ("read", path, tuple(tensor.shape), steps)
    if kind == "scale":
        return ("scale", _plain(source[1], roots), source[2])
    if kind == "stack":
        return ("stack", tuple(_plain(s, roots) for s in source[1]))
    return source


# --- the build: in the graph ---------------------------------------------------------------------


class _Stale(Exception):
    """A memoised recipe no longer fits the function (eager only)."""


def _build(func: types.FunctionType, owner: Any, recipe: tuple, device: torch.device) -> Score:
    cap, entries, numbers = recipe
    fn = (func, owner)
    for path, value in numbers:
        if _fetch(fn, path) != value:
            raise _Stale
    score = Score() if cap is None else softcap(cap)
    for term, distance, source in entries:
        if term == "alibi":
            slopes = source[1] if source[0] == "numbers" else _value(fn, source, device)
            score = score + alibi(slopes, distance=distance)
        else:
            score = score + _BUILDERS[term](_value(fn, source, device))
    return score


def _fetch(fn: tuple[types.FunctionType, Any], path: Path) -> Any:
    """The value at ``path`` of ``fn``, a function and its ``self`` (or None)."""
    root, key, attributes = path
    target, owner = fn
    if root == "closure":
        value = target.__closure__[key].cell_contents
    elif root == "global":
        value = target.__globals__[key]
    elif root == "default":
        value = target.__defaults__[key]
    elif root == "kwdefault":
        value = target.__kwdefaults__[key]
    else:
        value = owner
    for name in attributes:
        value = getattr(value, name)
    return value


def _value(fn: tuple[types.FunctionType, Any], source: tuple, device: torch.device) -> torch.Tensor:
    kind = source[0]
    if kind == "read":
        _, path, shape, steps = source
        t = _fetch(fn, path)
        if tuple(t.shape) != shape:
            raise _Stale
        return _viewed(t, steps)
    if kind == "numbers":
        return torch.tensor(source[1], dtype=torch.float32, device=device)
    if kind == "scale":
        t, factor = _value(fn, source[1], device), source[2]
        if isinstance(factor, tuple):
            return t * torch.tensor(factor, dtype=t.dtype, device=t.device)
        return t * factor
    return torch.stack([_value(fn, s, device).float() for s in source[1]], dim=1)


def _viewed(t: torch.Tensor, steps: tuple) -> torch.Tensor:
    """``t`` through the view steps of Note [Term views]."""
    for op, arg in steps:
        if op == "index":
            t = t[tuple(slice(None) if i is None else i for i in arg)]
        elif op == "permute":
            t = t.permute(arg)
        elif op == "reshape":
            t = t.reshape(arg)
        elif op == "flip":
            t = t.flip(arg)
        else:
            t = t.expand(arg)
    return t

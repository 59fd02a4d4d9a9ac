"""Traced reals for score functions: ``score_mod(score, b, h, q, k)`` run on these records
what it computes; :mod:`attncc.score_match` matches the record into score terms.

``score`` is a :class:`Real` of kind ``score``, ``b`` and ``h`` Reals of kind ``batch`` and
``head``; ``q``/``k`` are the mask tracer's coordinates (:class:`attncc.trace.Coords`, or
FlexAttention's ``q_idx``/``kv_idx`` as :class:`attncc.trace.Int` leaves), so integer
expressions of coordinates are the mask tracer's Int trees, and enter a Real as kind
``int``. Reading a captured float tensor at traced indices (``table[h, k.index - q.index +
6]``) is a Real of kind ``read``. Every node keeps the text written (the mask tracer's
text machinery: :func:`attncc.trace.paren`), so a refusal quotes the sub-expression.

Kinds: ``score``, ``batch``, ``head``, ``const`` (a float), ``int`` (an Int), ``read``
(tensor, indices, name), ``add``, ``sub``, ``mul``, ``div``, ``pow``, ``neg``, ``abs``,
``tanh``, ``exp``, ``exp2``, ``log``, ``log2``, ``min``, ``max``. The tracer records them
all; which of them have a term is the matcher's business.

Note [Score torch functions]: a FlexAttention ``score_mod`` calls ``torch.tanh``,
``torch.exp2``, tensor methods, and indexes captured tensors with traced values. While a
score function runs (:func:`attncc.trace.outer_grammar`), every torch function called on a
traced value comes here (Note [Outer grammars] in attncc.trace): indexing makes a read, the
functions of the score grammar (table ``_TORCH``) make Reals, one that involves only
integers goes back to the mask tracer (``torch.abs(q_idx - kv_idx)`` is an Int;
``torch.clamp`` of an Int is its min/max), and any other one is refused by name
(``torch.where``: a score that branches has no term).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attncc.errors import TraceError
from attncc.trace import (
    ADD,
    ATOM,
    MUL,
    UNARY,
    Cond,
    Int,
    Outer,
    call,
    maximum,
    minimum,
    name_of,
    outer_grammar,
    paren,
    text_of,
    torch_call,
)

_POW = 95  # ** binds tighter than unary minus on its left
_INDEX_HELP = (
    "index a captured tensor by b, h, an integer, or an integer expression of q and k "
    "(q.index, k.index - q.index + 6, (k.x - q.x) // 2 + 3)"
)


def _flip(op: Callable) -> Callable:
    return lambda a, b: op(b, a)


@dataclass(frozen=True, eq=False)
class Real(Outer):
    """A traced real number (see the module doc for its kinds)."""

    kind: str
    args: tuple
    text: str
    strength: int = ATOM

    dtype = torch.float32  # read by torch.finfo(score.dtype).min in a masking score_mod

    # --- arithmetic ---------------------------------------------------------

    def _binary(self, other: Any, kind: str, symbol: str, strength: int, reflected: bool = False) -> Real:
        a, b = (_real(other), self) if reflected else (self, _real(other))
        right = strength + 1 if kind != "pow" else strength
        left = strength if kind != "pow" else strength + 1
        return Real(kind, (a, b), f"{paren(a, left)} {symbol} {paren(b, right)}", strength)

    def __add__(self, other: Any) -> Real:
        return self._binary(other, "add", "+", ADD)

    def __radd__(self, other: Any) -> Real:
        return self._binary(other, "add", "+", ADD, reflected=True)

    def __sub__(self, other: Any) -> Real:
        return self._binary(other, "sub", "-", ADD)

    def __rsub__(self, other: Any) -> Real:
        return self._binary(other, "sub", "-", ADD, reflected=True)

    def __mul__(self, other: Any) -> Real:
        return self._binary(other, "mul", "*", MUL)

    def __rmul__(self, other: Any) -> Real:
        return self._binary(other, "mul", "*", MUL, reflected=True)

    def __truediv__(self, other: Any) -> Real:
        return self._binary(other, "div", "/", MUL)

    def __rtruediv__(self, other: Any) -> Real:
        return self._binary(other, "div", "/", MUL, reflected=True)

    def __pow__(self, other: Any) -> Real:
        return self._binary(other, "pow", "**", _POW)

    def __rpow__(self, other: Any) -> Real:
        return self._binary(other, "pow", "**", _POW, reflected=True)

    def __neg__(self) -> Real:
        return Real("neg", (self,), f"-{paren(self, UNARY)}", UNARY)

    def __pos__(self) -> Real:
        return self

    def __abs__(self) -> Real:
        return Real("abs", (self,), f"abs({self.text})")

    @classmethod
    def extreme(cls, kind: str, values: tuple) -> Real:
        reals = tuple(_real(v) for v in values)
        return Real(kind, reals, f"{kind}({', '.join(r.text for r in reals)})")

    @classmethod
    def lift(cls, value: Int) -> Real:
        return _real(value)

    @classmethod
    def torch_call(cls, func: Any, args: tuple, kwargs: dict | None) -> Any:
        return _torch(func, args, kwargs)

    # --- indexing a partly indexed tensor: t[h][k.index] ------------------------

    def __getitem__(self, index: Any) -> Real:
        return _read(self, index)

    # --- what a score does not do -------------------------------------------------

    def _refuse(self, other: Any = None, symbol: str = "") -> Any:
        shown = f"{self.text} {symbol} {text_of(other)}" if symbol else self.text
        raise TraceError(
            f"{shown}: a score is not compared, branched on or used as a Python number "
            "(a score function computes one value from score, b, h, q and k with "
            "+, -, *, / by constants, abs, min, max, tanh, exp2, log2)"
        )

    def __lt__(self, other: Any) -> Any:
        return self._refuse(other, "<")

    def __le__(self, other: Any) -> Any:
        return self._refuse(other, "<=")

    def __gt__(self, other: Any) -> Any:
        return self._refuse(other, ">")

    def __ge__(self, other: Any) -> Any:
        return self._refuse(other, ">=")

    def __eq__(self, other: Any) -> Any:  # type: ignore[override]
        return self._refuse(other, "==")

    def __ne__(self, other: Any) -> Any:  # type: ignore[override]
        return self._refuse(other, "!=")

    __hash__ = object.__hash__

    def __bool__(self) -> bool:
        return self._refuse()

    def __float__(self) -> float:
        return self._refuse()

    __int__ = __index__ = __float__

    def __floordiv__(self, other: Any) -> Any:
        return self._refuse(other, "//")

    __rfloordiv__ = __mod__ = __rmod__ = __floordiv__

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        op = _METHODS.get(name)
        if op is None:
            allowed = ", ".join(sorted(_METHODS))
            raise TraceError(f"{self.text}.{name}: not a traced method of a score; allowed: {allowed}")
        return lambda *args: op(self, *args)

    @classmethod
    def __torch_function__(cls, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _torch(func, args, kwargs)


def _real(value: Any) -> Real:
    """An operand of a Real operator as a Real (Note [Score torch functions])."""
    if isinstance(value, Real):
        return value
    if isinstance(value, Int):
        return Real("int", (value,), value.text, value.strength)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Real("const", (float(value),), repr(value) if value >= 0 else f"({value!r})")
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
        return _read(value, ())  # a captured scalar: a learned value, read as a tensor term
    if isinstance(value, Cond):
        raise TraceError(f"{value.text}: a condition in a score; a score that branches has no term")
    raise TraceError(
        f"{text_of(value)}: a score combines score, b, h, integer expressions of q and k, "
        "numbers and captured tensors read at traced indices (t[h], t[k.index - q.index + 6])"
    )


def _read(base: Any, index: Any) -> Real:
    """``base[index]``: a captured float tensor read at traced indices (or more indices of a
    partly indexed one)."""
    items = index if isinstance(index, tuple) else (index,)
    if isinstance(base, Real):
        if base.kind != "read":
            shown = f"{base.text}[{', '.join(map(text_of, items))}]"
            raise TraceError(f"{shown}: only captured tensors are indexed")
        tensor, done, name = base.args
    else:
        tensor, done, name = base, (), name_of(base) or "tensor"
    shown = f"{name}[{', '.join(map(text_of, (*done, *items)))}]" if done or items else name
    if not tensor.is_floating_point():
        raise TraceError(
            f"{shown}: {name} is {text_of(tensor)}; a score reads float tensors (an integer lookup "
            "has no score term)"
        )
    for item in items:
        is_index = (isinstance(item, int) and not isinstance(item, bool)) or isinstance(item, Int)
        if not (is_index or (isinstance(item, Real) and item.kind in ("batch", "head"))):
            raise TraceError(f"{shown}: {text_of(item)} is not an index of a score; " + _INDEX_HELP)
    if len(done) + len(items) > tensor.dim():
        count = len(done) + len(items)
        raise TraceError(f"{shown}: {name} has {tensor.dim()} dimensions, indexed {count} times")
    return Real("read", (tensor, (*done, *items), name), shown)


def _unary(kind: str) -> Callable[[Any], Real]:
    def apply(x: Any) -> Real:
        r = _real(x)
        return Real(kind, (r,), f"torch.{kind}({r.text})")

    return apply


def _pair(kind: str) -> Callable[[Any, Any], Real]:
    return lambda a, b: Real.extreme(kind, (a, b))


def _clamp(x: Any, min: Any = None, max: Any = None) -> Any:
    """``torch.clamp`` as ``minimum``/``maximum`` (of integers: the mask tracer's)."""
    if min is not None:
        x = maximum(x, min)
    return x if max is None else minimum(x, max)


# Each operation of the score grammar and the torch names that spell it (torch.NAME, Tensor.NAME).
_SPELLINGS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "add": (operator.add, ("add", "__add__")),
    "radd": (_flip(operator.add), ("__radd__",)),
    "sub": (operator.sub, ("sub", "subtract", "__sub__")),
    "rsub": (_flip(operator.sub), ("rsub", "__rsub__")),
    "mul": (operator.mul, ("mul", "multiply", "__mul__")),
    "rmul": (_flip(operator.mul), ("__rmul__",)),
    "div": (operator.truediv, ("div", "divide", "true_divide", "__truediv__")),
    "rdiv": (_flip(operator.truediv), ("__rtruediv__",)),
    "pow": (operator.pow, ("pow", "__pow__")),
    "rpow": (_flip(operator.pow), ("__rpow__",)),
    "neg": (operator.neg, ("neg", "negative", "__neg__")),
    "abs": (abs, ("abs", "absolute", "__abs__")),
    "tanh": (_unary("tanh"), ("tanh",)),
    "exp": (_unary("exp"), ("exp",)),
    "exp2": (_unary("exp2"), ("exp2",)),
    "log": (_unary("log"), ("log",)),
    "log2": (_unary("log2"), ("log2",)),
    "min": (_pair("min"), ("minimum", "min")),
    "max": (_pair("max"), ("maximum", "max")),
    "clamp": (_clamp, ("clamp", "clip")),
}
_METHODS = {name: op for op, names in _SPELLINGS.values() for name in names if not name.startswith("_")}
_TORCH: dict[Any, Callable] = {
    getattr(owner, name): op
    for op, names in _SPELLINGS.values()
    for name in names
    for owner in (torch, torch.Tensor)
    if hasattr(owner, name)
}
_CLAMPS = {torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip}


def _torch(func: Any, args: tuple, kwargs: dict | None) -> Any:
    """A torch function called on traced values while a score traces (Note [Score torch
    functions]): a read, a Real, the mask tracer's Int, or a TraceError."""
    kwargs = dict(kwargs or {})
    if func is torch.Tensor.__getitem__:
        return _read(args[0], args[1])
    if func in _CLAMPS and isinstance(args[0], Int) and set(kwargs) <= {"min", "max"}:
        return _clamp(*args, **kwargs)
    if not any(isinstance(a, Real) for a in (*args, *kwargs.values())):
        return torch_call(func, args, kwargs)  # the integer grammar (Note [Torch functions])
    op = _TORCH.get(func)
    shown_args = [*map(text_of, args), *(f"{k}={v!r}" for k, v in kwargs.items())]
    name = getattr(func, "__name__", repr(func))
    shown = f"torch.{name}({', '.join(shown_args)})"
    reduction = func in (torch.min, torch.max, torch.Tensor.min, torch.Tensor.max) and len(args) != 2
    if op is None or reduction or (kwargs and func not in _CLAMPS):
        allowed = ", ".join(sorted(_METHODS))
        raise TraceError(
            f"{shown}: not in the score grammar; allowed torch functions and tensor methods "
            f"(without keyword arguments): {allowed}, and indexing captured tensors"
        )
    return op(*args, **kwargs)


def trace_score(fn: Callable, args: tuple) -> Real:
    """Run ``fn(*args)`` (``score, b, h, q, k`` as traced values) and return the Real it built."""
    with outer_grammar(Real):
        result = call(fn, args)
    if isinstance(result, Int):
        result = _real(result)
    if not isinstance(result, Real):
        name = getattr(fn, "__name__", type(fn).__name__)
        raise TraceError(f"{name} returned {text_of(result)}; allowed: a real expression of score")
    return result


def leaves(names: tuple[str, str, str]) -> tuple[Real, Real, Real]:
    """The traced ``score``, ``b`` and ``h``, shown by ``names`` (how the function calls them)."""
    return Real("score", (), names[0]), Real("batch", (), names[1]), Real("head", (), names[2])

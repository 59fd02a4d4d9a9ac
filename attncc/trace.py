"""Traced values for ``@attncc.jit``: a predicate run on these records what it computes.

``q`` and ``k`` are :class:`Coords` whose attributes are :class:`Int` leaves;
arithmetic on them builds :class:`Int` trees and comparisons build
:class:`Cond` trees. Every node keeps the text the user wrote (``abs(q.t -
k.t) <= 2``) so a refusal can name the sub-expression. A construct outside the
grammar (see :mod:`attncc.jit`) raises :class:`~attncc.errors.TraceError` at
the operator that used it.

Note [Traced min and max]: the builtins ``min``/``max`` compare their
arguments and branch on the result, which a traced value cannot decide. While
tracing, the predicate runs with ``min``/``max`` bound to :func:`minimum` and
:func:`maximum` in its globals (unless its module defines its own), so they
can be written as usual in the decorated function; helpers it calls see the
builtins and must call :func:`minimum`/:func:`maximum` instead.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attncc.errors import TraceError

# Python's binding strength (higher binds tighter), to print sub-expressions as written.
_ATOM, _UNARY, _MUL, _ADD, _AND, _OR, _CMP = 100, 90, 80, 70, 45, 43, 30
_JOIN_HELP = "& and | join comparisons, and bind tighter than them in Python; "
_BOOL_HELP = (
    "write & for and, | for or, ~ for not, and put each comparison in parentheses: "
    "(abs(q.t - k.t) <= 2) & (q.h >= k.h); a chained comparison a <= b <= c is (a <= b) & (b <= c)"
)


def _paren(node: Int | Cond, strength: int) -> str:
    return f"({node.text})" if node.strength < strength else node.text


@dataclass(frozen=True, eq=False)
class Int:
    """A traced integer: ``kind`` is var, const, add, sub, neg, abs, min, max, floordiv or mod."""

    kind: str
    args: tuple
    text: str
    strength: int = _ATOM

    # --- arithmetic ---------------------------------------------------------

    def __add__(self, other: Any) -> Int:
        b = _int(other, self, "+")
        return Int("add", (self, b), f"{_paren(self, _ADD)} + {_paren(b, _ADD + 1)}", _ADD)

    def __radd__(self, other: Any) -> Int:
        return _int(other, self, "+") + self

    def __sub__(self, other: Any) -> Int:
        b = _int(other, self, "-")
        return Int("sub", (self, b), f"{_paren(self, _ADD)} - {_paren(b, _ADD + 1)}", _ADD)

    def __rsub__(self, other: Any) -> Int:
        return _int(other, self, "-") - self

    def __neg__(self) -> Int:
        return Int("neg", (self,), f"-{_paren(self, _UNARY)}", _UNARY)

    def __pos__(self) -> Int:
        return self

    def __abs__(self) -> Int:
        return Int("abs", (self,), f"abs({self.text})")

    def __floordiv__(self, other: Any) -> Int:
        return self._by_constant(other, "//", "floordiv")

    def __mod__(self, other: Any) -> Int:
        return self._by_constant(other, "%", "mod")

    def _by_constant(self, other: Any, symbol: str, kind: str) -> Int:
        shown = other.text if isinstance(other, Int) else repr(other)
        text = f"{_paren(self, _MUL)} {symbol} {shown}"
        if not _is_int(other) or other < 1:
            raise TraceError(f"{text}: {symbol} takes a positive integer constant on its right")
        return Int(kind, (self, other), text, _MUL)

    def __rfloordiv__(self, other: Any) -> Int:
        raise TraceError(f"{other!r} // {self.text}: // and % divide by a constant, not by a coordinate")

    def __rmod__(self, other: Any) -> Int:
        raise TraceError(f"{other!r} % {self.text}: // and % divide by a constant, not by a coordinate")

    def __mul__(self, other: Any) -> Int:
        raise TraceError(
            f"{self.text} * {other!r}: multiplication is not in the grammar "
            "(coordinates combine with +, -, abs, min, max, // and % by constants)"
        )

    __rmul__ = __truediv__ = __rtruediv__ = __pow__ = __rpow__ = __mul__

    # --- comparisons ----------------------------------------------------------

    def _compare(self, other: Any, op: str) -> Cond:
        b = _int(other, self, op)
        return Cond("cmp", (op, self, b), f"{_paren(self, _CMP + 1)} {op} {_paren(b, _CMP + 1)}", _CMP)

    def __lt__(self, other: Any) -> Cond:
        return self._compare(other, "<")

    def __le__(self, other: Any) -> Cond:
        return self._compare(other, "<=")

    def __gt__(self, other: Any) -> Cond:
        return self._compare(other, ">")

    def __ge__(self, other: Any) -> Cond:
        return self._compare(other, ">=")

    def __eq__(self, other: Any) -> Cond:  # type: ignore[override]
        return self._compare(other, "==")

    def __ne__(self, other: Any) -> Cond:  # type: ignore[override]
        return self._compare(other, "!=")

    __hash__ = object.__hash__

    # --- misuse -------------------------------------------------------------

    def _join(self, other: Any, op: str, reflected: bool) -> Int:
        shown = getattr(other, "text", repr(other))
        text = f"{shown} {op} {self.text}" if reflected else f"{self.text} {op} {shown}"
        raise TraceError(f"{text}: " + _JOIN_HELP + _BOOL_HELP)

    def __and__(self, other: Any) -> Int:
        return self._join(other, "&", False)

    def __rand__(self, other: Any) -> Int:
        return self._join(other, "&", True)

    def __or__(self, other: Any) -> Int:
        return self._join(other, "|", False)

    def __ror__(self, other: Any) -> Int:
        return self._join(other, "|", True)

    def __invert__(self) -> Int:
        raise TraceError(f"~{self.text}: ~ negates a comparison, not an integer; " + _BOOL_HELP)

    def __bool__(self) -> bool:
        raise TraceError(f"{self.text} was used as a Python bool; " + _BOOL_HELP)

    def __index__(self) -> int:
        raise TraceError(f"{self.text} was used as a Python int (range, indexing, int()); it is traced")

    __int__ = __index__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any, left: Int, op: str) -> Int:
    if isinstance(value, Int):
        return value
    if _is_int(value):
        return Int("const", (value,), str(value) if value >= 0 else f"({value})")
    raise TraceError(
        f"{left.text} {op} {value!r}: traced coordinates combine with integer constants and "
        "other coordinates only"
    )


@dataclass(frozen=True, eq=False)
class Cond:
    """A traced condition: ``kind`` is cmp (op, lhs, rhs), and, or, or not."""

    kind: str
    args: tuple
    text: str
    strength: int = _ATOM

    def __and__(self, other: Any) -> Cond:
        b = _cond(other, self, "&")
        return Cond("and", (self, b), f"{_paren(self, _AND)} & {_paren(b, _AND + 1)}", _AND)

    def __rand__(self, other: Any) -> Cond:
        return _cond(other, self, "&", reflected=True) & self

    def __or__(self, other: Any) -> Cond:
        b = _cond(other, self, "|")
        return Cond("or", (self, b), f"{_paren(self, _OR)} | {_paren(b, _OR + 1)}", _OR)

    def __ror__(self, other: Any) -> Cond:
        return _cond(other, self, "|", reflected=True) | self

    def __invert__(self) -> Cond:
        return Cond("not", (self,), f"~{_paren(self, _UNARY)}", _UNARY)

    def __bool__(self) -> bool:
        raise TraceError(f"{self.text} was used as a Python bool (and, or, not, if); " + _BOOL_HELP)


def _cond(value: Any, cond: Cond, op: str, reflected: bool = False) -> Cond:
    if isinstance(value, Cond):
        return value
    if isinstance(value, bool):
        return Cond("const", (value,), str(value))
    shown = getattr(value, "text", repr(value))
    text = f"{shown} {op} {cond.text}" if reflected else f"{cond.text} {op} {shown}"
    raise TraceError(f"{text}: " + _JOIN_HELP + _BOOL_HELP)


def minimum(*args: Any) -> Any:
    """``min`` that also takes traced integers (see Note [Traced min and max])."""
    return _extreme("min", args)


def maximum(*args: Any) -> Any:
    """``max`` that also takes traced integers (see Note [Traced min and max])."""
    return _extreme("max", args)


def _extreme(kind: str, args: tuple) -> Any:
    values = tuple(args[0]) if len(args) == 1 else args
    if not values:
        raise TraceError(f"{kind}() of nothing: give it two or more values")
    if not any(isinstance(v, Int) for v in values):
        return (min if kind == "min" else max)(values)
    first = next(v for v in values if isinstance(v, Int))
    ints = tuple(_int(v, first, ",") for v in values)
    return Int(kind, ints, f"{kind}({', '.join(v.text for v in ints)})")


class Coords:
    """``q`` or ``k``: one attribute per grid axis, and ``index`` for the flat row-major index."""

    def __init__(self, side: str, names: tuple[str, ...]) -> None:
        self._side, self._names = side, names

    def __getattr__(self, name: str) -> Int:
        if name.startswith("_"):
            raise AttributeError(name)
        if name == "index":
            # On a 1-D grid the flat index is the only axis.
            axis = 0 if len(self._names) == 1 else -1
            return Int("var", (self._side, axis), f"{self._side}.index")
        if name not in self._names:
            allowed = ", ".join([*self._names, "index"])
            raise TraceError(f"{self._side}.{name}: no such coordinate; allowed: {allowed}")
        return Int("var", (self._side, self._names.index(name)), f"{self._side}.{name}")

    def __repr__(self) -> str:
        return f"<traced {self._side}: {', '.join([*self._names, 'index'])}>"


def trace(fn: Callable, names: tuple[str, ...]) -> Cond | bool:
    """Run ``fn(q, k)`` on traced coordinates named ``names``; return what it returned."""
    env = dict(fn.__globals__)
    for name, traced in (("min", minimum), ("max", maximum)):
        env.setdefault(name, traced)  # Note [Traced min and max]
    runnable = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
    runnable.__kwdefaults__ = fn.__kwdefaults__
    result = runnable(Coords("q", names), Coords("k", names))
    if isinstance(result, (Cond, bool)):
        return result
    shown = result.text if isinstance(result, Int) else repr(result)
    raise TraceError(
        f"{fn.__name__} returned {shown}; allowed: a comparison of coordinates, or comparisons "
        "joined with &, |, ~"
    )

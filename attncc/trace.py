"""Traced values for ``@attncc.jit`` and :mod:`attncc.flex`: a predicate run on these
records what it computes.

``q`` and ``k`` are :class:`Coords` whose attributes are :class:`Int` leaves
(FlexAttention's ``q_idx``/``kv_idx`` are such leaves too); arithmetic on them
builds :class:`Int` trees and comparisons build :class:`Cond` trees. Every node
keeps the text the user wrote (``abs(q.t - k.t) <= 2``) so a refusal can name
the sub-expression. A construct outside the grammar (see :mod:`attncc.jit`)
raises :class:`~attncc.errors.TraceError` at the operator that used it.

Note [Traced min and max]: the builtins ``min``/``max`` compare their
arguments and branch on the result, which a traced value cannot decide. While
tracing, the predicate runs with ``min``/``max`` bound to :func:`minimum` and
:func:`maximum` in its globals (unless its module defines its own), so they
can be written as usual in the decorated function; helpers it calls see the
builtins and must call :func:`minimum`/:func:`maximum` instead.

Note [Torch functions]: a predicate written for tensors (a FlexAttention
``mask_mod``) calls ``torch.abs``, ``torch.logical_and``, tensor methods, and
indexes captured tensors (``doc[q_idx]``). Traced values define
``__torch_function__``, so torch hands each such call to :func:`torch_call`,
which maps the functions of the grammar onto the Python operators (table
``_TORCH``) and refuses any other one by name. Indexing a 1-D integer tensor
with a traced coordinate is a *lookup* (an :class:`Int` of kind ``lookup``
holding the tensor's values); 0-d integer or bool tensors are constants.

Note [Outer grammars]: a score function (attncc.score_trace) computes reals from the
integers of this grammar: ``slopes[h] * abs(q_idx - kv_idx)``. Its values are
:class:`Outer`: an :class:`Int` operator gives way to one (returns NotImplemented, so
Python calls the outer value's reflected operator) and :func:`minimum`/:func:`maximum`
hand it the call. While an outer grammar traces (:func:`outer_grammar`), the operators
this grammar refuses (``*``, ``/``, ``**``: ``abs(q_idx - kv_idx) / 8``) lift the integer
into it, and every torch function called on a traced value (an Int's too: ``table[k.index
- q.index]``) goes to its :meth:`Outer.torch_call`, which passes what is integer-only back
to :func:`torch_call`.
"""

from __future__ import annotations

import operator
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from attncc.errors import AttnccError, TraceError

# Python's binding strength (higher binds tighter), to print sub-expressions as written.
ATOM, UNARY, MUL, ADD, _AND, _OR, _CMP = 100, 90, 80, 70, 45, 43, 30
_JOIN_HELP = "& and | join comparisons, and bind tighter than them in Python; "
_BOOL_HELP = (
    "write & for and, | for or, ~ for not, and put each comparison in parentheses: "
    "(abs(q.t - k.t) <= 2) & (q.h >= k.h); a chained comparison a <= b <= c is (a <= b) & (b <= c)"
)
_LOOKUP_HELP = "a lookup reads a 1-D integer tensor at a coordinate, as in doc[q_idx] == doc[kv_idx]"


class Outer:
    """A traced value of a grammar built on this one (Note [Outer grammars]): it has ``text``
    and ``strength`` as :class:`Int` has."""

    text: str
    strength: int

    @classmethod
    def extreme(cls, kind: str, values: tuple) -> Any:
        """``min``/``max`` of ``values``, one of them an Outer."""
        raise NotImplementedError

    @classmethod
    def lift(cls, value: Int) -> Outer:
        """A traced integer as a value of the outer grammar."""
        raise NotImplementedError

    @classmethod
    def torch_call(cls, func: Any, args: tuple, kwargs: dict | None) -> Any:
        """A torch function called on traced values while the outer grammar traces."""
        raise NotImplementedError


def paren(node: Int | Cond | Outer, strength: int) -> str:
    """``node``'s text, parenthesised where an operator of ``strength`` would bind tighter."""
    return f"({node.text})" if node.strength < strength else node.text


def text_of(value: Any) -> str:
    """A traced value as the user wrote it, or a short description of anything else."""
    if isinstance(value, (Int, Cond, Opaque, Outer)):
        return value.text
    if isinstance(value, torch.Tensor):
        return f"<tensor of shape {list(value.shape)}, {str(value.dtype).removeprefix('torch.')}>"
    return repr(value)


_OUTER: ContextVar[type[Outer] | None] = ContextVar("attncc_trace_outer_grammar", default=None)


@contextmanager
def outer_grammar(outer: type[Outer]) -> Iterator[None]:
    """Trace the block in the grammar of ``outer`` (Note [Outer grammars])."""
    token = _OUTER.set(outer)
    try:
        yield
    finally:
        _OUTER.reset(token)


def _dispatch(cls: type, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
    """``__torch_function__`` of every traced value (Note [Torch functions])."""
    outer = _OUTER.get()
    return torch_call(func, args, kwargs) if outer is None else outer.torch_call(func, args, kwargs)


def _gives_way(method: Callable) -> Callable:
    """An :class:`Int` operator that returns NotImplemented for an :class:`Outer` operand."""

    def operator_(self: Int, other: Any) -> Any:
        return NotImplemented if isinstance(other, Outer) else method(self, other)

    operator_.__name__ = method.__name__
    return operator_


@dataclass(frozen=True)
class Table:
    """The values of a tensor a predicate looks up; ``name`` (how the predicate calls it) is
    for messages only and takes no part in equality."""

    values: tuple[int, ...]
    name: str = field(compare=False)

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True, eq=False)
class Int:
    """A traced integer: ``kind`` is var, const, add, sub, neg, abs, min, max, floordiv,
    mod, or lookup (``args`` = (:class:`Table`, index))."""

    kind: str
    args: tuple
    text: str
    strength: int = ATOM

    # --- arithmetic ---------------------------------------------------------

    @_gives_way
    def __add__(self, other: Any) -> Int:
        b = _int(other, self, "+")
        return Int("add", (self, b), f"{paren(self, ADD)} + {paren(b, ADD + 1)}", ADD)

    @_gives_way
    def __radd__(self, other: Any) -> Int:
        return _int(other, self, "+") + self

    @_gives_way
    def __sub__(self, other: Any) -> Int:
        b = _int(other, self, "-")
        return Int("sub", (self, b), f"{paren(self, ADD)} - {paren(b, ADD + 1)}", ADD)

    @_gives_way
    def __rsub__(self, other: Any) -> Int:
        return _int(other, self, "-") - self

    def __neg__(self) -> Int:
        return Int("neg", (self,), f"-{paren(self, UNARY)}", UNARY)

    def __pos__(self) -> Int:
        return self

    def __abs__(self) -> Int:
        return Int("abs", (self,), f"abs({self.text})")

    def __floordiv__(self, other: Any) -> Int:
        return self._by_constant(other, "//", "floordiv")

    def __mod__(self, other: Any) -> Int:
        return self._by_constant(other, "%", "mod")

    def _by_constant(self, other: Any, symbol: str, kind: str) -> Int:
        other = _constant(other)
        text = f"{paren(self, MUL)} {symbol} {text_of(other)}"
        if not _is_int(other) or other < 1:
            raise TraceError(f"{text}: {symbol} takes a positive integer constant on its right")
        return Int(kind, (self, other), text, MUL)

    def __rfloordiv__(self, other: Any) -> Int:
        raise TraceError(
            f"{text_of(other)} // {self.text}: // and % divide by a constant, not by a coordinate"
        )

    def __rmod__(self, other: Any) -> Int:
        raise TraceError(
            f"{text_of(other)} % {self.text}: // and % divide by a constant, not by a coordinate"
        )

    def _lifted(self, other: Any, method: str, symbol: str) -> Any:
        """``*``, ``/``, ``**``: an outer grammar's (Note [Outer grammars]), else refused."""
        if isinstance(other, Outer):
            return NotImplemented
        outer = _OUTER.get()
        if outer is not None:
            return getattr(outer.lift(self), method)(other)
        what = {"*": "multiplication", "/": "division", "**": "a power"}[symbol]
        raise TraceError(
            f"{self.text} {symbol} {text_of(other)}: {what} is not in the grammar "
            "(coordinates combine with +, -, abs, min, max, // and % by constants)"
        )

    def __mul__(self, other: Any) -> Any:
        return self._lifted(other, "__mul__", "*")

    def __rmul__(self, other: Any) -> Any:
        return self._lifted(other, "__rmul__", "*")

    def __truediv__(self, other: Any) -> Any:
        return self._lifted(other, "__truediv__", "/")

    def __rtruediv__(self, other: Any) -> Any:
        return self._lifted(other, "__rtruediv__", "/")

    def __pow__(self, other: Any) -> Any:
        return self._lifted(other, "__pow__", "**")

    def __rpow__(self, other: Any) -> Any:
        return self._lifted(other, "__rpow__", "**")

    # --- comparisons ----------------------------------------------------------

    def _compare(self, other: Any, op: str) -> Cond:
        b = _int(other, self, op)
        return Cond("cmp", (op, self, b), f"{paren(self, _CMP + 1)} {op} {paren(b, _CMP + 1)}", _CMP)

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
        shown = text_of(other)
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

    def __getitem__(self, index: Any) -> Int:
        raise TraceError(f"{self.text}[{text_of(index)}]: a traced integer cannot be indexed")

    def __len__(self) -> int:
        raise TraceError(f"len({self.text}): a traced integer has no length")

    def __getattr__(self, name: str) -> Any:
        return _method(self, name)

    __torch_function__ = classmethod(_dispatch)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_integer_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not (value.dtype.is_floating_point or value.dtype.is_complex)


def _constant(value: Any) -> Any:
    """A 0-d integer or bool tensor as the Python number it holds; anything else unchanged."""
    if not (_is_integer_tensor(value) and value.dim() == 0):
        return value
    _read(value)
    return value.item()


_READS: ContextVar[list[str] | None] = ContextVar("attncc_tensor_reads", default=None)


@contextmanager
def tensor_reads() -> Iterator[list[str]]:
    """The names of the tensors whose values the predicates traced in this block read (0-d
    constants and lookups), in order: what a pattern built from them depends on besides code."""
    reads: list[str] = []
    token = _READS.set(reads)
    try:
        yield reads
    finally:
        _READS.reset(token)


def _read(tensor: torch.Tensor, name: str | None = None) -> None:
    reads = _READS.get()
    if reads is not None:
        reads.append(name or name_of(tensor) or "tensor")


def _int(value: Any, left: Int, op: str) -> Int:
    value = _constant(value)
    if isinstance(value, Int):
        return value
    if isinstance(value, Opaque):
        raise value.used(f"{left.text} {op} {value.text}")
    if _is_int(value):
        return Int("const", (value,), str(value) if value >= 0 else f"({value})")
    raise TraceError(
        f"{left.text} {op} {text_of(value)}: traced coordinates combine with integer constants and "
        "other coordinates only"
    )


@dataclass(frozen=True, eq=False)
class Cond:
    """A traced condition: ``kind`` is cmp (op, lhs, rhs), and, or, not, const, or pattern (a
    :class:`~attncc.ir.nodes.Pattern` that a front door put in the condition's place, such as
    attncc.flex's per-batch masks)."""

    kind: str
    args: tuple
    text: str
    strength: int = ATOM

    def __and__(self, other: Any) -> Cond:
        b = _cond(other, self, "&")
        return Cond("and", (self, b), f"{paren(self, _AND)} & {paren(b, _AND + 1)}", _AND)

    def __rand__(self, other: Any) -> Cond:
        return _cond(other, self, "&", reflected=True) & self

    def __or__(self, other: Any) -> Cond:
        b = _cond(other, self, "|")
        return Cond("or", (self, b), f"{paren(self, _OR)} | {paren(b, _OR + 1)}", _OR)

    def __ror__(self, other: Any) -> Cond:
        return _cond(other, self, "|", reflected=True) | self

    def __invert__(self) -> Cond:
        return Cond("not", (self,), f"~{paren(self, UNARY)}", UNARY)

    def __bool__(self) -> bool:
        raise TraceError(f"{self.text} was used as a Python bool (and, or, not, if); " + _BOOL_HELP)

    def __getattr__(self, name: str) -> Any:
        return _method(self, name)

    __torch_function__ = classmethod(_dispatch)


def _cond(value: Any, cond: Cond, op: str, reflected: bool = False) -> Cond:
    value = _constant(value)
    if isinstance(value, Cond):
        return value
    if isinstance(value, bool):
        return Cond("const", (value,), str(value))
    shown = text_of(value)
    text = f"{shown} {op} {cond.text}" if reflected else f"{cond.text} {op} {shown}"
    if isinstance(value, Opaque):
        raise value.used(text)
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
    outer = next((v for v in values if isinstance(v, Outer)), None)
    if outer is not None:
        return type(outer).extreme(kind, values)
    if not any(isinstance(v, Int) for v in values):
        return (min if kind == "min" else max)(values)
    first = next(v for v in values if isinstance(v, Int))
    ints = tuple(_int(v, first, ",") for v in values)
    return Int(kind, ints, f"{kind}({', '.join(v.text for v in ints)})")


# --- torch functions (Note [Torch functions]) ---------------------------------------------


def _flip(op: Callable) -> Callable:
    return lambda a, b: op(b, a)


def _pair(kind: str) -> Callable:
    return lambda a, b: _extreme(kind, (a, b))


# Each grammar operation and the torch names that spell it, as torch.NAME and Tensor.NAME.
_SPELLINGS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "abs": (abs, ("abs", "absolute", "__abs__")),
    "neg": (operator.neg, ("neg", "negative", "__neg__")),
    "add": (operator.add, ("add", "__add__")),
    "radd": (_flip(operator.add), ("__radd__",)),
    "sub": (operator.sub, ("sub", "subtract", "__sub__")),
    "rsub": (_flip(operator.sub), ("rsub", "__rsub__")),
    "floordiv": (operator.floordiv, ("floor_divide", "__floordiv__")),
    "rfloordiv": (_flip(operator.floordiv), ("__rfloordiv__",)),
    "mod": (operator.mod, ("remainder", "__mod__")),
    "rmod": (_flip(operator.mod), ("__rmod__",)),
    "mul": (operator.mul, ("mul", "multiply", "__mul__", "__rmul__")),
    "lt": (operator.lt, ("lt", "less", "__lt__")),
    "le": (operator.le, ("le", "less_equal", "__le__")),
    "gt": (operator.gt, ("gt", "greater", "__gt__")),
    "ge": (operator.ge, ("ge", "greater_equal", "__ge__")),
    "eq": (operator.eq, ("eq", "__eq__")),
    "ne": (operator.ne, ("ne", "not_equal", "__ne__")),
    "and": (operator.and_, ("logical_and", "bitwise_and", "__and__", "__rand__")),
    "or": (operator.or_, ("logical_or", "bitwise_or", "__or__", "__ror__")),
    "not": (operator.invert, ("logical_not", "bitwise_not", "__invert__")),
    "min": (_pair("min"), ("minimum", "min")),
    "max": (_pair("max"), ("maximum", "max")),
}
_METHODS = {name: op for op, names in _SPELLINGS.values() for name in names if not name.startswith("_")}
_TORCH: dict[Any, Callable] = {
    getattr(owner, name): op
    for op, names in _SPELLINGS.values()
    for name in names
    for owner in (torch, torch.Tensor)
    if hasattr(owner, name)
}


def _function_name(func: Any) -> str:
    name = getattr(func, "__name__", repr(func))
    return f"Tensor.{name}" if getattr(torch.Tensor, name, None) is func else f"torch.{name}"


def torch_call(func: Any, args: tuple, kwargs: dict | None) -> Any:
    """A torch function called on traced values: the grammar's operation, or a TraceError."""
    kwargs = dict(kwargs or {})
    shown_args = [*map(text_of, args), *(f"{k}={v!r}" for k, v in kwargs.items())]
    shown = f"{_function_name(func)}({', '.join(shown_args)})"
    if func is torch.Tensor.__getitem__:
        return _lookup(args[0], args[1])
    for value in args:
        if isinstance(value, Opaque):
            raise value.used(shown)
    op = _TORCH.get(func)
    if func in (torch.div, torch.Tensor.div, torch.divide, torch.Tensor.divide):
        if kwargs.pop("rounding_mode", None) == "floor":
            op = operator.floordiv
    reduction = func in (torch.min, torch.max, torch.Tensor.min, torch.Tensor.max) and len(args) != 2
    if op is None or kwargs or reduction:
        allowed = ", ".join(sorted({name for name in _METHODS if name.isidentifier()}))
        raise TraceError(
            f"{shown}: not traced; allowed torch functions and tensor methods (without keyword "
            f"arguments): {allowed}, div(rounding_mode='floor'), and indexing a 1-D integer tensor"
        )
    for value in args:
        if isinstance(value, torch.Tensor) and value.dim() != 0:
            raise TraceError(f"{shown}: {text_of(value)} is not a constant; " + _LOOKUP_HELP)
    return op(*(_constant(a) for a in args))


def _method(value: Int | Cond, name: str) -> Callable:
    """``x.abs()``, ``x.logical_and(y)``, ...: tensor methods on a traced value."""
    if name.startswith("_"):
        raise AttributeError(name)
    op = _METHODS.get(name)
    if op is None:
        allowed = ", ".join(sorted(_METHODS))
        raise TraceError(f"{value.text}.{name}: not a traced method; allowed: {allowed}")
    return lambda *args: op(value, *args)


def name_of(value: object) -> str | None:
    """The name the predicate's own code gives ``value``, for messages (Note [Lookup names])."""
    frame = sys._getframe(1)
    while frame is not None and _internal(frame.f_globals.get("__name__", "")):
        frame = frame.f_back
    if frame is None:
        return None
    for scope in (frame.f_locals, frame.f_globals):
        found = next((name for name, v in scope.items() if v is value), None)
        if found is not None:
            return found
    return None


def _internal(module: str) -> bool:
    # attncc's own tracers (this module, attncc.score_trace) and torch
    return module.startswith("attncc.") or module == "torch" or module.startswith("torch.")


# Note [Lookup names]: a lookup is shown as the predicate wrote it (``doc[q_idx]``), but
# torch hands over the tensor, not its name. The nearest frame outside this module and
# torch is the code that indexed it; the name that frame binds to the very tensor (a local,
# a closure variable, or a global) is the one the user wrote, else it shows as ``tensor``.


def _lookup(table: Any, index: Any) -> Int:
    """``table[index]`` with a traced index: a lookup into a 1-D integer tensor."""
    index = index[0] if isinstance(index, tuple) and len(index) == 1 else index
    name = name_of(table) or "tensor"
    shown = f"{name}[{', '.join(map(text_of, index)) if isinstance(index, tuple) else text_of(index)}]"
    opaque = next(
        (i for i in (index if isinstance(index, tuple) else (index,)) if isinstance(i, Opaque)), None
    )
    if opaque is not None:
        return opaque.lookup(table, index, shown)
    if not isinstance(index, Int):
        raise TraceError(f"{shown}: the index is not one traced integer; " + _LOOKUP_HELP)
    if not _is_integer_tensor(table) or table.dim() != 1:
        raise TraceError(f"{shown}: {name} is {text_of(table)}; " + _LOOKUP_HELP)
    _read(table, name)
    values = tuple(int(v) for v in table.tolist())
    return Int("lookup", (Table(values, name), index), shown)


class Opaque:
    """An argument a predicate may pass on but not use, such as FlexAttention's ``b`` (batch) or
    ``h`` (head) when attncc has no pattern for it: every operation on it raises
    :meth:`used`, a :class:`Used` error naming the sub-expression. ``new_zeros``/``new_ones``
    of shape ``()`` (what ``and_masks``/``or_masks`` start from) are the constant conditions."""

    device = None  # read by FlexAttention's noop_mask: b.new_ones((), device=b.device)

    def __init__(self, text: str, meaning: str) -> None:
        self.text, self.meaning = text, meaning

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise self.used(f"{self.text}.{name}")

    def used(self, where: str) -> Used:
        return Used(self, where)

    def lookup(self, table: Any, index: Any, shown: str) -> Int | Cond:
        """``table[index]``, ``index`` holding this value (``shown`` as written): a use, unless
        a subclass gives it a meaning (attncc.flex's batch index: Note [Per-batch masks])."""
        raise self.used(shown)

    def new_zeros(self, size: Any = (), **kwargs: Any) -> Cond:
        return self._filled(size, kwargs, False)

    def new_ones(self, size: Any = (), **kwargs: Any) -> Cond:
        return self._filled(size, kwargs, True)

    def _filled(self, size: Any, kwargs: dict, value: bool) -> Cond:
        call = f"{self.text}.new_{'ones' if value else 'zeros'}({size!r})"
        scalar = isinstance(size, (tuple, list)) and len(size) == 0
        if not scalar or kwargs.get("dtype", torch.bool) != torch.bool:
            raise TraceError(f"{call}: only a 0-d bool constant (as and_masks/or_masks build) is traced")
        return Cond("const", (value,), str(value))

    def __repr__(self) -> str:
        return self.text

    __torch_function__ = classmethod(_dispatch)


def _opaque_use(symbol: str) -> Callable:
    def use(self: Opaque, *others: Any) -> Any:
        raise self.used(" ".join([self.text, symbol, *map(text_of, others)]).strip())

    return use


for _name, _symbol in {
    "__add__": "+", "__radd__": "+", "__sub__": "-", "__rsub__": "-", "__mul__": "*", "__rmul__": "*",
    "__floordiv__": "//", "__rfloordiv__": "//", "__mod__": "%", "__rmod__": "%", "__neg__": "(negated)",
    "__abs__": "(abs)", "__lt__": "<", "__le__": "<=", "__gt__": ">", "__ge__": ">=", "__eq__": "==",
    "__ne__": "!=", "__and__": "&", "__rand__": "&", "__or__": "|", "__ror__": "|",
    "__invert__": "(inverted)", "__bool__": "(as a bool)", "__index__": "(as an int)",
    "__int__": "(as an int)", "__getitem__": "[...]",
}.items():  # fmt: skip
    setattr(Opaque, _name, _opaque_use(_symbol))
Opaque.__hash__ = object.__hash__  # type: ignore[method-assign]


class Used(TraceError):
    """A predicate used an :class:`Opaque` argument; ``opaque`` says which, ``where`` how."""

    def __init__(self, opaque: Opaque, where: str) -> None:
        super().__init__(f"{where}: uses {opaque.text} ({opaque.meaning})")
        self.opaque, self.where = opaque, where


class Coords:
    """``q`` or ``k``: one attribute per grid axis (also ``q[a]`` by number), and ``index`` for
    the flat row-major index."""

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

    def __getitem__(self, axis: Any) -> Int:
        """``q[a]``: the coordinate on grid axis ``a``, by number."""
        if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < len(self._names):
            allowed = f"an axis number 0..{len(self._names) - 1}"
            raise TraceError(f"{self._side}[{text_of(axis)}]: no such axis; allowed: {allowed}")
        return Int("var", (self._side, axis), f"{self._side}[{axis}]")

    def __repr__(self) -> str:
        return f"<traced {self._side}: {', '.join([*self._names, 'index'])}>"


def call(fn: Callable, args: tuple) -> Any:
    """``fn(*args)`` on traced values, with ``min``/``max`` traced (Note [Traced min and max]).

    Python errors raised while tracing (a construct the tracer does not model) become a
    :class:`TraceError` naming ``fn``.
    """
    name = getattr(fn, "__name__", type(fn).__name__)
    runnable = fn
    if isinstance(fn, types.FunctionType):
        env = dict(fn.__globals__)
        for builtin, traced in (("min", minimum), ("max", maximum)):
            env.setdefault(builtin, traced)  # Note [Traced min and max]
        runnable = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
        runnable.__kwdefaults__ = fn.__kwdefaults__
    try:
        return _constant(runnable(*args))
    except AttnccError:
        raise
    except Exception as e:  # any other error of the traced function's own code, named
        raise TraceError(f"{name} raised {type(e).__name__} while tracing: {e}") from e


def run(fn: Callable, args: tuple, what: str) -> Cond | bool:
    """Run ``fn(*args)`` on traced values and return the condition it built (:func:`call`);
    ``what`` says what ``fn`` may return, for the refusal."""
    result = call(fn, args)
    if isinstance(result, (Cond, bool)):
        return result
    name = getattr(fn, "__name__", type(fn).__name__)
    raise TraceError(f"{name} returned {text_of(result)}; allowed: {what}")


def trace(fn: Callable, names: tuple[str, ...]) -> Cond | bool:
    """Run ``fn(q, k)`` on traced coordinates named ``names``; return what it returned."""
    what = "a comparison of coordinates, or comparisons joined with &, |, ~"
    return run(fn, (Coords("q", names), Coords("k", names)), what)

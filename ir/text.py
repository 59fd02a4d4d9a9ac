"""The text form of a pattern: ``format_pattern`` and ``parse``.

The text is a tiny expression language with Python's syntax and precedence
(``&`` binds tighter than ``|``), read with :mod:`ast` so that no user text is
ever executed. ``parse(format_pattern(p)) == p`` for every pattern.

Note [Wide combinators]: ``a | b | c`` is a left-nested chain in Python's
syntax tree, one level per operand, and Python's parser (and any recursive
walk of the tree) runs out of stack on chains of a few thousand. A union or
intersection of more than :data:`MAX_INFIX` operands is therefore written as
one call, ``union(a, b, ...)``, which the parser reads flat however wide it
is; narrower ones keep the infix form people write. The builder reads infix
chains with a loop, not one call per operand. Depth is bounded where nodes
are built (Note [Nesting limit] in attncc.ir.nodes).

A pattern per pair of segments (Note [Segment spaces] in attncc.ir.segments) is written as it is
built, ``by_segments(segments(text=226, video=(16, 48, 48)), {('text', '*'): dense(), ...})``:
its space a ``segments`` call of names and shapes, its pairs a dict literal whose keys are pairs
of quoted segment names; this is the one place where the text holds strings.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

from attncc.errors import ParseError
from attncc.ir.nodes import (
    PRIMITIVES,
    Intersection,
    Pattern,
    PerHead,
    Union,
    intersection,
    per_head,
    union,
)
from attncc.ir.segments import BySegments, Segments

_COMBINATOR_CALLS = {"union": union, "intersection": intersection}
MAX_INFIX = 16  # Note [Wide combinators]
_SHOWN = 80  # characters of a bad sub-expression quoted in an error


def _format_value(value: Any) -> str:
    if isinstance(value, Pattern):
        return format_pattern(value)
    if isinstance(value, tuple):
        inner = ", ".join(_format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def _wide(p: Pattern) -> bool:
    """Written as one call rather than infix (Note [Wide combinators])."""
    return isinstance(p, (Union, Intersection)) and len(p.operands) > MAX_INFIX


def format_pattern(p: Pattern) -> str:
    """Render ``p`` in the text form, omitting parameters left at their default."""
    if _wide(p):
        return f"{p.NAME}({', '.join(format_pattern(op) for op in p.operands)})"  # type: ignore[attr-defined]
    if isinstance(p, Union):
        return " | ".join(format_pattern(op) for op in p.operands)
    if isinstance(p, Intersection):
        return " & ".join(
            f"({format_pattern(op)})" if isinstance(op, Union) and not _wide(op) else format_pattern(op)
            for op in p.operands
        )
    if isinstance(p, PerHead):
        return f"per_head([{', '.join(format_pattern(op) for op in p.patterns)}])"
    if isinstance(p, BySegments):
        pairs = ", ".join(f"({q!r}, {k!r}): {format_pattern(op)}" for (q, k), op in p.pairs)
        return f"by_segments({p.space}, {{{pairs}}})"
    args = []
    for f in dataclasses.fields(p):  # type: ignore[arg-type]
        value = getattr(p, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        args.append(f"{f.name}={_format_value(value)}")
    return f"{p.NAME}({', '.join(args)})"


def parse(text: str) -> Pattern:
    """Parse the text form, e.g. ``neighborhood(window=(7, 7), dilation=(2, 1)) & causal()``."""
    if not isinstance(text, str) or not text.strip():
        raise ParseError(f"pattern text = {text!r} is empty; allowed: an expression such as 'causal()'")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ParseError(f"pattern text {text!r}: {e.msg} at column {e.offset}") from None
    return _Builder(text).pattern(tree.body)


class _Builder:
    def __init__(self, text: str) -> None:
        self.text = text

    def fail(self, node: ast.AST, what: str, allowed: str) -> ParseError:
        col = getattr(node, "col_offset", 0) + 1
        text = self.text if len(self.text) <= 4 * _SHOWN else self.text[: 4 * _SHOWN - 3] + "..."
        return ParseError(f"pattern text {text!r}: {what} at column {col}; allowed: {allowed}")

    def source(self, node: ast.AST) -> str:
        """The text of ``node`` as the user wrote it, cut to a readable length."""
        text = ast.get_source_segment(self.text.strip(), node) or ""
        return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."

    def pattern(self, node: ast.AST) -> Pattern:
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.BitAnd)):
            return self.chain(node)
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            raise self.fail(node, f"unexpected {self.source(node)!r}", "primitive calls joined by | and &")
        name = node.func.id
        if name in _COMBINATOR_CALLS:
            if node.keywords or not node.args:
                raise self.fail(node, f"{name}() takes patterns as positional arguments", "union(a, b, ...)")
            return _COMBINATOR_CALLS[name](*(self.pattern(a) for a in node.args))
        if name == "per_head":
            return self.per_head(node)
        if name == "by_segments":
            return self.by_segments(node)
        if name not in PRIMITIVES:
            known = ", ".join(sorted([*PRIMITIVES, "per_head", "by_segments", *_COMBINATOR_CALLS]))
            raise self.fail(node, f"unknown primitive {name!r}", known)
        return self.primitive(node, PRIMITIVES[name])

    def chain(self, node: ast.BinOp) -> Pattern:
        """``a | b | c`` (or with ``&``): the left-nested chain of one operator, read with a loop
        (Note [Wide combinators])."""
        op = type(node.op)
        operands: list[ast.AST] = []
        while isinstance(node, ast.BinOp) and isinstance(node.op, op):
            operands.append(node.right)
            node = node.left
        operands.append(node)
        built = [self.pattern(o) for o in reversed(operands)]
        return union(*built) if op is ast.BitOr else intersection(*built)

    def per_head(self, node: ast.Call) -> Pattern:
        values = list(node.args) + [kw.value for kw in node.keywords if kw.arg == "patterns"]
        bad = [kw.arg for kw in node.keywords if kw.arg != "patterns"]
        if bad or len(values) != 1 or not isinstance(values[0], (ast.List, ast.Tuple)):
            raise self.fail(node, "per_head takes one list of patterns", "per_head([p0, p1, ...])")
        return per_head([self.pattern(e) for e in values[0].elts])

    def by_segments(self, node: ast.Call) -> Pattern:
        """``by_segments(segments(name=shape, ...), {('q', 'k'): pattern, ...})``."""
        form = "by_segments(segments(name=shape, ...), {('q', 'k'): pattern, ...})"
        if node.keywords or len(node.args) != 2:
            raise self.fail(node, "by_segments takes a space and a dict of pairs", form)
        space, pairs = node.args
        if not (
            isinstance(space, ast.Call) and isinstance(space.func, ast.Name) and space.func.id == "segments"
        ):
            raise self.fail(space, f"unexpected space {self.source(space)!r}", form)
        if space.args or any(kw.arg is None for kw in space.keywords):
            raise self.fail(
                space, "segments takes name=shape arguments", "segments(text=226, video=(16, 48, 48))"
            )
        names = tuple(kw.arg for kw in space.keywords)
        shapes = tuple(self.literal(kw.value) for kw in space.keywords)
        built = Segments(names, tuple(s if isinstance(s, tuple) else (s,) for s in shapes))
        if not isinstance(pairs, ast.Dict) or not pairs.keys:
            raise self.fail(pairs, f"unexpected pairs {self.source(pairs)!r}", form)
        entries = []
        for key, value in zip(pairs.keys, pairs.values):
            if not (
                isinstance(key, ast.Tuple)
                and len(key.elts) == 2
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in key.elts)
            ):
                shown = self.source(key) if key is not None else "**"
                raise self.fail(key or pairs, f"unexpected pair {shown!r}", "('q segment', 'k segment')")
            entries.append(((key.elts[0].value, key.elts[1].value), self.pattern(value)))
        return BySegments(built, tuple(entries))

    def primitive(self, node: ast.Call, cls: type[Pattern]) -> Pattern:
        fields = [f for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        names = [f.name for f in fields]
        if len(node.args) > len(names):
            raise self.fail(
                node, f"{cls.NAME}() got {len(node.args)} positional arguments", f"at most {len(names)}"
            )
        kwargs = {name: self.literal(arg) for name, arg in zip(names, node.args)}
        for kw in node.keywords:
            if kw.arg not in names:
                raise self.fail(kw, f"unknown argument {cls.NAME}.{kw.arg}", ", ".join(names) or "none")
            if kw.arg in kwargs:
                raise self.fail(kw, f"{cls.NAME}.{kw.arg} given twice", "each argument once")
            kwargs[kw.arg] = self.literal(kw.value)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in kwargs]
        if missing:
            raise self.fail(
                node, f"{cls.NAME}() is missing {', '.join(missing)}", f"{cls.NAME}({', '.join(names)})"
            )
        return cls(**kwargs)

    def literal(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (int, bool))):
            return node.value  # None: an open band bound
        if isinstance(node, ast.Name) and node.id in ("true", "false", "none", "None"):
            return {"true": True, "false": False}.get(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = self.literal(node.operand)
            if isinstance(inner, int) and not isinstance(inner, bool):
                return -inner
        if isinstance(node, (ast.Tuple, ast.List)):
            return tuple(self.literal(e) for e in node.elts)
        raise self.fail(
            node,
            f"unexpected value {self.source(node)!r}",
            "integers, true/false, None, tuples or lists of them",
        )

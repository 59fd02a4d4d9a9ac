"""The text form of a pattern: ``format_pattern`` and ``parse``.

The text is a tiny expression language with Python's syntax and precedence
(``&`` binds tighter than ``|``), read with :mod:`ast` so that no user text is
ever executed. ``parse(format_pattern(p)) == p`` for every pattern.
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

_COMBINATOR_CALLS = {"union": union, "intersection": intersection}


def _format_value(value: Any) -> str:
    if isinstance(value, Pattern):
        return format_pattern(value)
    if isinstance(value, tuple):
        inner = ", ".join(_format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def format_pattern(p: Pattern) -> str:
    """Render ``p`` in the text form, omitting parameters left at their default."""
    if isinstance(p, Union):
        return " | ".join(format_pattern(op) for op in p.operands)
    if isinstance(p, Intersection):
        return " & ".join(
            f"({format_pattern(op)})" if isinstance(op, Union) else format_pattern(op) for op in p.operands
        )
    if isinstance(p, PerHead):
        return f"per_head([{', '.join(format_pattern(op) for op in p.patterns)}])"
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
        return ParseError(f"pattern text {self.text!r}: {what} at column {col}; allowed: {allowed}")

    def pattern(self, node: ast.AST) -> Pattern:
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.BitAnd)):
            left, right = self.pattern(node.left), self.pattern(node.right)
            return union(left, right) if isinstance(node.op, ast.BitOr) else intersection(left, right)
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            raise self.fail(node, f"unexpected {ast.unparse(node)!r}", "primitive calls joined by | and &")
        name = node.func.id
        if name in _COMBINATOR_CALLS:
            if node.keywords or not node.args:
                raise self.fail(node, f"{name}() takes patterns as positional arguments", "union(a, b, ...)")
            return _COMBINATOR_CALLS[name](*(self.pattern(a) for a in node.args))
        if name == "per_head":
            return self.per_head(node)
        if name not in PRIMITIVES:
            known = ", ".join(sorted([*PRIMITIVES, "per_head", *_COMBINATOR_CALLS]))
            raise self.fail(node, f"unknown primitive {name!r}", known)
        return self.primitive(node, PRIMITIVES[name])

    def per_head(self, node: ast.Call) -> Pattern:
        values = list(node.args) + [kw.value for kw in node.keywords if kw.arg == "patterns"]
        bad = [kw.arg for kw in node.keywords if kw.arg != "patterns"]
        if bad or len(values) != 1 or not isinstance(values[0], (ast.List, ast.Tuple)):
            raise self.fail(node, "per_head takes one list of patterns", "per_head([p0, p1, ...])")
        return per_head([self.pattern(e) for e in values[0].elts])

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
            f"unexpected value {ast.unparse(node)!r}",
            "integers, true/false, None, tuples or lists of them",
        )

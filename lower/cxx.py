"""Respell a plan's integer index forms and element rules in C++ for the CUTLASS templates.

Lowering prints each closed form once, in the Triton dialect the kernels and
the host-side visit count (:mod:`attncc.lower.visits`) both evaluate:
``+ - *``, ``//`` and ``%`` on integers, ``tl.minimum``/``tl.maximum``, the
names ``i`` and ``Lg`` and integer literals. Triton's integer ``//`` and
``%`` truncate toward zero, exactly as C++'s ``/`` and ``%`` do, so the
respelled form computes the same values; anything outside that grammar is
refused rather than guessed. A table plan's rule (``KernelPlan.mask_expr``)
adds comparisons, ``&``/``|``/``~`` on them, the token names ``qf``, ``kf``,
``qc0..2``, ``kc0..2`` and loads ``tl.load(TABLES + ...)``, which become
reads of the plan's baked-in ``RULE_TABLE``.
"""

from __future__ import annotations

import ast

_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "/", ast.Mod: "%"}
_CALLS = {"minimum": "imin", "maximum": "imax"}  # defined by templates/cutlass/_plan.cuh.j2
_COMPARE = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_LOGIC = {ast.BitAnd: "&&", ast.BitOr: "||"}  # the rule's & and | join booleans
_FORM_NAMES = ("i", "Lg")
_RULE_NAMES = ("qf", "kf", "qc0", "qc1", "qc2", "kc0", "kc1", "kc2")


def to_cxx(expr: str, names: dict[str, str] | None = None) -> str:
    """The C++ spelling of a Triton-dialect integer form; ``names`` renames variables."""
    return _Speller(expr, _FORM_NAMES, names or {}, rule=False).spell_all()


def rule_to_cxx(expr: str) -> str:
    """The C++ spelling of a table plan's element rule (a bool of the token names)."""
    return _Speller(expr, _RULE_NAMES, {}, rule=True).spell_all()


class _Speller:
    """Spells one expression; ``rule`` admits the rule's booleans, token names and table loads."""

    def __init__(self, expr: str, allowed: tuple[str, ...], names: dict[str, str], rule: bool) -> None:
        self.expr, self.allowed, self.names, self.rule = expr, allowed, names, rule

    def spell_all(self) -> str:
        return self.spell(ast.parse(self.expr, mode="eval").body)

    def spell(self, node: ast.AST) -> str:
        spell = self.spell
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return f"({spell(node.left)} {_BINARY[type(node.op)]} {spell(node.right)})"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return f"(-{spell(node.operand)})"
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return str(node.value)
        if isinstance(node, ast.Name) and node.id in self.allowed:
            return self.names.get(node.id, node.id)
        if isinstance(node, ast.Call) and _tl(node) in _CALLS and len(node.args) == 2:
            return f"{_CALLS[_tl(node)]}({spell(node.args[0])}, {spell(node.args[1])})"
        if self.rule:
            if isinstance(node, ast.Call) and _tl(node) == "load" and len(node.args) == 1:
                index = _table_index(node.args[0])
                if index:
                    return "RULE_TABLE[" + " + ".join(spell(t) for t in index) + "]"
            if isinstance(node, ast.BinOp) and type(node.op) in _LOGIC:
                return f"({spell(node.left)} {_LOGIC[type(node.op)]} {spell(node.right)})"
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
                return f"(!{spell(node.operand)})"
            if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
                return f"({spell(node.left)} {_COMPARE[type(node.ops[0])]} {spell(node.comparators[0])})"
        raise ValueError(f"cannot spell {ast.unparse(node)!r} of the form {self.expr!r} in C++")


def _tl(node: ast.Call) -> str | None:
    """``name`` of a call ``tl.name(...)`` with no keywords, else None."""
    f = node.func
    is_tl = isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "tl"
    return f.attr if is_tl and not node.keywords else None  # type: ignore[union-attr]


def _table_index(arg: ast.AST) -> list[ast.AST]:
    """The summands after ``TABLES`` in a load's address ``TABLES + a + b``; empty if it is not one."""
    terms: list[ast.AST] = []
    while isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Add):
        terms.append(arg.right)
        arg = arg.left
    return terms[::-1] if isinstance(arg, ast.Name) and arg.id == "TABLES" else []

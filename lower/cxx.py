"""Respell a plan's integer index forms in C++ for the CUTLASS templates.

Lowering prints each closed form once, in the Triton dialect the kernels and
the host-side visit count (:mod:`attncc.lower.visits`) both evaluate:
``+ - *``, ``//`` and ``%`` on integers, ``tl.minimum``/``tl.maximum``, the
names ``i`` and ``Lg`` and integer literals. Triton's integer ``//`` and
``%`` truncate toward zero, exactly as C++'s ``/`` and ``%`` do, so the
respelled form computes the same values; anything outside that grammar is
refused rather than guessed.
"""

from __future__ import annotations

import ast

_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "/", ast.Mod: "%"}
_CALLS = {"minimum": "imin", "maximum": "imax"}  # defined by templates/cutlass/_plan.cuh.j2


def to_cxx(expr: str, names: dict[str, str] | None = None) -> str:
    """The C++ spelling of a Triton-dialect integer form; ``names`` renames variables."""
    names = names or {}

    def spell(node: ast.AST) -> str:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return f"({spell(node.left)} {_BINARY[type(node.op)]} {spell(node.right)})"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return f"(-{spell(node.operand)})"
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return str(node.value)
        if isinstance(node, ast.Name) and node.id in ("i", "Lg"):
            return names.get(node.id, node.id)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "tl"
            and node.func.attr in _CALLS
            and len(node.args) == 2
            and not node.keywords
        ):
            return f"{_CALLS[node.func.attr]}({spell(node.args[0])}, {spell(node.args[1])})"
        raise ValueError(f"cannot spell {ast.unparse(node)!r} of the form {expr!r} in C++")

    return spell(ast.parse(expr, mode="eval").body)

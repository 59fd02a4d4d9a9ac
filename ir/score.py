"""Scores: what a kernel computes from ``q . k`` before it weighs ``v``.

A :class:`Score` is a normaliser (``softmax``, the default, or ``sigmoid``) and optional
terms applied to the scaled score ``s = scale * q . k`` of every kept pair::

    from attncc.ir import alibi, softcap
    score = softcap(50.0) + alibi((0.5, 0.25))   # two heads
    score.text                                    # 'softcap(50.0) + alibi(0.5, 0.25)'

Note [Score terms]: the terms apply in a fixed order, whatever order they were composed in:
``s -> c * tanh(s / c)`` (softcap), then ``- slope[h] * |q - k|`` (alibi, on the flat token
index of a 1-D grid), then the normaliser (for sigmoid, with its bias). The cap takes the
*scaled* score, as Gemma-2 (``attn_logit_softcapping``) and FlexAttention's soft-capping
``score_mod`` (whose ``score`` is already scaled) do, so ``c`` reads in logit units whatever
the head dim. The bias is added after the cap, so the cap bounds the content part of the
logit only and distance keeps penalising far keys (a capped bias would flatten them all to
``-c``). The backward multiplies the score gradient by ``1 - tanh(s / c)^2``; the slopes are
constants (part of the kernel's key), with no gradient.

The text form (``Score.text``, read back by :func:`parse_score`) is what travels through the
torch.library ops, the tuning records and spec files: ``softmax`` and ``sigmoid`` for the
plain scores (as before there were terms), else its terms joined by `` + ``, led by
``sigmoid`` when that is the normaliser.
"""

from __future__ import annotations

import ast
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from attncc.errors import AttnccError, ParseError, PatternError, field_error, form_error
from attncc.ir.grid import Grid
from attncc.memo import memo

KINDS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class Score:
    """A normaliser and its terms (Note [Score terms]). ``softcap``: the cap ``c`` (a finite
    number > 0) or None; ``alibi``: one slope per query head (finite numbers) or None."""

    kind: str = "softmax"
    softcap: float | None = None
    alibi: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise field_error(PatternError, "score", self.kind, ", ".join(KINDS))
        if self.softcap is not None:
            c = _real("softcap", self.softcap)
            if not (math.isfinite(c) and c > 0):
                raise field_error(PatternError, "softcap", self.softcap, "a finite number > 0")
            object.__setattr__(self, "softcap", c)
        if self.alibi is not None:
            if isinstance(self.alibi, (str, bytes)) or not isinstance(self.alibi, Sequence) or not self.alibi:
                allowed = "a non-empty sequence of numbers, one per head"
                raise form_error(PatternError, "alibi slopes", self.alibi, allowed)
            slopes = tuple(_real("alibi slope", s) for s in self.alibi)
            bad = next((s for s in slopes if not math.isfinite(s)), None)
            if bad is not None:
                raise field_error(PatternError, "alibi slope", bad, "a finite number")
            object.__setattr__(self, "alibi", slopes)

    @property
    def plain(self) -> bool:
        """Whether the score has no terms (the kernels of before there were any)."""
        return self.softcap is None and self.alibi is None

    @property
    def text(self) -> str:
        """The text form, which :func:`parse_score` reads back to an equal score."""
        terms = [f"softcap({self.softcap!r})"] if self.softcap is not None else []
        if self.alibi is not None:
            terms.append(f"alibi({', '.join(map(repr, self.alibi))})")
        if not terms or self.kind == "sigmoid":
            terms.insert(0, self.kind)
        return " + ".join(terms)

    def __add__(self, other: Score) -> Score:
        """Compose two scores: their terms, each given at most once; sigmoid if either is
        (softmax is the default normaliser, so ``sigmoid() + softcap(c)`` is sigmoid)."""
        if not isinstance(other, Score):
            return NotImplemented
        for name in ("softcap", "alibi"):
            if getattr(self, name) is not None and getattr(other, name) is not None:
                twice = f"{self.text!r} + {other.text!r}"
                raise PatternError(f"score term {name} is given twice ({twice}); give it once")
        return Score(
            "sigmoid" if "sigmoid" in (self.kind, other.kind) else "softmax",
            self.softcap if self.softcap is not None else other.softcap,
            self.alibi if self.alibi is not None else other.alibi,
        )

    def check(self, grid: Grid, heads: int | None = None) -> None:
        """Refuse terms that do not fit the grid or (when given) the number of query heads."""
        if self.alibi is None:
            return
        if grid.rank != 1:
            raise field_error(
                PatternError, "alibi grid", grid.shape, "a 1-D grid",
                "alibi is on the flat index of a sequence; per-axis distance is not implemented",
            )  # fmt: skip
        if heads is not None and len(self.alibi) != heads:
            raise field_error(PatternError, "alibi slopes", self.alibi, f"{heads} slopes, one per query head")


def checked(score: object, grid: Grid, heads: int, return_lse: bool) -> Score:
    """The score of an attention call (a :class:`Score` or its text), checked against the
    call: its grid, its query heads, and ``return_lse`` (sigmoid has no log-sum-exp)."""
    found = as_score(score)
    found.check(grid, heads)
    if found.kind == "sigmoid" and return_lse:
        raise field_error(AttnccError, "return_lse", True, "False with score='sigmoid' (no normaliser)")
    return found


def softcap(c: float) -> Score:
    """Soft-capping ``s -> c * tanh(s / c)`` of the scaled score (Gemma-2; Note [Score terms])."""
    return Score(softcap=c)


def alibi(slopes: Sequence[float]) -> Score:
    """ALiBi: add ``-slopes[h] * |q - k|`` to the scores of query head ``h`` (1-D grids)."""
    return Score(alibi=slopes)


def sigmoid() -> Score:
    """Sigmoid attention (FlashSigmoid), to compose with terms: ``sigmoid() + alibi(...)``."""
    return Score(kind="sigmoid")


def as_score(value: object) -> Score:
    """A score from a :class:`Score` or its text form (``"softmax"``, ``"sigmoid"``, ...)."""
    if isinstance(value, Score):
        return value
    if isinstance(value, str):
        return parse_score(value)
    raise form_error(PatternError, "score", value, "a Score (attncc.ir.softcap, alibi, sigmoid) or its text")


@memo
def parse_score(text: str) -> Score:
    """Read the text form, e.g. ``'softcap(30.0) + alibi(0.5, 0.25)'`` or ``'sigmoid'``."""
    allowed = "softmax, sigmoid, softcap(c), alibi(slope, ...), joined by +"
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise field_error(ParseError, "score", text, allowed) from None
    parts: list[ast.expr] = []
    while isinstance(tree, ast.BinOp) and isinstance(tree.op, ast.Add):
        parts.insert(0, tree.right)
        tree = tree.left
    parts.insert(0, tree)
    score = Score()
    for part in parts:
        if isinstance(part, ast.Name) and part.id in KINDS:
            score = score + Score(kind=part.id)
            continue
        if not (isinstance(part, ast.Call) and isinstance(part.func, ast.Name) and not part.keywords):
            raise field_error(ParseError, "score", text, allowed, f"cannot read {ast.unparse(part)!r}")
        args = tuple(_number(a, text, allowed) for a in part.args)
        if part.func.id == "softcap" and len(args) == 1:
            score = score + softcap(args[0])
        elif part.func.id == "alibi" and args:
            score = score + alibi(args)
        else:
            raise field_error(ParseError, "score", text, allowed, f"cannot read {ast.unparse(part)!r}")
    return score


def _number(node: ast.expr, text: str, allowed: str) -> float:
    sign = 1.0
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign, node = (-1.0 if isinstance(node.op, ast.USub) else 1.0), node.operand
    value = node.value if isinstance(node, ast.Constant) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return sign * float(value)
    raise field_error(ParseError, "score", text, allowed, f"{ast.unparse(node)!r} is not a number")


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise form_error(PatternError, name, value, "a real number (a float or an int)")
    return float(value)

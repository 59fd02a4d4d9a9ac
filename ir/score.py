"""Scores: what a kernel computes from ``q . k`` before it weighs ``v``.

A :class:`Score` is a normaliser (``softmax``, the default, or ``sigmoid``) and optional
terms applied to the scaled score ``s = scale * q . k`` of every kept pair::

    from attncc.ir import alibi, rel_pos_bias, softcap
    score = softcap(50.0) + alibi((0.5, 0.25))   # two heads
    score.text                                    # 'softcap(50.0) + alibi(0.5, 0.25)'
    score = rel_pos_bias(table) + key_bias(kb)    # learned tensors, with gradients

Note [Score terms]: the terms apply in a fixed order, whatever order they were composed in::

    s = scale * q.k
    s = s * temperature[h]                                     temperature
    s = c * tanh(s / c)                                        softcap
    s = s - slope[h] * |q - k|                                 alibi, distance 'flat'
          + slope[h] * (k - q)                                        distance 'signed'
          - sum_a slope[h, a] * |q_a - k_a|                           distance 'axes'
    s = s + table[h, (k_0 - q_0) / d_0 + r_0, ...]             rel_pos_bias
    s = s + query_bias[b, h, q] + key_bias[b, h, k] + bias[b, h, q, k]
    then the normaliser (softmax; or sigmoid, with its bias)

The cap takes the *scaled* (and tempered) score, as Gemma-2 (``attn_logit_softcapping``) and
FlexAttention's soft-capping ``score_mod`` (whose ``score`` is already scaled) do, so ``c``
reads in logit units whatever the head dim. The biases are added after the cap, so the cap
bounds the content part of the logit only and distance keeps penalising far keys (a capped
bias would flatten them all to ``-c``). ``q``/``k`` in alibi's 'flat' and 'signed'
distances are flat token indices; 'axes' takes grid coordinates (on a 1-D grid it is
'flat'). The relative position table has ``2 r_a + 1`` entries on axis ``a`` (NATTEN's and
Swin's ``[heads, 2w - 1, ...]`` for a window ``w``: ``r = w - 1``) and is indexed by the
offset of the key from the query in units of the plan's dilation (NATTEN's ``rpb`` under
dilation); an offset past the table's reach takes its edge entry (as T5's bucketed bias
does), so no kept pair reads outside it. The three biases take the SDPA layout's flat
positions: ``query_bias`` ``[B or 1, H or 1, N]``, ``key_bias`` the same, ``bias``
``[B or 1, H or 1, N, N]`` (a dense tensor: for small cases).

Values. ``softcap`` is a constant of the kernel. Every other term's data (``temperature``
``[H]``, ``alibi`` slopes ``[H]`` or ``[H, rank]``, the table and the biases) is a tensor
the kernel reads at run time, so new values (a training step) never recompile; alibi
slopes may also be given as numbers (a spec file's ``alibi(0.5, 0.25)``). A term may be
declared without data (``rel_pos_bias(13, 13)``, ``key_bias``: a spec file's score for
``attncc compile``, whose package takes the tensors as arguments). Gradients flow to every
term tensor that requires grad (Note [Term gradients] in attncc.runtime.terms).

Text. :attr:`Score.text` is read back by :func:`parse_score`: ``softmax`` and ``sigmoid`` for
the plain scores, else the terms joined by `` + ``, led by ``sigmoid`` when that is the
normaliser. :attr:`Score.form` is the score as a kernel sees it: no values, and the
call's ``grad=True`` marks and ``dropout`` (attncc.runtime.library); its text travels through
the torch.library ops and keys the kernels and tuning records.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attncc.errors import AttnccError, ParseError, PatternError, field_error, form_error
from attncc.ir.grid import Grid
from attncc.ir.nodes import Neighborhood, Pattern
from attncc.ir.validate import neighborhood_axes
from attncc.memo import memo

KINDS = ("softmax", "sigmoid")
DISTANCES = ("flat", "signed", "axes")
# The terms whose data the kernel reads at run time, in the order the ops take their tensors.
INPUTS = ("temperature", "alibi", "rel_pos_bias", "query_bias", "key_bias", "bias")
_FLAGS = ("temperature", "query_bias", "key_bias", "bias")  # terms that are only there or not
MAX_TABLE = 4096  # Note [Table gradient] in attncc.lower.plan: entries of a relative position table


@dataclass(frozen=True, eq=False)
class Score:
    """A normaliser and its terms (Note [Score terms]).

    Structure: ``softcap`` the cap (a finite number > 0) or None; ``alibi`` the distance
    ('flat', 'signed', 'axes') or None; ``rel_pos_bias`` the table's size per grid axis (odd
    numbers) or None; ``temperature``/``query_bias``/``key_bias``/``bias`` whether the term is
    there. ``values``: the data of the tensor terms, by name (a term without an entry is
    declared only). ``grads`` and ``dropout`` belong to a kernel's form (:attr:`form`).
    """

    kind: str = "softmax"
    softcap: float | None = None
    temperature: bool = False
    alibi: str | None = None
    rel_pos_bias: tuple[int, ...] | None = None
    query_bias: bool = False
    key_bias: bool = False
    bias: bool = False
    values: tuple[tuple[str, object], ...] = ()
    grads: tuple[str, ...] = ()
    dropout: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise field_error(PatternError, "score", self.kind, ", ".join(KINDS))
        if self.softcap is not None:
            c = _real("softcap", self.softcap)
            if not (math.isfinite(c) and c > 0):
                raise field_error(PatternError, "softcap", self.softcap, "a finite number > 0")
            object.__setattr__(self, "softcap", c)
        if self.alibi is not None and self.alibi not in DISTANCES:
            raise field_error(PatternError, "alibi distance", self.alibi, ", ".join(map(repr, DISTANCES)))
        if self.rel_pos_bias is not None:
            sizes = self.rel_pos_bias
            if not isinstance(sizes, tuple) or not 1 <= len(sizes) <= 3:
                raise form_error(
                    PatternError, "rel_pos_bias sizes", sizes, "1 to 3 odd sizes, one per grid axis"
                )
            for s in sizes:
                if isinstance(s, bool) or not isinstance(s, int) or s < 1 or s % 2 == 0:
                    raise field_error(PatternError, "rel_pos_bias size", s, "an odd int >= 1 (2 r + 1)")
            if math.prod(sizes) > MAX_TABLE:
                why = "its gradient is reduced in registers (Note [Table gradient])"
                raise field_error(
                    PatternError, "rel_pos_bias entries", math.prod(sizes), f"1..{MAX_TABLE}", why
                )
        for name in self.grads:
            if name not in INPUTS or not self.has(name):
                raise field_error(PatternError, "grad", name, "the score's tensor terms")

    def has(self, name: str) -> bool:
        """Whether the term ``name`` (one of :data:`INPUTS`) is in the score."""
        return getattr(self, name) not in (None, False)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The tensor terms of the score, in the order the ops take them."""
        return tuple(name for name in INPUTS if self.has(name))

    def value(self, name: str) -> object:
        """The data given for term ``name`` (a tensor, or alibi's numbers), or None."""
        return dict(self.values).get(name)

    @property
    def plain(self) -> bool:
        """Whether the score has no terms (the kernels of before there were any)."""
        return self.softcap is None and not self.inputs and not self.dropout

    @property
    def form(self) -> Score:
        """The score without its values: what a kernel is specialised to."""
        return dataclasses.replace(self, values=())

    @property
    def text(self) -> str:
        """The text form, which :func:`parse_score` reads back to an equal score."""
        terms = [f"softcap({self.softcap!r})"] if self.softcap is not None else []
        for name in INPUTS:
            if self.has(name):
                terms.append(self._term_text(name))
        if self.dropout:
            terms.append("dropout")
        if not terms or self.kind == "sigmoid":
            terms.insert(0, self.kind)
        return " + ".join(terms)

    def _term_text(self, name: str) -> str:
        args: list[str] = []
        if name == "alibi":
            slopes = self.value("alibi")
            if isinstance(slopes, tuple):
                args.extend(map(repr, slopes))
            if self.alibi != "flat":
                args.append(f"distance={self.alibi!r}")
        if name == "rel_pos_bias":
            args.extend(map(str, self.rel_pos_bias or ()))
        if name in self.grads:
            args.append("grad=True")
        return f"{name}({', '.join(args)})" if args else name

    def _key(self) -> tuple:
        # Numbers compare by value; a tensor is the same term only as the same object.
        values = tuple(
            (n, v if isinstance(v, tuple) else id(v)) for n, v in sorted(self.values, key=lambda x: x[0])
        )
        fields = (self.kind, self.softcap, self.temperature, self.alibi, self.rel_pos_bias)
        return (
            *fields,
            self.query_bias,
            self.key_bias,
            self.bias,
            values,
            tuple(sorted(self.grads)),
            self.dropout,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Score) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Score({self.text!r})"

    def __add__(self, other: Score) -> Score:
        """Compose two scores: their terms, each given at most once; sigmoid if either is
        (softmax is the default normaliser, so ``sigmoid() + softcap(c)`` is sigmoid)."""
        if not isinstance(other, Score):
            return NotImplemented
        for name in ("softcap", *INPUTS):
            if getattr(self, name) not in (None, False) and getattr(other, name) not in (None, False):
                twice = f"{self.text!r} + {other.text!r}"
                raise PatternError(f"score term {name} is given twice ({twice}); give it once")
        merged = {}
        for name in ("softcap", "temperature", "alibi", "rel_pos_bias", "query_bias", "key_bias", "bias"):
            mine = getattr(self, name)
            merged[name] = mine if mine not in (None, False) else getattr(other, name)
        return Score(
            "sigmoid" if "sigmoid" in (self.kind, other.kind) else "softmax",
            values=self.values + other.values,
            grads=self.grads + other.grads,
            dropout=self.dropout or other.dropout,
            **merged,
        )

    def check(self, grid: Grid, heads: int | None = None) -> None:
        """Refuse terms that do not fit the grid or (when given) the number of query heads."""
        if self.rel_pos_bias is not None and len(self.rel_pos_bias) != grid.rank:
            allowed = f"{grid.rank} odd sizes, one per axis of the grid {grid.shape}"
            raise field_error(PatternError, "rel_pos_bias sizes", self.rel_pos_bias, allowed)
        slopes = self.value("alibi")
        if isinstance(slopes, tuple) and heads is not None and len(slopes) != heads:
            raise field_error(PatternError, "alibi slopes", slopes, f"{heads} slopes, one per query head")


def table_units(pattern: Pattern, grid: Grid) -> tuple[int, ...]:
    """Per grid axis, the unit a relative position table counts offsets in: the dilation of
    the head-independent ``pattern``'s neighborhoods on that axis (1 without one). Their
    dilations must agree on an axis (a table has one unit per axis)."""
    found: list[set[int]] = [set() for _ in range(grid.rank)]

    def walk(p: Pattern) -> None:
        if isinstance(p, Neighborhood):
            for a, (_, d, _, _) in enumerate(neighborhood_axes(p, grid.rank)):
                found[a].add(d)
        for op in getattr(p, "operands", ()):
            walk(op)

    walk(pattern)
    for a, ds in enumerate(found):
        if len(ds) > 1:
            allowed = "one dilation per axis across the pattern's neighborhoods"
            raise field_error(PatternError, f"rel_pos_bias dilations on axis {a}", sorted(ds), allowed)
    return tuple(ds.pop() if ds else 1 for ds in found)


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


def alibi(slopes: object = None, distance: str = "flat") -> Score:
    """ALiBi: ``- slopes[h] * |q - k|`` on the scores of query head ``h`` (Note [Score terms]).

    ``slopes``: one number per query head, or a float tensor ``[H]`` (``[H, rank]`` for
    ``distance='axes'``: one slope per head and axis); None declares the term (its slopes are
    given at call time). ``distance``: 'flat' (token index; the default), 'signed' (adds
    ``slopes[h] * (k - q)``, FlexAttention's ALiBi ``score_mod``; the same as 'flat' under
    causal) or 'axes' (grid coordinates, summed over the axes: 2-D and 3-D grids).
    """
    if slopes is None or _is_tensor(slopes):
        values = () if slopes is None else (("alibi", slopes),)
        return Score(alibi=distance, values=values)
    if isinstance(slopes, (str, bytes)) or not isinstance(slopes, Sequence) or not slopes:
        allowed = "a non-empty sequence of numbers, one per head, or a float tensor"
        raise form_error(PatternError, "alibi slopes", slopes, allowed)
    numbers_ = tuple(_real("alibi slope", s) for s in slopes)
    bad = next((s for s in numbers_ if not math.isfinite(s)), None)
    if bad is not None:
        raise field_error(PatternError, "alibi slope", bad, "a finite number")
    return Score(alibi=distance, values=(("alibi", numbers_),))


def rel_pos_bias(table: object) -> Score:
    """A learned relative position bias (NATTEN's and Swin's ``rpb``; Note [Score terms]): a
    float tensor ``[heads or 1, 2 r_0 + 1, ...]``, one size per grid axis; its entry at the
    center is the query's own position. A tuple of sizes declares the term without data."""
    if _is_tensor(table):
        shape = tuple(table.shape)  # type: ignore[attr-defined]
        if len(shape) < 2:
            raise form_error(PatternError, "rel_pos_bias table", shape, "a tensor [heads or 1, 2 r + 1, ...]")
        return Score(rel_pos_bias=shape[1:], values=(("rel_pos_bias", table),))
    if isinstance(table, tuple):
        return Score(rel_pos_bias=table)
    raise form_error(PatternError, "rel_pos_bias table", table, "a float tensor [heads or 1, 2 r + 1, ...]")


def temperature(t: object = None) -> Score:
    """Per-head temperature: the scaled score of head ``h`` times ``t[h]`` (a float tensor
    ``[H]``), before the cap."""
    return _tensor_term("temperature", t, "a float tensor [H]")


def query_bias(b: object = None) -> Score:
    """A bias per query: ``[B or 1, H or 1, N]`` (flat positions), added to each of its scores."""
    return _tensor_term("query_bias", b, "a float tensor [B or 1, H or 1, N]")


def key_bias(b: object = None) -> Score:
    """A bias per key: ``[B or 1, H or 1, N]`` (flat positions), added to every score of it."""
    return _tensor_term("key_bias", b, "a float tensor [B or 1, H or 1, N]")


def bias(b: object = None) -> Score:
    """A dense additive bias ``[B or 1, H or 1, N, N]`` (for small cases: it is N x N)."""
    return _tensor_term("bias", b, "a float tensor [B or 1, H or 1, N, N]")


def _tensor_term(name: str, value: object, expected: str) -> Score:
    if value is not None and not _is_tensor(value):
        raise form_error(PatternError, name, value, expected)
    return Score(**{name: True}, values=() if value is None else ((name, value),))


def _is_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor)


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


_ALLOWED = (
    "softmax, sigmoid, softcap(c), temperature, alibi(slope, ..., distance='flat'|'signed'|'axes'), "
    "rel_pos_bias(size, ...), query_bias, key_bias, bias, dropout, joined by +"
)


@memo
def parse_score(text: str) -> Score:
    """Read the text form, e.g. ``'softcap(30.0) + alibi(0.5, 0.25)'`` or ``'sigmoid'``."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise field_error(ParseError, "score", text, _ALLOWED) from None
    parts: list[ast.expr] = []
    while isinstance(tree, ast.BinOp) and isinstance(tree.op, ast.Add):
        parts.insert(0, tree.right)
        tree = tree.left
    parts.insert(0, tree)
    score = Score()
    for part in parts:
        score = score + _parse_term(part, text)
    return score


def _parse_term(part: ast.expr, text: str) -> Score:
    def refuse(why: str) -> AttnccError:
        return field_error(ParseError, "score", text, _ALLOWED, why)

    if isinstance(part, ast.Name):
        name, args, keywords = part.id, (), {}
    elif isinstance(part, ast.Call) and isinstance(part.func, ast.Name):
        name = part.func.id
        args = tuple(_number(a, text) for a in part.args)
        keywords = {}
        for kw in part.keywords:
            if kw.arg not in ("distance", "grad") or not isinstance(kw.value, ast.Constant):
                raise refuse(f"cannot read {ast.unparse(kw)!r}")
            keywords[kw.arg] = kw.value.value
    else:
        raise refuse(f"cannot read {ast.unparse(part)!r}")
    grad = keywords.pop("grad", False)
    if grad not in (True, False) or (grad and name not in INPUTS):
        raise refuse(f"cannot read {ast.unparse(part)!r}: grad=True marks a tensor term")
    distance = keywords.pop("distance", None)
    if distance is not None and name != "alibi":
        raise refuse(f"cannot read {ast.unparse(part)!r}: distance= is alibi's")
    if name in KINDS and isinstance(part, ast.Name):
        found = Score(kind=name)
    elif name == "dropout" and isinstance(part, ast.Name):
        found = Score(dropout=True)
    elif name == "softcap" and len(args) == 1 and not grad:
        found = softcap(args[0])
    elif name == "alibi":
        found = alibi(args or None, distance=distance or "flat")
    elif name == "rel_pos_bias" and args and all(float(a).is_integer() for a in args):
        found = rel_pos_bias(tuple(int(a) for a in args))
    elif name in _FLAGS and not args:
        found = Score(**{name: True})
    else:
        raise refuse(f"cannot read {ast.unparse(part)!r}")
    return dataclasses.replace(found, grads=(name,)) if grad else found


def _number(node: ast.expr, text: str) -> float:
    sign = 1.0
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign, node = (-1.0 if isinstance(node.op, ast.USub) else 1.0), node.operand
    value = node.value if isinstance(node, ast.Constant) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return sign * float(value)
    raise field_error(ParseError, "score", text, _ALLOWED, f"{ast.unparse(node)!r} is not a number")


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise form_error(PatternError, name, value, "a real number (a float or an int)")
    return float(value)

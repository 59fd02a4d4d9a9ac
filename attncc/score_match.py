"""Match a traced score function (:mod:`attncc.score_trace`) into score terms, exactly.

The traced expression is expanded into a sum of *monomials*: a coefficient per query head
times *atoms* (``score``, ``tanh(...)``, a tensor read, an integer expression of q and k).
A sub-expression of ``h`` and numbers alone is evaluated per head into the coefficient
(``torch.exp2(-(h + 1) * 8.0 / H)``: ALiBi's slopes). The monomials are then matched
against Note [Score terms] in attncc.ir.score:

=============================================  ==============================================
monomial                                        term
=============================================  ==============================================
``c[h] * score`` (``* t[h]``)                   temperature ``c`` (numbers) or ``t * c``
``c * tanh(score * x[h] / c)``                  ``softcap(c)`` and temperature ``x * c``
``s[h] * abs(q.index - k.index)``               ``alibi(-s)`` ('flat')
``s[h] * k.index - s[h] * q.index``             ``alibi(s, distance='signed')``
``s_a[h] * abs(q.x - k.x)``, per axis            ``alibi(-s, distance='axes')``
``t[h, k.x - q.x + r, ...]`` (or ``q - k``,     ``rel_pos_bias``: the table (flipped on an axis
``(k.x - q.x) // d``, clamped to the edges)     read by ``q - k``), centre ``r`` and unit ``d``
                                                checked against its size and the pattern
``t[b, h, q.index]``, ``t[b, h]``, ``t[h]``     ``query_bias`` (the last two broadcast over N)
``t[b, h, k.index]``                            ``key_bias``
``t[b, h, q.index, k.index]``                   ``bias``
=============================================  ==============================================

``b``, ``h`` and constant indices may be left out or permuted: each read becomes the term's
tensor through a view (Note [Term views]). A number times a term's tensor scales it; a
number alone, a bias inside the cap, a factor outside it, a per-head factor on a bias
tensor, products of reads or distances, anything that branches: refused, quoting the
monomial and saying why (no fallback to a dense bias).

Note [Term views]: a term's tensor is the captured tensor itself where the function reads
it in the term's own layout, else a view of it the autograd graph reaches it through
(``kb[k.index]`` with ``kb`` ``[N]`` is ``kb.reshape(1, 1, N)``; ``t[q.index - k.index +
r]`` is ``t.flip(0)[None]``): its gradient is the user's tensor's. A view is a list of
steps, plain data: ``("index", (i or None, ...))`` (a constant index per dimension, None
keeps it), ``("permute", dims)``, ``("reshape", shape)``, ``("flip", dims)``,
``("expand", shape)``. A source is ``("read", tensor, steps, name)`` (``name``: how the
function calls the tensor), ``("numbers", values)``,
``("scale", source, factor)`` (a number, or one per head) or ``("stack", sources)``
(alibi's slopes per axis).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attncc.errors import TraceError
from attncc.predicate import Extreme, Form, Lin, normal_form
from attncc.score_trace import Real
from attncc.trace import MUL, UNARY, Int, paren

_HEAD_ONLY = ("const", "head")
_FUNCS: dict[str, Callable[..., float]] = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "pow": lambda a, b: a**b,
    "neg": lambda a: -a,
    "abs": abs,
    "tanh": math.tanh,
    "exp": math.exp,
    "exp2": lambda a: 2.0**a,
    "log": math.log,
    "log2": math.log2,
    "min": min,
    "max": max,
}
_TERMS_HELP = (
    "terms: c * tanh(score / c), score * t[h], s[h] * abs(q.index - k.index), "
    "s[h] * (k.index - q.index), t[h, k.index - q.index + r], b[b, h, q.index], b[b, h, k.index], "
    "b[b, h, q.index, k.index] (Note [Score terms] in attncc.ir.score)"
)

Source = tuple  # Note [Term views]


@dataclass(frozen=True)
class Context:
    """What a match depends on besides the function: query heads, grid shape, and per grid
    axis the unit the pattern's relative position table counts offsets in (None: its heads
    count in different units)."""

    heads: int
    grid: tuple[int, ...]
    units: tuple[int, ...] | None

    @property
    def flat(self) -> int:
        """The axis of ``q.index``: -1 on a 2-D/3-D grid; on a 1-D grid it is axis 0."""
        return 0 if len(self.grid) == 1 else -1


@dataclass(frozen=True)
class Terms:
    """A matched score: the cap (or None) and ``(term, alibi distance or None, source)`` per
    tensor term, the sources holding the captured tensors (Note [Term views])."""

    softcap: float | None
    entries: tuple[tuple[str, str | None, Source], ...]


@dataclass(frozen=True, eq=False)
class Mono:
    """``coef[h] * product(atoms)``; ``text`` as written, for messages."""

    coef: tuple[float, ...]
    atoms: tuple[Real, ...]
    text: str
    strength: int

    def kinds(self, *kinds: str) -> list[Real]:
        return [a for a in self.atoms if a.kind in kinds]


# --- expansion ------------------------------------------------------------------------------


def _head_only(node: Real) -> bool:
    if node.kind in _HEAD_ONLY:
        return True
    return node.kind in _FUNCS and all(isinstance(a, Real) and _head_only(a) for a in node.args)


def _evaluate(node: Real, h: int) -> float:
    """A sub-expression of ``h`` and numbers at head ``h``."""
    if node.kind == "const":
        return node.args[0]
    if node.kind == "head":
        return float(h)
    values = [_evaluate(a, h) for a in node.args]
    try:
        out = _FUNCS[node.kind](*values)
    except (ArithmeticError, ValueError) as e:
        raise TraceError(f"{node.text}: {e} at h = {h}") from None
    if not isinstance(out, float | int) or not math.isfinite(out):
        raise TraceError(f"{node.text} is {out!r} at h = {h}: not a finite real number")
    return float(out)


def _product(x: Mono, y: Mono) -> Mono:
    coef = tuple(a * b for a, b in zip(x.coef, y.coef))
    return Mono(coef, x.atoms + y.atoms, f"{paren(x, MUL)} * {paren(y, MUL + 1)}", MUL)


def _negated(m: Mono) -> Mono:
    return Mono(tuple(-c for c in m.coef), m.atoms, f"-{paren(m, UNARY)}", UNARY)


def expand(node: Real, heads: int) -> list[Mono]:
    """``node`` as a sum of monomials (like ones merged, zero ones dropped)."""
    return [m for m in _merged(_expand(node, heads)) if any(m.coef)]


def _expand(node: Real, heads: int) -> list[Mono]:
    kind, args = node.kind, node.args
    if _head_only(node):
        return [Mono(tuple(_evaluate(node, h) for h in range(heads)), (), node.text, node.strength)]
    if kind == "int" and args[0].kind in ("add", "sub", "neg", "const"):
        return _expand_int(args[0], heads)
    if kind in ("score", "read", "int", "tanh"):
        return [Mono((1.0,) * heads, (node,), node.text, node.strength)]
    if kind == "add":
        return _expand(args[0], heads) + _expand(args[1], heads)
    if kind == "sub":
        return _expand(args[0], heads) + [_negated(m) for m in _expand(args[1], heads)]
    if kind == "neg":
        return [_negated(m) for m in _expand(args[0], heads)]
    if kind == "mul":
        right = _expand(args[1], heads)
        return [_product(x, y) for x in _expand(args[0], heads) for y in right]
    if kind == "div":
        divisor = args[1]
        if not _head_only(divisor):
            raise TraceError(
                f"{node.text}: a score divides by numbers or expressions of h only, not by "
                f"{divisor.text} (temperature multiplies: score * t[h])"
            )
        values = [_evaluate(divisor, h) for h in range(heads)]
        if 0.0 in values:
            raise TraceError(f"{node.text}: {divisor.text} is 0 at h = {values.index(0.0)}")
        return [
            Mono(tuple(c / v for c, v in zip(m.coef, values)), m.atoms,
                 f"{paren(m, MUL)} / {paren(divisor, MUL + 1)}", MUL)
            for m in _expand(args[0], heads)
        ]  # fmt: skip
    if kind == "batch":
        raise TraceError(f"{node.text}: b enters a score only as an index (t[b, h, q.index])")
    raise TraceError(
        f"{node.text}: {kind} applies to numbers and expressions of h only (it has no score term); "
        + _TERMS_HELP
    )


def _expand_int(value: Int, heads: int) -> list[Mono]:
    """A sum of integers as one monomial per part (``abs(q.h - k.h) + abs(q.w - k.w)``:
    two distances; ``k.index - q.index``: two coordinates, matched together by alibi)."""
    if value.kind == "const":
        return [Mono((float(value.args[0]),) * heads, (), value.text, value.strength)]
    parts = [_expand(Real.lift(a), heads) for a in value.args]
    if value.kind == "neg":
        return [_negated(m) for m in parts[0]]
    return parts[0] + (parts[1] if value.kind == "add" else [_negated(m) for m in parts[1]])


def _atom_key(atom: Real) -> tuple:
    if atom.kind == "read":
        return ("read", id(atom.args[0]), atom.text)
    if atom.kind == "tanh":
        return ("tanh", id(atom))
    return (atom.kind, atom.text)


def _merged(monos: list[Mono]) -> list[Mono]:
    found: dict[tuple, Mono] = {}
    for m in monos:
        key = tuple(sorted(_atom_key(a) for a in m.atoms))
        if key in found:
            old = found[key]
            coef = tuple(a + b for a, b in zip(old.coef, m.coef))
            found[key] = Mono(coef, old.atoms, f"{old.text} + {m.text}", 0)
        else:
            found[key] = m
    return list(found.values())


# --- matching ---------------------------------------------------------------------------


def match(node: Real, ctx: Context) -> Terms:
    """The terms of the traced score ``node``, or a TraceError quoting what has none."""
    monos = expand(node, ctx.heads)
    scored = [m for m in monos if m.kinds("score", "tanh")]
    softcap, temperature = _content(node, scored, ctx)
    entries = ([temperature] if temperature else []) + _additive([m for m in monos if m not in scored], ctx)
    names = [e[0] for e in entries]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise TraceError(
            f"{node.text}: it adds two {twice} terms; give one tensor (add them before the call)"
        )
    return Terms(softcap, tuple(entries))


def _content(node: Real, scored: list[Mono], ctx: Context) -> tuple[float | None, tuple | None]:
    """The cap and the temperature, from the monomials that hold the score."""
    if not scored:
        raise TraceError(
            f"{node.text}: the result does not use score (a score function returns the new score)"
        )
    if len(scored) > 1:
        raise TraceError(
            f"{node.text}: the score enters twice ({scored[0].text} and {scored[1].text}); it enters "
            "once, tempered and capped: c * tanh(score * t[h] / c) (Note [Score terms])"
        )
    (m,) = scored
    caps = m.kinds("tanh")
    if not caps:
        return None, _temperature(m, m.coef, ctx)
    cap = caps[0]
    outside = [a for a in m.atoms if a is not cap]
    if outside:
        raise TraceError(
            f"{m.text}: {outside[0].text} multiplies the cap; a temperature applies before the cap "
            "(c * tanh(score * t[h] / c)) and terms are added after it (Note [Score terms])"
        )
    c = m.coef[0]
    if any(x != c for x in m.coef):
        raise TraceError(f"{m.text}: the cap differs between heads; softcap takes one constant")
    inner = expand(cap.args[0], ctx.heads)
    inside = [x for x in inner if not x.kinds("score")]
    if inside:
        raise TraceError(
            f"{cap.text}: {inside[0].text} is inside the cap; terms are added after the cap "
            "(c * tanh(score / c) + bias, Note [Score terms]), so a term under tanh has no match"
        )
    if len(inner) != 1 or inner[0].kinds("tanh"):
        raise TraceError(f"{cap.text}: the cap takes the score once, times numbers or t[h]")
    (x,) = inner
    return abs(c), _temperature(x, tuple(k * c for k in x.coef), ctx)


def _temperature(m: Mono, coef: tuple[float, ...], ctx: Context) -> tuple | None:
    """``coef[h] * score`` (times ``t[h]``) as a temperature entry, or None for the score alone."""
    others = [a for a in m.atoms if a.kind != "score"]
    if len(m.kinds("score")) > 1 or len(others) > 1 or (others and others[0].kind != "read"):
        bad = others[0].text if others else "score"
        raise TraceError(
            f"{m.text}: the score times {bad} has no term (temperature: the score times numbers or "
            "t[h], one factor per head)"
        )
    if others:
        return ("temperature", None, _scaled(_head_source(others[0], m.text, ctx), coef))
    if _ones(coef):
        return None
    return ("temperature", None, ("numbers", coef))


def _ones(coef: tuple[float, ...]) -> bool:
    """Whether every factor is 1, up to rounding (``49 * tanh(score / 49)`` has (1 / 49) * 49)."""
    return all(math.isclose(k, 1.0, rel_tol=1e-12) for k in coef)


def _scaled(source: Source, coef: tuple[float, ...]) -> Source:
    if _ones(coef):
        return source
    return ("scale", source, coef[0] if all(k == coef[0] for k in coef) else coef)


def _additive(monos: list[Mono], ctx: Context) -> list[tuple]:
    """The terms added to the score: biases read from tensors, and alibi's distances."""
    entries, distances = [], []
    for m in monos:
        ints, reads = m.kinds("int"), m.kinds("read")
        if not m.atoms:
            raise TraceError(
                f"{m.text}: adds a number, which has no term (softmax ignores it; "
                "sigmoid_bias= sets sigmoid's)"
            )
        if ints and len(ints) == 1 and len(reads) <= 1:
            distances.append((m, reads[0] if reads else None, ints[0]))
        elif len(reads) == 1 and not ints:
            entries.append(_bias(m, reads[0], ctx))
        elif any(_per_head(r) for r in reads):
            raise TraceError(
                f"{m.text}: a term times a factor per head has no match; a temperature multiplies the "
                "score alone, before the terms are added (Note [Score terms])"
            )
        else:
            raise TraceError(f"{m.text}: a product of tensor reads or distances has no term; " + _TERMS_HELP)
    if distances:
        entries.append(_alibi(distances, ctx))
    return entries


# --- reads ------------------------------------------------------------------------------


def _roles(read: Real, ctx: Context) -> list[tuple]:
    """What indexes each dimension of ``read``: ("b",), ("h",), ("const", i), ("q", axis),
    ("k", axis) or ("rel", axis, centre, unit, sign, clamp)."""
    tensor, index, name = read.args
    if len(index) != tensor.dim():
        raise TraceError(
            f"{read.text}: {name} has {tensor.dim()} dimensions, indexed {len(index)} times; "
            "index every dimension"
        )
    roles = []
    for item in index:
        if isinstance(item, Real):
            roles.append(("b",) if item.kind == "batch" else ("h",))
        elif isinstance(item, Int):
            roles.append(_int_role(item, read))
        else:
            roles.append(("const", item))
    return roles


def _per_head(read: Real) -> bool:
    """Whether ``read`` is indexed by ``h`` and numbers only (a factor per head)."""
    return all(isinstance(i, int) or (isinstance(i, Real) and i.kind == "head") for i in read.args[1])


def _int_role(item: Int, read: Real) -> tuple:
    help_ = (
        f"{read.text}: the index {item.text} is not q.index, k.index or a relative offset "
        "(k.index - q.index + r, (k.x - q.x) // d + r, or q - k, optionally clamped to the table)"
    )
    form, clamp = _unclamped(normal_form(item))
    if not isinstance(form, Lin):
        raise TraceError(help_)
    terms = dict(form.terms)
    if len(terms) == 1 and all(a[0] == "var" for a in terms) and clamp is None and not form.const:
        ((atom, coef),) = terms.items()
        if coef == 1:
            return (atom[1], atom[2])
    found = _difference(form)
    if found is None and len(terms) == 1:
        ((atom, coef),) = terms.items()
        if atom[0] == "floordiv" and coef == 1 and not atom[1].const:
            inner = _difference(atom[1])
            if inner is not None:
                return ("rel", inner[0], form.const, atom[2], inner[1], clamp)
    if found is None:
        raise TraceError(help_)
    return ("rel", found[0], form.const, 1, found[1], clamp)


def _difference(lin: Lin) -> tuple[int, int] | None:
    """``(axis, sign)`` when ``lin`` is ``sign * (k.x - q.x) + const`` (sign ±1)."""
    terms = dict(lin.terms)
    if len(terms) != 2 or any(a[0] != "var" for a in terms):
        return None
    (a1, c1), (a2, c2) = terms.items()
    if a1[2] != a2[2] or {a1[1], a2[1]} != {"q", "k"} or c1 != -c2 or abs(c1) != 1:
        return None
    return a1[2], (c1 if a1[1] == "k" else c2)


def _unclamped(form: Form) -> tuple[Form, tuple[int, int] | None]:
    """``(x, (lo, hi))`` for ``min(max(x, lo), hi)`` (either nesting), else ``(form, None)``."""
    if not isinstance(form, Extreme) or len(form.parts) != 2:
        return form, None
    bound = next((p for p in form.parts if isinstance(p, Lin) and not p.terms), None)
    rest = next((p for p in form.parts if p is not bound), None)
    if bound is None or not isinstance(rest, Extreme) or len(rest.parts) != 2 or rest.kind == form.kind:
        return form, None
    inner = next((p for p in rest.parts if isinstance(p, Lin) and not p.terms), None)
    x = next((p for p in rest.parts if p is not inner), None)
    if inner is None or not isinstance(x, Lin):
        return form, None
    lo, hi = (inner.const, bound.const) if form.kind == "min" else (bound.const, inner.const)
    return x, (lo, hi)


def _steps(roles: list[tuple], shape: tuple[int, ...], order: list[str]) -> list[tuple]:
    """View steps (Note [Term views]) taking a tensor whose dimensions have ``roles`` to the
    layout ``order`` (role keys b, h, q, k, r0.., each of size 1 where the read lacks it)."""
    keys = [_key(r) for r in roles]
    steps: list[tuple] = []
    if any(k == "const" for k in keys):
        steps.append(("index", tuple(r[1] if r[0] == "const" else None for r in roles)))
    kept = [(k, s) for k, s in zip(keys, shape) if k != "const"]
    perm = tuple(sorted(range(len(kept)), key=lambda i: order.index(kept[i][0])))
    if perm != tuple(range(len(kept))):
        steps.append(("permute", perm))
    sizes = dict(kept)
    target = tuple(sizes.get(slot, 1) for slot in order)
    if target != tuple(sizes[kept[i][0]] for i in perm):
        steps.append(("reshape", target))
    return steps


def _key(role: tuple) -> str:
    return f"r{max(role[1], 0)}" if role[0] == "rel" else role[0]


def _head_source(read: Real, where: str, ctx: Context) -> Source:
    """A read indexed by ``h`` and constants only, as an ``[H]`` tensor."""
    roles = _roles(read, ctx)
    bad = next((r for r in roles if r[0] not in ("h", "const")), None)
    if bad is not None or [r[0] for r in roles].count("h") > 1:
        raise TraceError(
            f"{where}: {read.text} is not a factor per head (a read by h and numbers: t[h], s[h, 0])"
        )
    tensor = read.args[0]
    steps = _steps(roles, tuple(tensor.shape), ["h"])
    if "h" not in [r[0] for r in roles]:
        steps.append(("expand", (ctx.heads,)))
    return ("read", tensor, tuple(steps), read.args[2])


_LAYOUTS = {
    "query_bias": ["b", "h", "q"],
    "key_bias": ["b", "h", "k"],
    "bias": ["b", "h", "q", "k"],
}


def _bias(m: Mono, read: Real, ctx: Context) -> tuple:
    """A monomial ``c * t[...]``: rel_pos_bias, query_bias, key_bias or bias."""
    c = m.coef[0]
    if any(x != c for x in m.coef):
        raise TraceError(f"{m.text}: a factor per head on {read.text} has no term (fold it into the tensor)")
    roles = _roles(read, ctx)
    keys = [_key(r) for r in roles if r[0] != "const"]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise TraceError(f"{read.text}: two indices by {twice.replace('r', 'offsets on axis ')}")
    tensor = read.args[0]
    shape = tuple(tensor.shape)
    if any(r[0] == "rel" for r in roles):
        return ("rel_pos_bias", None, _scaled(_table(read, roles, ctx), (c,)))
    for r in roles:
        if r[0] in ("q", "k") and r[1] != ctx.flat:
            raise TraceError(
                f"{read.text}: a bias reads the flat position ({r[0]}.index), not one axis of it"
            )
    name = "bias" if {"q", "k"} <= set(keys) else "key_bias" if "k" in keys else "query_bias"
    steps = _steps(roles, shape, _LAYOUTS[name])
    if name == "query_bias" and "q" not in keys:  # a bias per (batch,) head: every query's
        steps.append(("expand", (-1, -1, math.prod(ctx.grid))))
    return (name, None, _scaled(("read", tensor, tuple(steps), read.args[2]), (c,)))


def _table(read: Real, roles: list[tuple], ctx: Context) -> Source:
    """A relative position table: checks each offset against the table and the pattern."""
    tensor, _, name = read.args
    rank = len(ctx.grid)
    for dim, r in enumerate(roles):
        if r[0] == "b" or r[0] in ("q", "k"):
            raise TraceError(
                f"{read.text}: a relative position table is read by h and offsets only (indexed by "
                f"{r[0]}: rel_pos_bias is the same for every batch element and query)"
            )
        if r[0] != "rel":
            continue
        _, axis, centre, unit, _, clamp = r
        size = tensor.shape[dim]
        if axis == -1 and rank > 1:
            raise TraceError(
                f"{read.text}: an offset of flat indices on a {rank}-D grid; rel_pos_bias takes one "
                "offset per grid axis (k.x - q.x + r)"
            )
        if size % 2 == 0 or centre != (size - 1) // 2:
            want = f"+ {(size - 1) // 2}" if size % 2 else "an odd size 2 r + 1 and + r"
            raise TraceError(
                f"{read.text}: the offset centre {centre} and the size {size} of {name}'s dimension "
                f"{dim} disagree (rel_pos_bias reads the middle entry at offset 0: {want})"
            )
        if clamp is not None and clamp != (0, size - 1):
            raise TraceError(
                f"{read.text}: it clamps to [{clamp[0]}, {clamp[1]}]; the kernel clamps an offset "
                f"to the table's edges, [0, {size - 1}]"
            )
        _check_unit(read, axis, unit, ctx)
    steps = _steps(roles, tuple(tensor.shape), ["h", *(f"r{a}" for a in range(rank))])
    flips = tuple(1 + max(r[1], 0) for r in roles if r[0] == "rel" and r[4] < 0)
    if flips:
        steps.append(("flip", flips))
    return ("read", tensor, tuple(steps), name)


def _check_unit(read: Real, axis: int, unit: int, ctx: Context) -> None:
    a = max(axis, 0)
    if ctx.units is None:
        raise TraceError(
            f"{read.text}: the pattern's heads count offsets in different units (dilations); "
            "a relative position table has one unit per axis"
        )
    want = ctx.units[a]
    if unit != want:
        how = "k.x - q.x + r" if want == 1 else f"(k.x - q.x) // {want} + r"
        raise TraceError(
            f"{read.text}: offsets on axis {a} count in units of {unit}, the pattern's in units of "
            f"{want} (its dilation): index the table by {how}"
        )


# --- alibi ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Factor:
    """A slope: ``coef[h]`` times an optional read by ``h``; ``text`` the monomials it sums."""

    coef: tuple[float, ...]
    read: Real | None
    text: str

    def key(self) -> Any:
        return None if self.read is None else _atom_key(self.read)

    def plus(self, other: _Factor | None) -> _Factor:
        if other is None:
            return self
        if self.key() != other.key():
            raise TraceError(f"{other.text} and {self.text}: two different slopes for one distance")
        coef = tuple(a + b for a, b in zip(self.coef, other.coef))
        return _Factor(coef, self.read, f"{other.text} + {self.text}")

    def times(self, c: float) -> _Factor:
        return _Factor(tuple(c * x for x in self.coef), self.read, self.text)

    def same(self, other: _Factor | None) -> bool:
        return other is not None and self.key() == other.key() and self.coef == other.coef


def _alibi(distances: list[tuple[Mono, Real | None, Real]], ctx: Context) -> tuple:
    absolute: dict[int, _Factor] = {}
    signed: dict[tuple, _Factor] = {}
    for m, read, node in distances:
        factor = _Factor(m.coef, read, m.text)
        form = normal_form(node.args[0])
        axis = _abs_axis(form)
        if axis is not None:
            absolute[axis] = factor.plus(absolute.get(axis))
        elif isinstance(form, Lin) and all(a[0] == "var" for a, _ in form.terms):
            if form.const:
                raise TraceError(f"{m.text}: {node.text} adds a number times a slope, which has no term")
            for atom, c in form.terms:
                signed[atom] = factor.times(c).plus(signed.get(atom))
        else:
            raise TraceError(
                f"{m.text}: {node.text} is not a distance alibi takes (abs(q.index - k.index), "
                "k.index - q.index, or abs(q.x - k.x) per axis of a 2-D/3-D grid)"
            )
    signed = {a: f for a, f in signed.items() if any(f.coef)}
    every = " + ".join(m.text for m, _, _ in distances)
    if absolute and signed:
        raise TraceError(f"{every}: both |q - k| and k - q distances; alibi takes one")
    if signed:
        k, q = signed.get(("var", "k", ctx.flat)), signed.get(("var", "q", ctx.flat))
        if set(signed) != {("var", "k", ctx.flat), ("var", "q", ctx.flat)} or not k.same(q.times(-1.0)):
            raise TraceError(
                f"{every}: alibi's signed distance is a slope per head times k.index - q.index "
                "(the key's and the query's flat index with opposite factors)"
            )
        return ("alibi", "signed", _slope(k, ctx))
    if ctx.flat in absolute:
        if len(absolute) > 1:
            raise TraceError(f"{every}: both the flat distance and distances per axis; alibi takes one")
        return ("alibi", "flat", _slope(absolute[ctx.flat].times(-1.0), ctx))
    per_axis = [absolute.get(a) for a in range(len(ctx.grid))]
    first = per_axis[0]
    if first is not None and all(first.same(f) for f in per_axis):
        return ("alibi", "axes", _slope(first.times(-1.0), ctx))
    zeros = ("numbers", (0.0,) * ctx.heads)
    return (
        "alibi",
        "axes",
        ("stack", tuple(zeros if f is None else _slope(f.times(-1.0), ctx) for f in per_axis)),
    )


def _abs_axis(form: Form) -> int | None:
    """The axis of ``abs(k.x - q.x)`` (normal form ``max(d, -d)``), else None."""
    if not isinstance(form, Extreme) or form.kind != "max" or len(form.parts) != 2:
        return None
    d, e = form.parts
    if not (isinstance(d, Lin) and isinstance(e, Lin)) or d.const or e != -d:
        return None
    found = _difference(d)
    return None if found is None else found[0]


def _slope(f: _Factor, ctx: Context) -> Source:
    if f.read is None:
        return ("numbers", f.coef)
    return _scaled(_head_source(f.read, f.text, ctx), f.coef)

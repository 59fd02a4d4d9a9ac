"""Match a traced predicate (see :mod:`attncc.trace`) into the pattern IR, exactly.

Negations are pushed to the comparisons; each comparison ``a op b`` becomes
``a - b op 0`` with ``a - b`` in min/max normal form: ``abs(x)`` is
``max(x, -x)``, sums and negations move inside ``min``/``max``, so the
expression is a tree of min/max over linear sums of *atoms* (a coordinate,
``x // c`` or ``x % c`` of a linear ``x``). ``max(..) <= 0`` is an ``&`` of its
parts, ``min(..) <= 0`` an ``|``, and so on, down to linear comparisons, which
are matched against what the IR can say:

==========================================  =======================================
linear comparison (after scaling)            pattern
==========================================  =======================================
``k.x - q.x`` op c                           ``band(x, lo, hi)``
``(k.x - q.x + c0) // b`` op c               a band (``//`` of a difference is one)
``(k.x - q.x + c0) % m`` op c                ``congruent(x, m, r)`` for each residue
``q.x // b - k.x // b == 0``                 ``block_diagonal(x, b)``
``q.x % m - k.x % m`` == / != 0             ``congruent(x, m, r)``
the same on ``index`` of a 2-D/3-D grid     ``sliding_window``/``causal`` (bands
                                             holding the diagonal), ``document``
                                             (blocks), ``strided``
==========================================  =======================================

Anything else is refused with a :class:`~attncc.errors.TraceError` that quotes
the comparison as written and says why; nothing falls back to a dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from attncc.errors import TraceError
from attncc.ir.grid import Grid
from attncc.ir.nodes import (
    Pattern,
    band,
    block_diagonal,
    congruent,
    document,
    intersection,
    sliding_window,
    strided,
    union,
)
from attncc.trace import Cond, Int

MAX_RESIDUES = 8  # a modulo comparison may expand to at most this many congruences
_FLAT = -1
_NEGATED = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}

Formula = Pattern | bool


@dataclass(frozen=True)
class Lin:
    """``sum(coef * atom) + const``; an atom is ``("var", side, axis)``,
    ``("floordiv", Lin, b)`` or ``("mod", Lin, m)``."""

    terms: tuple[tuple[tuple, int], ...]
    const: int

    @staticmethod
    def of(terms: dict[tuple, int], const: int) -> Lin:
        kept = sorted(((a, c) for a, c in terms.items() if c), key=lambda t: repr(t[0]))
        return Lin(tuple(kept), const)

    def __add__(self, other: Lin) -> Lin:
        terms = dict(self.terms)
        for atom, coef in other.terms:
            terms[atom] = terms.get(atom, 0) + coef
        return Lin.of(terms, self.const + other.const)

    def __neg__(self) -> Lin:
        return Lin(tuple((a, -c) for a, c in self.terms), -self.const)


@dataclass(frozen=True)
class Extreme:
    """``min`` or ``max`` of its parts (each a :class:`Lin` or an :class:`Extreme`)."""

    kind: str
    parts: tuple


Form = Lin | Extreme


def _add(x: Form, y: Form) -> Form:
    if isinstance(x, Extreme):
        return Extreme(x.kind, tuple(_add(p, y) for p in x.parts))
    if isinstance(y, Extreme):
        return Extreme(y.kind, tuple(_add(x, p) for p in y.parts))
    return x + y


def _neg(x: Form) -> Form:
    if isinstance(x, Extreme):
        return Extreme("max" if x.kind == "min" else "min", tuple(_neg(p) for p in x.parts))
    return -x


def _const(value: int) -> Lin:
    return Lin((), value)


def normal_form(node: Int) -> Form:
    """The min/max normal form of a traced integer."""
    kind, args = node.kind, node.args
    if kind == "var":
        return Lin(((("var", *args), 1),), 0)
    if kind == "const":
        return _const(args[0])
    if kind in ("add", "sub"):
        right = normal_form(args[1])
        return _add(normal_form(args[0]), right if kind == "add" else _neg(right))
    if kind == "neg":
        return _neg(normal_form(args[0]))
    if kind == "abs":
        x = normal_form(args[0])
        return Extreme("max", (x, _neg(x)))
    if kind in ("min", "max"):
        return Extreme(kind, tuple(normal_form(a) for a in args))
    inner, divisor = normal_form(args[0]), args[1]
    if isinstance(inner, Extreme):
        raise TraceError(f"{node.text}: {'//' if kind == 'floordiv' else '%'} of a min, max or abs")
    if not inner.terms or divisor == 1:  # x // 1 is x and x % 1 is 0
        if kind == "floordiv":
            return inner if divisor == 1 else _const(inner.const // divisor)
        return _const(inner.const % divisor)
    return Lin((((kind, inner, divisor), 1),), 0)


# --- formulas: patterns joined by & and |, with True/False folded ---------------------


def _all(items: list[Formula]) -> Formula:
    if any(i is False for i in items):
        return False
    rest = [i for i in items if i is not True]
    return True if not rest else intersection(*rest)  # type: ignore[arg-type]


def _any(items: list[Formula]) -> Formula:
    if any(i is True for i in items):
        return True
    rest = [i for i in items if i is not False]
    return False if not rest else union(*rest)  # type: ignore[arg-type]


def _holds(value: int, op: str) -> bool:
    return {"<=": value <= 0, ">=": value >= 0, "==": value == 0, "!=": value != 0}[op]


def _solve(c: int, r: int, op: str) -> tuple[bool, int | None, int | None] | bool:
    """Integers ``y`` with ``c * y op r``: ``(True, lo, hi)`` for ``lo <= y <= hi`` (None: open),
    ``(False, v, v)`` for ``y != v``, or a bool when every or no ``y`` qualifies."""
    if c < 0:
        c, r, op = -c, -r, {"<=": ">=", ">=": "<="}.get(op, op)
    if op == "<=":
        return True, None, r // c
    if op == ">=":
        return True, -(-r // c), None
    if r % c:
        return op == "!="
    return op == "==", r // c, r // c


class Matcher:
    """Turns the traced condition of one predicate into a pattern on one grid."""

    def __init__(self, grid: Grid, names: tuple[str, ...]) -> None:
        self.grid, self.names = grid, names

    def formula(self, cond: Cond | bool, negate: bool = False) -> Formula:
        if isinstance(cond, bool):
            return cond != negate
        if cond.kind == "const":
            return cond.args[0] != negate
        if cond.kind == "not":
            return self.formula(cond.args[0], not negate)
        if cond.kind in ("and", "or"):
            parts = [self.formula(c, negate) for c in cond.args]
            return _all(parts) if (cond.kind == "and") != negate else _any(parts)
        op, left, right = cond.args
        op = _NEGATED[op] if negate else op
        where = f"~({cond.text})" if negate else cond.text
        diff = _add(normal_form(left), _neg(normal_form(right)))
        # Integers: a < b is a - b + 1 <= 0, a > b is a - b - 1 >= 0.
        shift = {"<": 1, ">": -1}.get(op, 0)
        op = {"<": "<=", ">": ">="}.get(op, op)
        return self.compare(_add(diff, _const(shift)), op, where)

    def compare(self, form: Form, op: str, where: str) -> Formula:
        """``form op 0`` for op in <=, >=, ==, !=."""
        if isinstance(form, Lin):
            return self.linear(form, op, where)
        if op == "==":
            return _all([self.compare(form, "<=", where), self.compare(form, ">=", where)])
        if op == "!=":
            below = self.compare(_add(form, _const(1)), "<=", where)
            return _any([below, self.compare(_add(form, _const(-1)), ">=", where)])
        parts = [self.compare(p, op, where) for p in form.parts]
        every = (form.kind == "max") == (op == "<=")  # max <= 0 and min >= 0 need every part
        return _all(parts) if every else _any(parts)

    # --- linear comparisons -----------------------------------------------------

    def name(self, atom: tuple) -> str:
        if atom[0] == "var":
            _, side, axis = atom
            return f"{side}.{'index' if axis == _FLAT else self.names[axis]}"
        inner = self.show(atom[1])
        inner = inner if len(atom[1].terms) == 1 and not atom[1].const else f"({inner})"
        return f"({inner} {'//' if atom[0] == 'floordiv' else '%'} {atom[2]})"

    def show(self, lin: Lin) -> str:
        """``lin`` as Python text, positive terms first: ``q.t - k.h - 2``."""
        text = ""
        for atom, coef in sorted(lin.terms, key=lambda t: t[1] < 0):
            scaled = self.name(atom) if abs(coef) == 1 else f"{abs(coef)} * {self.name(atom)}"
            text += f" {'-' if coef < 0 else '+'} {scaled}" if text else f"{'-' if coef < 0 else ''}{scaled}"
        if lin.const or not text:
            text += f" {'-' if lin.const < 0 else '+'} {abs(lin.const)}" if text else str(lin.const)
        return text

    def refuse(self, where: str, lin: Lin, op: str, why: str) -> TraceError:
        return TraceError(f"cannot express {where} (as {self.show(lin)} {op} 0): {why}")

    def linear(self, lin: Lin, op: str, where: str) -> Formula:
        terms = dict(lin.terms)
        if not terms:
            return _holds(lin.const, op)
        kinds = {atom[0] for atom in terms}
        if kinds == {"var"}:
            return self.offsets(lin, op, where)
        if len(terms) == 1:
            return self.of_difference(lin, op, where)
        if len(terms) == 2 and len(kinds) == 1:
            return self.same_class(lin, op, where)
        raise self.refuse(where, lin, op, "it mixes coordinates with // or % terms")

    def difference(self, lin: Lin) -> tuple[int, int] | None:
        """``(axis, c)`` when ``lin`` is ``c * (k.x - q.x) + const``, else None."""
        if len(lin.terms) != 2:
            return None
        (a1, c1), (a2, c2) = lin.terms
        if a1[0] != "var" or a2[0] != "var" or a1[2] != a2[2] or {a1[1], a2[1]} != {"q", "k"} or c1 != -c2:
            return None
        return a1[2], (c1 if a1[1] == "k" else c2)

    def offsets(self, lin: Lin, op: str, where: str) -> Formula:
        found = self.difference(lin)
        if found is None:
            raise self.refuse(where, lin, op, self._why_not_difference(lin))
        axis, c = found
        solved = _solve(c, -lin.const, op)
        if isinstance(solved, bool):
            return solved
        inside, lo, hi = solved
        if inside:
            return self.band(axis, lo, hi, where)
        return _any([self.band(axis, None, lo - 1, where), self.band(axis, hi + 1, None, where)])

    def _why_not_difference(self, lin: Lin) -> str:
        atoms = [a for a, _ in lin.terms]
        if len(atoms) == 1:
            return f"it relates {self.name(atoms[0])} only to a constant; a pattern relates keys to queries"
        if len({a[2] for a in atoms}) > 1:
            return "it compares different axes: " + ", ".join(self.name(a) for a in atoms)
        return "q and k do not appear as a difference k - q (their coefficients differ)"

    def band(self, axis: int, lo: int | None, hi: int | None, where: str) -> Formula:
        """``lo <= k - q <= hi`` on ``axis`` (``_FLAT``: the flat index of a 2-D/3-D grid)."""
        if axis != _FLAT:
            return band(axis, lo, hi)
        n = self.grid.size
        if (lo is not None and lo > 0) or (hi is not None and hi < 0):
            span = f"<= {hi}" if lo is None else f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise TraceError(
                f"cannot express {where}: k.index - q.index {span} leaves the diagonal, and "
                f"no primitive keeps such a band of the flat index of a {self.grid.rank}-D grid "
                "(a band per axis is band(axis, lo, hi))"
            )
        return sliding_window(n - 1 if lo is None else -lo, n - 1 if hi is None else hi)

    def of_difference(self, lin: Lin, op: str, where: str) -> Formula:
        """``c * (x // b) op r`` or ``c * (x % m) op r`` with ``x`` a difference ``k - q + c0``."""
        ((atom, c),) = lin.terms
        kind, inner, divisor = atom
        found = self.difference(inner)
        if found is None:
            what = "a coordinate alone" if len(inner.terms) == 1 else "no difference k - q of one axis"
            raise self.refuse(
                where,
                lin,
                op,
                f"{self.name(atom)} is of {what}; // and % are supported on a difference "
                "((k.x - q.x) // b op c) or on a coordinate compared with the same of the other token "
                "(q.x // b == k.x // b)",
            )
        if kind == "floordiv":
            solved = _solve(c, -lin.const, op)
            if isinstance(solved, bool):
                return solved
            # y = x // b: y >= lo  <=>  x >= b * lo;  y <= hi  <=>  x <= b * hi + b - 1.
            inside, lo, hi = solved
            if not inside:
                lo, hi = hi + 1, lo - 1  # y outside [v, v]: y >= v + 1 or y <= v - 1
            parts = []
            if lo is not None:
                parts.append(self.linear(inner + _const(-divisor * lo), ">=", where))
            if hi is not None:
                parts.append(self.linear(inner + _const(-(divisor * hi + divisor - 1)), "<=", where))
            return _all(parts) if inside else _any(parts)
        axis, sign = found  # x = sign * (k - q) + c0
        if abs(sign) != 1:
            raise self.refuse(where, lin, op, f"{self.name(atom)} is of a multiple of k - q")
        residues = [s for s in range(divisor) if _holds(c * s + lin.const, op)]
        if len(residues) == divisor:
            return True
        if len(residues) > MAX_RESIDUES:
            raise self.refuse(
                where, lin, op, f"it keeps {len(residues)} residues mod {divisor}; at most {MAX_RESIDUES}"
            )
        # x == s (mod m)  <=>  k - q == sign * (s - c0)  <=>  (q - k) % m == sign * (c0 - s) % m
        c0 = inner.const
        return _any([self.congruent(axis, divisor, (sign * (c0 - s)) % divisor) for s in residues])

    def same_class(self, lin: Lin, op: str, where: str) -> Formula:
        """``q.x // b - k.x // b`` or ``q.x % m - k.x % m`` compared with 0."""
        (a1, c1), (a2, c2) = lin.terms
        inner1, inner2 = a1[1], a2[1]
        plain = all(
            len(i.terms) == 1 and i.const == 0 and i.terms[0][1] == 1 and i.terms[0][0][0] == "var"
            for i in (inner1, inner2)
        )
        var1, var2 = (i.terms[0][0] if plain else None for i in (inner1, inner2))
        if not (
            plain
            and a1[2] == a2[2]
            and c1 == -c2
            and var1[2] == var2[2]  # type: ignore[index]
            and {var1[1], var2[1]} == {"q", "k"}  # type: ignore[index]
        ):
            raise self.refuse(
                where, lin, op, "// and % must apply the same constant to the same axis of q and of k"
            )
        kind, divisor, axis = a1[0], a1[2], var1[2]  # type: ignore[index]
        if lin.const == 0 and op == "==":
            return self.block(axis, divisor) if kind == "floordiv" else self.congruent(axis, divisor, 0)
        if kind == "mod" and lin.const == 0 and op == "!=":
            if divisor - 1 > MAX_RESIDUES:
                raise self.refuse(
                    where, lin, op, f"it keeps {divisor - 1} residues mod {divisor}; at most {MAX_RESIDUES}"
                )
            return _any([self.congruent(axis, divisor, o) for o in range(1, divisor)])
        if kind == "floordiv":
            why = f"only equal blocks (q.x // {divisor} == k.x // {divisor}) have a pattern"
        else:
            why = f"only equal or unequal residues (q.x % {divisor} == / != k.x % {divisor}) have a pattern"
        raise self.refuse(where, lin, op, why)

    def block(self, axis: int, size: int) -> Pattern:
        if axis != _FLAT:
            return block_diagonal(axis, size)
        return document(tuple(i // size for i in range(self.grid.size)))

    def congruent(self, axis: int, modulus: int, offset: int) -> Pattern:
        return congruent(axis, modulus, offset) if axis != _FLAT else strided(modulus, offset)

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
``k.x // b - q.x // b`` <= 0 (or >= 0)      ``band(x, hi=0) | block_diagonal(x, b)``
                                             (block-causal)
``k.x`` op c (the key alone)                 ``key_range(x, lo, hi)``
``t[q.x] - t[k.x] == 0`` (``t`` a tensor)    ``document(t)`` (a lookup, see
                                             Note [Torch functions] in attncc.trace)
the same on ``index`` of a 2-D/3-D grid     ``sliding_window``/``causal`` (bands
                                             holding the diagonal), ``document``
                                             (blocks), ``strided``, key ranges of
                                             row-major runs (Note [Flat key ranges])
==========================================  =======================================

A condition on the query alone holds for every query or for none (then it is
``True``/``False``), or it is refused: no primitive keeps whole rows.

Anything else is refused with a :class:`~attncc.errors.TraceError` that quotes
the comparison as written and says why; nothing falls back to a dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attncc.errors import TraceError
from attncc.ir.grid import Grid
from attncc.ir.nodes import (
    Pattern,
    band,
    block_diagonal,
    congruent,
    document,
    intersection,
    key_range,
    sliding_window,
    strided,
    union,
)
from attncc.trace import Cond, Int, Table

MAX_RESIDUES = 8  # a modulo comparison may expand to at most this many congruences
_FLAT = -1
_NEGATED = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}

Formula = Pattern | bool


@dataclass(frozen=True)
class Lin:
    """``sum(coef * atom) + const``; an atom is ``("var", side, axis)``,
    ``("floordiv", Lin, b)``, ``("mod", Lin, m)`` or ``("lookup", Table, var atom)``."""

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
    if kind == "lookup":
        table, index = args
        inner = normal_form(index)
        bare = isinstance(inner, Lin) and len(inner.terms) == 1 and not inner.const
        if not (bare and inner.terms[0][1] == 1 and inner.terms[0][0][0] == "var"):  # type: ignore[union-attr]
            raise TraceError(
                f"{node.text}: a lookup is indexed by one coordinate of q or k, not {index.text}"
            )
        return Lin(((("lookup", table, inner.terms[0][0]), 1),), 0)
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


def _clip(
    solved: tuple[bool, int | None, int | None] | bool, size: int
) -> tuple[int, int, int | None] | bool:
    """``solved`` (from :func:`_solve`) on the integers ``0 .. size - 1``: a bool when all or
    none qualify, else ``(lo, hi, None)`` for ``lo .. hi`` or ``(0, size - 1, v)`` for all but ``v``."""
    if isinstance(solved, bool):
        return solved
    inside, lo, hi = solved
    if not inside:
        if not 0 <= lo < size:  # type: ignore[operator]
            return True
        return False if size == 1 else (0, size - 1, lo)
    lo = 0 if lo is None else max(lo, 0)
    hi = size - 1 if hi is None else min(hi, size - 1)
    if lo > hi:
        return False
    return True if (lo, hi) == (0, size - 1) else (lo, hi, None)


class Matcher:
    """Turns the traced condition of one predicate into a pattern on one grid."""

    def __init__(self, grid: Grid, names: tuple[str, ...]) -> None:
        self.grid, self.names = grid, names
        self.spelled: dict[tuple[str, int], str] = {}  # how the comparison being matched names each var

    def formula(self, cond: Cond | bool, negate: bool = False) -> Formula:
        if isinstance(cond, bool):
            return cond != negate
        if cond.kind == "const":
            return cond.args[0] != negate
        if cond.kind == "pattern":
            if negate:
                why = (
                    "keeps keys given at call time; its complement has no pattern (negate the tensor instead)"
                )
                raise TraceError(f"~({cond.text}): {cond.text} {why}")
            return cond.args[0]
        if cond.kind == "not":
            return self.formula(cond.args[0], not negate)
        if cond.kind in ("and", "or"):
            parts = [self.formula(c, negate) for c in cond.args]
            return _all(parts) if (cond.kind == "and") != negate else _any(parts)
        op, left, right = cond.args
        op = _NEGATED[op] if negate else op
        where = f"~({cond.text})" if negate else cond.text
        self.spelled = {}
        _spell(left, self.spelled)
        _spell(right, self.spelled)
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
            return self.spelled.get((side, axis), f"{side}.{'index' if axis == _FLAT else self.names[axis]}")
        if atom[0] == "lookup":
            return f"{atom[1].name}[{self.name(atom[2])}]"
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

    def extent(self, axis: int) -> int:
        """How many values a coordinate takes on ``axis`` (``_FLAT``: the flat index)."""
        return self.grid.size if axis == _FLAT else self.grid.shape[axis]

    def linear(self, lin: Lin, op: str, where: str) -> Formula:
        terms = dict(lin.terms)
        if not terms:
            return _holds(lin.const, op)
        kinds = {atom[0] for atom in terms}
        if "lookup" in kinds:
            return self.lookups(lin, op, where)
        if kinds == {"var"}:
            return self.alone(lin, op, where) if len(terms) == 1 else self.offsets(lin, op, where)
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
        if len({a[2] for a in atoms}) > 1:
            return "it compares different axes: " + ", ".join(self.name(a) for a in atoms)
        return "q and k do not appear as a difference k - q (their coefficients differ)"

    def alone(self, lin: Lin, op: str, where: str) -> Formula:
        """``c * x + const op 0`` with ``x`` one coordinate: a key range, or a query condition
        that must hold for every query or for none."""
        ((atom, c),) = lin.terms
        _, side, axis = atom
        within = _clip(_solve(c, -lin.const, op), self.extent(axis))
        if isinstance(within, bool):
            return within
        if side == "q":
            raise self.refuse(
                where,
                lin,
                op,
                f"it is a condition on the query alone ({self.name(atom)}), which holds for some "
                "queries only; a pattern can restrict the keys alone (key_range) but not the queries",
            )
        lo, hi, skip = within
        if skip is None:
            return self.keys(axis, lo, hi)
        return _any([self.keys(axis, lo, skip - 1), self.keys(axis, skip + 1, hi)])

    def keys(self, axis: int, lo: int, hi: int) -> Formula:
        """The keys ``lo <= k <= hi`` on ``axis`` (``_FLAT``: the flat index), for every query.

        Note [Flat key ranges]: on a 2-D/3-D grid, ``k.index >= lo`` is the lexicographic
        order of the coordinates: ``k.t > t0``, or ``k.t == t0`` and the same on the
        remaining axes (and likewise ``<=``), which are key ranges per axis.
        """
        top = self.extent(axis) - 1
        if lo > hi:
            return False
        if (lo, hi) == (0, top):
            return True
        if axis != _FLAT:
            return key_range(axis, None if lo == 0 else lo, None if hi == top else hi)
        low = np.unravel_index(lo, self.grid.shape)
        high = np.unravel_index(hi, self.grid.shape)
        return _all(
            [
                self._lexicographic(tuple(map(int, low)), 0, True) if lo > 0 else True,
                self._lexicographic(tuple(map(int, high)), 0, False) if hi < top else True,
            ]
        )

    def _lexicographic(self, bound: tuple[int, ...], a: int, above: bool) -> Formula:
        """Keys whose coordinates from axis ``a`` on are ``>=`` (``above``) or ``<=`` ``bound[a:]``."""
        c, top = bound[a], self.grid.shape[a] - 1
        weak = self.keys(a, c, top) if above else self.keys(a, 0, c)
        if a == self.grid.rank - 1:
            return weak
        rest = self._lexicographic(bound, a + 1, above)
        if rest is True:
            return weak
        strict = self.keys(a, c + 1, top) if above else self.keys(a, 0, c - 1)
        return _any([strict, _all([self.keys(a, c, c), rest])])

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
        """``c * (x // b) op r`` or ``c * (x % m) op r`` with ``x`` a difference ``k - q + c0``
        (or, for ``//``, any linear ``x`` that :meth:`linear` matches: one coordinate alone)."""
        ((atom, c),) = lin.terms
        kind, inner, divisor = atom
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
        found = self.difference(inner)
        if found is None:
            what = "a coordinate alone" if len(inner.terms) == 1 else "no difference k - q of one axis"
            raise self.refuse(
                where,
                lin,
                op,
                f"{self.name(atom)} is of {what}; % is supported on a difference "
                "((k.x - q.x) % m op c) or on a coordinate compared with the same of the other token "
                "(q.x % m == k.x % m)",
            )
        axis, sign = found  # x = sign * (k - q) + c0
        if abs(sign) != 1:
            raise self.refuse(where, lin, op, f"{self.name(atom)} is of a multiple of k - q")
        # The residues s in 0 .. m - 1 with c * s + const op 0, in closed form (m may be huge).
        within = _clip(_solve(c, -lin.const, op), divisor)
        if isinstance(within, bool):
            return within
        lo, hi, skip = within
        count = hi - lo + 1 - (skip is not None)
        if count > MAX_RESIDUES:
            raise self.refuse(
                where, lin, op, f"it keeps {count} residues mod {divisor}; at most {MAX_RESIDUES}"
            )
        residues = [s for s in range(lo, hi + 1) if s != skip]
        # x == s (mod m)  <=>  k - q == sign * (s - c0)  <=>  (q - k) % m == sign * (c0 - s) % m
        c0 = inner.const
        return _any([self.congruent(axis, divisor, (sign * (c0 - s)) % divisor) for s in residues])

    def same_class(self, lin: Lin, op: str, where: str) -> Formula:
        """``q.x // b - k.x // b`` or ``q.x % m - k.x % m`` compared with a constant."""
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
        k_first = var1[1] == "k"  # type: ignore[index]
        qname, kname = (self.name(v) for v in ((var2, var1) if k_first else (var1, var2)))  # type: ignore[arg-type]
        if kind == "floordiv":
            return self.blocks(axis, divisor, c1 if k_first else c2, lin, op, where, (qname, kname))
        if lin.const == 0 and op == "==":
            return self.congruent(axis, divisor, 0)
        if lin.const == 0 and op == "!=":
            if divisor - 1 > MAX_RESIDUES:
                raise self.refuse(
                    where, lin, op, f"it keeps {divisor - 1} residues mod {divisor}; at most {MAX_RESIDUES}"
                )
            return _any([self.congruent(axis, divisor, o) for o in range(1, divisor)])
        why = (
            f"only equal or unequal residues ({qname} % {divisor} == / != {kname} % {divisor}) have a pattern"
        )
        raise self.refuse(where, lin, op, why)

    def blocks(
        self, axis: int, size: int, c: int, lin: Lin, op: str, where: str, names: tuple[str, str]
    ) -> Formula:
        """``c * (K - Q) + const op 0`` for the blocks ``K = k.x // size``, ``Q = q.x // size``.

        With ``d = k.x - q.x``: ``K - Q <= 0`` is ``d <= 0 or K == Q`` (a later key in the
        query's block has ``K == Q``; an earlier key has ``K <= Q``), and ``K - Q >= 0`` is
        ``d >= 0 or K == Q``: block-causal, as bands joined with ``block_diagonal``.
        """
        top = (self.extent(axis) - 1) // size  # K - Q lies in [-top, top]
        solved = _solve(c, -lin.const, op)
        if isinstance(solved, bool):
            return solved
        inside, lo, hi = solved
        if not inside:
            if not -top <= lo <= top:  # type: ignore[operator]
                return True
        else:
            if (lo is not None and lo > top) or (hi is not None and hi < -top):
                return False
            lo = None if lo is None or lo <= -top else lo
            hi = None if hi is None or hi >= top else hi
            if lo is None and hi is None:
                return True
            if lo == hi == 0:
                return self.block(axis, size)
            if lo is None and hi == 0:
                return _any([self.band(axis, None, 0, where), self.block(axis, size)])
            if lo == 0 and hi is None:
                return _any([self.band(axis, 0, None, where), self.block(axis, size)])
        qname, kname = names
        why = (
            f"only equal blocks ({qname} // {size} == {kname} // {size}) and block-causal ones "
            f"({kname} // {size} <= {qname} // {size}, or >=) have a pattern"
        )
        raise self.refuse(where, lin, op, why)

    def lookups(self, lin: Lin, op: str, where: str) -> Formula:
        """``t[q.x] - t[k.x] == 0``: the documents of ``t``'s values (``document``)."""
        atoms = [a for a, _ in lin.terms]
        pair = len(atoms) == 2 and all(a[0] == "lookup" for a in atoms)
        if not (
            pair
            and atoms[0][1] == atoms[1][1]
            and {a[2][1] for a in atoms} == {"q", "k"}
            and atoms[0][2][2] == atoms[1][2][2]
            and sorted(c for _, c in lin.terms) == [-1, 1]
            and lin.const == 0
        ):
            raise self.refuse(
                where,
                lin,
                op,
                "lookups compare as t[q] == t[k]: one tensor, at the same coordinate of q and k",
            )
        table, (_, _, axis) = atoms[0][1], atoms[0][2]
        if op != "==":
            raise self.refuse(
                where, lin, op, f"only equal values ({self.show(lin)} == 0: document) have a pattern"
            )
        return self.document(table, axis, where)

    def document(self, table: Table, axis: int, where: str) -> Pattern:
        """``document`` with the id of each flat token read from ``table`` at its ``axis`` coordinate."""
        extent = self.extent(axis)
        if len(table.values) < extent:
            raise TraceError(
                f"cannot express {where}: {table.name} has {len(table.values)} entries, but it is "
                f"read at coordinates up to {extent - 1}"
            )
        flat = np.arange(self.grid.size)
        at = flat if axis == _FLAT or self.grid.rank == 1 else np.unravel_index(flat, self.grid.shape)[axis]
        first_seen: dict[int, int] = {}  # ids >= 0, in order of appearance
        return document(tuple(first_seen.setdefault(table.values[i], len(first_seen)) for i in at.tolist()))

    def block(self, axis: int, size: int) -> Pattern:
        if axis != _FLAT:
            return block_diagonal(axis, size)
        return document(tuple(i // size for i in range(self.grid.size)))

    def congruent(self, axis: int, modulus: int, offset: int) -> Pattern:
        return congruent(axis, modulus, offset) if axis != _FLAT else strided(modulus, offset)


def _spell(node: Int, out: dict[tuple[str, int], str]) -> None:
    """Record the text of each coordinate leaf of ``node`` (the first spelling wins)."""
    if node.kind == "var":
        out.setdefault(node.args, node.text)
    elif node.kind == "lookup":
        _spell(node.args[1], out)
    elif node.kind != "const":
        for arg in node.args:
            if isinstance(arg, Int):
                _spell(arg, out)

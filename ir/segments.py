"""Token spaces of segments and a pattern per pair of segments (issue 16 part 4).

A sequence made of segments, each a 1-D run or a 1-3-D grid, one after the other: 226 text
tokens then a 16×48×48 video, a class token and 4 registers then a 2-D image::

    from attncc.ir import by_segments, dense, neighborhood, segments
    space = segments(text=226, video=(16, 48, 48))
    p = by_segments(space, {
        ("text", "*"): dense(),                         # text sees everything
        ("video", "video"): neighborhood((7, 15, 15)),  # video sees its neighbourhood
        ("video", "text"): dense(),                     # and every text token
    })

Note [Segment spaces]: token order is the segments' order, each segment's tokens row-major on
its own grid, so segment ``s`` holds flat tokens ``offsets[s] .. offsets[s] + sizes[s] - 1``
of the whole space (``Segments.offsets``). A pattern is given per (query segment, key
segment) pair and read on the two segments' own coordinates:

- a pair of one segment with itself: any pattern, on that segment's grid, exactly as it would
  be on that grid alone (a neighborhood clamps at the segment's borders, causal compares
  positions in the segment);
- a pair of two segments: only patterns that compare no query's place with a key's, those of
  cross-attention (:func:`attncc.ir.validate.validate_cross`, Note [Cross-attention] in
  attncc.runtime.cross): ``dense()``, ``key_range(0, ...)`` on a 1-D key segment, and their
  unions, intersections and ``per_head``;
- pairs not listed see nothing; ``"*"`` on either side stands for every segment, and each
  concrete pair may be named by one entry only (two would leave it unclear whether they are
  meant as a union).

Primitives whose data are given at call time are refused inside pairs for now: their data are
per flat token of one grid, and which grid (a segment's or the whole space's) is a choice for
the stage that adds them. A :class:`BySegments` carries its space, so it is a whole pattern
only: it is never an operand of ``|``, ``&`` or ``per_head`` (Note [Root-only nodes] in
attncc.ir.nodes), and :func:`attncc.ir.validate.validate` refuses it on a grid, which is how
every front door that has no segment path (the kernels, ``SparseAttention``, ``@attncc.jit``,
the CLI's commands other than ``analyze``) says so, naming the field.

Done here: the IR (this module, its text form in attncc.ir.text), its checks
(:func:`attncc.ir.validate.validate_segments`), the oracle (:func:`attncc.ir.mask.mask` over
the whole space, :func:`attncc.reference.attention` on ``[B, H, N, D]`` tensors of the whole
space, gradients through autograd), analysis over the whole space
(:func:`attncc.ir.analysis.analyze_segments`, each segment tiled on its own grid: Note [Segment
tile maps] there), spec files with a ``segments:`` field (attncc.ir.spec) and ``attncc analyze``
of them (``--png`` included).

The kernels (Note [Segment kernels] in attncc.lower.segments) run the whole space as one
forward launch, one dQ and one dK/dV, each segment tiled on its own grid, every pair walked from
tile lists with its rule per element on partial tiles: ``attncc.attention(q, k, v,
by_segments(...))`` on ``[B, H, N, D]`` tensors with ``N = space.size``, GQA and MQA, softmax
with a scale and an optional soft-cap, as torch.library ops (attncc.runtime.segments);
``attncc.nn.SparseAttention(dim, heads, by_segments(...))`` on ``[B, N, dim]``; ``attncc
inspect`` of a spec with ``segments:`` (their sm_90 profile: attncc.machine.segments).
``@attncc.jit`` refuses a space of segments, naming the field.

Not done yet: score terms other than the soft-cap, and dropout, in the kernels (relative-position
terms would stay refused across segments and could be allowed within a same-segment pair;
``attncc.reference.attention`` takes them all but those), ``per_head`` pairs in the
kernels, the closed-form KV ranges of the one-grid kernels for same-segment pairs (the lists'
loads, not tiles, would be saved), a pattern of segments built inside a torch.compile region
(one built before it compiles: Note [Segment ops] in attncc.runtime.segments), ``attncc
compile``/``tune``/``bench`` of a spec of segments, primitives whose data are given at call time
inside pairs, and a predicate over (segment, coordinates) for ``@attncc.jit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from attncc.errors import PatternError, field_error
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern, _set_depth

WILDCARD = "*"
"""Stands for every segment on either side of a pair."""

Pair = tuple[str, str]


@dataclass(frozen=True)
class Segments:
    """A token space made of named segments, each a 1-3-D grid, in token order (Note [Segment
    spaces]). ``Segments(("text", "video"), ((226,), (16, 48, 48)))``; build it with
    :func:`segments`."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        names, shapes = tuple(self.names), tuple(self.shapes)
        if not names or len(names) != len(shapes):
            raise field_error(PatternError, "segments", len(names), "one or more named segments")
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name.isidentifier():
                raise field_error(PatternError, f"segments.names[{i}]", name, "a Python identifier")
        if len(set(names)) != len(names):
            raise field_error(PatternError, "segments.names", names, "distinct names")
        grids = []
        for name, shape in zip(names, shapes):
            try:
                grids.append(Grid(shape))
            except PatternError as e:
                allowed = "an integer >= 1 (a 1-D run) or a tuple of 1-3 integers >= 1 (a grid)"
                raise field_error(PatternError, f"segments.{name}", shape, allowed) from e
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "shapes", tuple(g.shape for g in grids))

    @property
    def grids(self) -> tuple[Grid, ...]:
        return tuple(Grid(shape) for shape in self.shapes)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Tokens per segment."""
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """The flat index of each segment's first token in the whole space."""
        out, total = [], 0
        for size in self.sizes:
            out.append(total)
            total += size
        return tuple(out)

    @property
    def size(self) -> int:
        """Number of tokens N of the whole space."""
        return sum(self.sizes)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise field_error(PatternError, "segment", name, f"one of {', '.join(self.names)}")
        return self.names.index(name)

    def __str__(self) -> str:
        parts = [f"{n}={s[0] if len(s) == 1 else s}" for n, s in zip(self.names, self.shapes)]
        return f"segments({', '.join(parts)})"


@dataclass(frozen=True)
class BySegments(Pattern):
    """A pattern per pair of segments of ``space`` (Note [Segment spaces]): ``pairs`` holds
    ``((query segment, key segment), pattern)`` entries in the order given, ``"*"`` for every
    segment. Checked against the space when built, except for the head count
    (:func:`attncc.ir.validate.validate_segments`)."""

    NAME: ClassVar[str] = "by_segments"
    ROOT_ONLY: ClassVar[bool] = True
    space: Segments
    pairs: tuple[tuple[Pair, Pattern], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.space, Segments):
            raise field_error(PatternError, "by_segments.space", self.space, "segments(name=shape, ...)")
        pairs = tuple(self.pairs.items()) if isinstance(self.pairs, dict) else tuple(self.pairs)
        if not pairs:
            raise field_error(PatternError, "by_segments.pairs", pairs, "at least one (q, k) entry")
        owner: dict[Pair, Pair] = {}  # each concrete pair -> the entry that names it
        checked = []
        for entry in pairs:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise field_error(PatternError, "by_segments.pairs entry", entry, "((q, k), pattern)")
            key, pattern = entry
            key = tuple(key) if isinstance(key, (list, tuple)) else key
            allowed = f"(q, k) with each one of {', '.join(self.space.names)} or {WILDCARD!r}"
            if not (isinstance(key, tuple) and len(key) == 2):
                raise field_error(PatternError, "by_segments.pairs key", key, allowed)
            for name in key:
                if name != WILDCARD and name not in self.space.names:
                    raise field_error(PatternError, f"by_segments.pairs[{key!r}]", name, allowed)
            if not isinstance(pattern, Pattern) or pattern.ROOT_ONLY:
                allowed = "a pattern (no nested by_segments)"
                raise field_error(PatternError, f"by_segments.pairs[{key!r}]", str(pattern), allowed)
            if pattern.runtime_leaves:
                why = "data given at call time are not defined over segments yet (Note [Segment spaces])"
                shown = str(pattern.runtime_leaves[0])
                raise field_error(PatternError, f"by_segments.pairs[{key!r}]", shown, "static patterns", why)
            for concrete in _expand(key, self.space):
                if concrete in owner:
                    why = f"{concrete!r} is named by {owner[concrete]!r} too"
                    allowed = "one entry per (q, k) pair of segments"
                    raise field_error(PatternError, f"by_segments.pairs[{key!r}]", str(pattern), allowed, why)
                owner[concrete] = key
            checked.append((key, pattern))
        object.__setattr__(self, "pairs", tuple(checked))
        _set_depth(self)
        from attncc.ir.validate import check_segment_pairs  # it imports this module

        check_segment_pairs(self)

    @property
    def children(self) -> tuple[Pattern, ...]:
        return tuple(pattern for _, pattern in self.pairs)

    def pattern_of(self, q: str, k: str) -> Pattern | None:
        """The pattern of the (q, k) pair of segment names, or None where it sees nothing."""
        for key, pattern in self.pairs:
            if (q, k) in _expand(key, self.space):
                return pattern
        return None

    def listed(self) -> list[tuple[int, int, Pattern]]:
        """``(q segment index, k segment index, pattern)`` of every pair that sees something, in
        segment order."""
        names = self.space.names
        out = []
        for i, q in enumerate(names):
            for j, k in enumerate(names):
                pattern = self.pattern_of(q, k)
                if pattern is not None:
                    out.append((i, j, pattern))
        return out


def _expand(key: Pair, space: Segments) -> set[Pair]:
    qs = space.names if key[0] == WILDCARD else (key[0],)
    ks = space.names if key[1] == WILDCARD else (key[1],)
    return {(q, k) for q in qs for k in ks}


def segments(**shapes: int | tuple[int, ...]) -> Segments:
    """A token space of segments in the order given: ``segments(text=226, video=(16, 48, 48))``
    (Note [Segment spaces])."""
    return Segments(tuple(shapes), tuple(s if isinstance(s, tuple) else (s,) for s in shapes.values()))


def by_segments(space: Segments, pairs: dict[Pair, Pattern]) -> BySegments:
    """A pattern per pair of segments of ``space``: ``{("text", "*"): dense(), ...}``, a key
    ``(query segment, key segment)`` with ``"*"`` for every segment; unlisted pairs see nothing
    (Note [Segment spaces])."""
    if not isinstance(pairs, dict):
        raise field_error(PatternError, "by_segments.pairs", type(pairs).__name__, "a dict {(q, k): pattern}")
    return BySegments(space, tuple(pairs.items()))

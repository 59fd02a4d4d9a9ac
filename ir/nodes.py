"""Pattern IR nodes: primitives and combinators as frozen dataclasses.

A pattern is a predicate ``keep(head, q, k)`` over grid coordinates. Nodes hold
only what the user wrote (lists become tuples, nothing else is changed), so
``parse(str(p)) == p`` holds exactly; :mod:`attncc.ir.canonical` binds a grid
and rewrites to the canonical form. Parameters that can be checked without a
grid are checked here; those that need the grid are checked by
:func:`attncc.ir.validate.validate`.

Note [Union flattening]: ``a | (b | c)`` and ``(a | b) | c`` build the same
n-ary :class:`Union` (likewise for ``&``). The text form cannot show the
brackets the user meant to be irrelevant, so the nodes must not keep them.

Note [Nesting limit]: combinators nest at most :data:`MAX_DEPTH` deep. The
text form, the parser and every pass over a pattern recurse once per level,
and Python's stack (and its parser's) is bounded; a pattern nested deeper
than any real one (a few levels) is refused when it is built, with the limit
named, instead of failing later with a RecursionError. Width is not limited:
a union of thousands of operands is one level (Note [Wide combinators] in
attncc.ir.text).

Note [Runtime data]: ``block_mask``, ``topk_blocks``, ``documents``, ``key_lengths`` and
``key_mask`` declare a primitive whose data (a tensor, per batch element and
per head) is given at call time, ``attncc.attention(..., data={...})``: the node
holds the structure only (block sizes), so the kernel is specialised to it and
new data reuse the kernel (attncc.runtime.data checks and normalises the
tensors). A pattern holds at most one leaf of each kind, since the data are
keyed by kind: a second one is refused where it meets the first, even an equal
one (``(documents() & a) | (documents() & b)`` is written
``documents() & (a | b)``), so the lowering combines each kind's data once.
Their data carry heads, so ``per_head`` refuses an entry that holds one.

Note [Root-only nodes]: a node with ``ROOT_ONLY`` set (:class:`attncc.ir.segments.BySegments`,
which carries a token space of its own) is a whole pattern, never an operand: a union, an
intersection or a ``per_head`` reads all its operands on one grid, which such a node does not
live on. They refuse it where they are built.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from attncc.errors import PatternError, field_error, form_error

IntOrTuple = int | tuple[int, ...]
MAX_DEPTH = 64  # Note [Nesting limit]
BoolOrTuple = bool | tuple[bool, ...]


class Pattern:
    """Base class of every IR node. ``|`` is union, ``&`` intersection."""

    NAME: ClassVar[str]
    ROOT_ONLY: ClassVar[bool] = False  # Note [Root-only nodes]

    def __or__(self, other: Pattern) -> Pattern:
        return union(self, other)

    def __and__(self, other: Pattern) -> Pattern:
        return intersection(self, other)

    def __str__(self) -> str:
        from attncc.ir.text import format_pattern

        return format_pattern(self)

    @property
    def children(self) -> tuple[Pattern, ...]:
        return ()

    def __fx_repr__(self) -> tuple[str, dict[str, Any]]:
        """An expression that rebuilds the node, for torch.compile's graph code (Note [Patterns
        under torch.compile] in attncc.runtime.dynamo): its text, parsed."""
        from attncc.ir.text import format_pattern, parse

        return f"parse({format_pattern(self)!r})", {"parse": parse}

    @property
    def depth(self) -> int:
        """Combinator levels above the primitives: 0 for a primitive (Note [Nesting limit])."""
        return self.__dict__.get("_depth", 0)

    @property
    def runtime_leaves(self) -> tuple[RuntimePrimitive, ...]:
        """The distinct primitives under this node whose data are given at call time, at most
        one of each kind, in the order first met (Note [Runtime data])."""
        return self.__dict__.get("_runtime", ())


class RuntimePrimitive(Pattern):
    """Base class of the primitives whose data are given at call time (Note [Runtime data]).

    ``DATA`` names the keys of ``attncc.attention(..., data=...)`` that give them (one of
    them per call).
    """

    DATA: ClassVar[tuple[str, ...]]

    @property
    def runtime_leaves(self) -> tuple[RuntimePrimitive, ...]:
        return (self,)


def _set_depth(node: Pattern) -> None:
    """Record ``node``'s depth, from its operands' (already recorded: they were built first)."""
    depth = 1 + max(child.depth for child in node.children)
    if depth > MAX_DEPTH:
        allowed = f"at most {MAX_DEPTH} levels of union/intersection/per_head (Note [Nesting limit])"
        raise field_error(PatternError, f"{node.NAME} nesting depth", depth, allowed)
    object.__setattr__(node, "_depth", depth)


# --- parameter checks (grid-independent) -----------------------------------


def _freeze(value: Any) -> Any:
    """Lists (from text, YAML or JSON) become tuples so nodes stay hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _check_int(field_name: str, value: Any, low: int, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise field_error(PatternError, field_name, value, allowed)


def _check_per_axis(field_name: str, value: Any, low: int) -> None:
    allowed = f"an integer >= {low} or a tuple of 1-3 such integers"
    if isinstance(value, tuple):
        if not 1 <= len(value) <= 3:
            raise field_error(PatternError, field_name, value, allowed)
        for i, v in enumerate(value):
            _check_int(f"{field_name}[{i}]", v, low, f"an integer >= {low}")
    else:
        _check_int(field_name, value, low, allowed)


def _check_bool_per_axis(field_name: str, value: Any) -> None:
    allowed = "true/false or a tuple of 1-3 of them"
    items = value if isinstance(value, tuple) else (value,)
    if not 1 <= len(items) <= 3 or not all(isinstance(v, bool) for v in items):
        raise field_error(PatternError, field_name, value, allowed)


def _set(node: Any, name: str, value: Any) -> None:
    object.__setattr__(node, name, value)


def _set_runtime(node: Pattern) -> None:
    """Record the runtime leaves under ``node`` (its operands' are recorded: they were built
    first), refusing a second leaf of one kind (Note [Runtime data])."""
    leaves: dict[str, RuntimePrimitive] = {}
    for child in node.children:  # each holds at most one leaf of a kind
        for leaf in child.runtime_leaves:
            if leaf.NAME in leaves:
                allowed = f"one {leaf.NAME} leaf per pattern (its data are given once, under its key)"
                why = f"the first is {leaves[leaf.NAME]}; factor it out: {leaf.NAME}(...) & (a | b)"
                raise field_error(PatternError, f"second {leaf.NAME} leaf", str(leaf), allowed, why)
            leaves[leaf.NAME] = leaf
    if leaves:
        object.__setattr__(node, "_runtime", tuple(leaves.values()))


# --- primitives --------------------------------------------------------------


@dataclass(frozen=True)
class Dense(Pattern):
    """Every query sees every key."""

    NAME: ClassVar[str] = "dense"


@dataclass(frozen=True)
class Neighborhood(Pattern):
    """Generalized neighborhood attention (NATTEN / GNA semantics), per axis.

    Per axis of length ``L``: queries and keys interact only inside the same
    dilation group (``coord % dilation``); within a group of ``Lg`` tokens a
    query sees ``window`` consecutive group members. Queries are gathered into
    stride groups of ``stride`` consecutive group members that all share the
    window of a leader (the centre member, right-of-centre for even strides;
    the last member when causal). Non-causal windows are clamped at the
    borders so every query sees exactly ``window`` keys per axis; causal
    windows end at the query and are cut at 0. An int applies to every axis.
    """

    NAME: ClassVar[str] = "neighborhood"
    window: IntOrTuple
    dilation: IntOrTuple = 1
    stride: IntOrTuple = 1
    causal: BoolOrTuple = False

    def __post_init__(self) -> None:
        for name in ("window", "dilation", "stride", "causal"):
            _set(self, name, _freeze(getattr(self, name)))
        _check_per_axis("neighborhood.window", self.window, 1)
        _check_per_axis("neighborhood.dilation", self.dilation, 1)
        _check_per_axis("neighborhood.stride", self.stride, 1)
        _check_bool_per_axis("neighborhood.causal", self.causal)


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Band ``q - left <= k <= q + right`` on the flat index (unclamped)."""

    NAME: ClassVar[str] = "sliding_window"
    left: int
    right: int = 0

    def __post_init__(self) -> None:
        _check_int("sliding_window.left", self.left, 0, "an integer >= 0")
        _check_int("sliding_window.right", self.right, 0, "an integer >= 0")


@dataclass(frozen=True)
class Causal(Pattern):
    """``k <= q`` on the flat (row-major) index."""

    NAME: ClassVar[str] = "causal"


@dataclass(frozen=True)
class Axial(Pattern):
    """Attend along the listed axes only: keep when q and k agree on every
    other axis, for at least one listed axis (default: every axis)."""

    NAME: ClassVar[str] = "axial"
    axes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        axes = self.axes
        if axes is None:
            return
        axes = _freeze(axes) if isinstance(axes, (list, tuple)) else (axes,)
        if not axes:
            raise field_error(PatternError, "axial.axes", axes, "a non-empty tuple of axes 0-2")
        for i, a in enumerate(axes):
            _check_int(f"axial.axes[{i}]", a, 0, "an axis index 0-2")
        _set(self, "axes", axes)


@dataclass(frozen=True)
class Strided(Pattern):
    """``(q - k) % stride == offset`` on the flat index (Sparse Transformer)."""

    NAME: ClassVar[str] = "strided"
    stride: int
    offset: int = 0

    def __post_init__(self) -> None:
        _check_int("strided.stride", self.stride, 1, "an integer >= 1")
        if (
            isinstance(self.offset, bool)
            or not isinstance(self.offset, int)
            or not (0 <= self.offset < self.stride)
        ):
            raise field_error(
                PatternError, "strided.offset", self.offset, f"0..{self.stride - 1} (stride - 1)"
            )


@dataclass(frozen=True)
class BlockSparse(Pattern):
    """A static 0/1 layout over blocks of ``block`` flat tokens.

    ``layout[i][j] == 1`` keeps query block i against key block j. A 3-D
    layout ``[heads][i][j]`` gives each head its own layout.
    """

    NAME: ClassVar[str] = "block_sparse"
    layout: tuple
    block: int

    def __post_init__(self) -> None:
        if not isinstance(self.layout, (list, tuple)):
            shape = getattr(self.layout, "shape", None)
            value = f"<{type(self.layout).__name__}{list(shape) if shape is not None else ''}>"
            expected = "nested lists of 0/1"
            why = (
                "for a static layout pass layout.tolist(); for one given at call time use "
                "block_mask(block) and attncc.attention(..., data={'block_mask': layout})"
            )
            raise form_error(PatternError, "block_sparse.layout", value, expected, why)
        _set(self, "layout", _freeze(self.layout))
        _check_int("block_sparse.block", self.block, 1, "an integer >= 1")
        depth, node = 0, self.layout
        while isinstance(node, tuple):
            if not node:
                raise field_error(PatternError, "block_sparse.layout", self.layout, "non-empty rows")
            depth, node = depth + 1, node[0]
        if depth not in (2, 3):
            raise field_error(
                PatternError,
                "block_sparse.layout",
                f"<{depth}-D>",
                "a 2-D [q_blocks][kv_blocks] or 3-D [heads][q_blocks][kv_blocks] 0/1 array",
            )
        mats = self.layout if depth == 3 else (self.layout,)
        rows, cols = len(mats[0]), len(mats[0][0])
        for h, mat in enumerate(mats):
            if not isinstance(mat, tuple) or len(mat) != rows:
                raise field_error(
                    PatternError, "block_sparse.layout", "<ragged>", f"{rows} rows in every head"
                )
            for i, row in enumerate(mat):
                if not isinstance(row, tuple) or len(row) != cols:
                    raise field_error(
                        PatternError, "block_sparse.layout", "<ragged>", f"{cols} columns per row"
                    )
                for j, v in enumerate(row):
                    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v not in (0, 1):
                        where = f"[{h}][{i}][{j}]" if depth == 3 else f"[{i}][{j}]"
                        raise field_error(
                            PatternError, f"block_sparse.layout{where}", v, "0 or 1 (an integer)"
                        )
        # Note [Layout entries]: numpy integers are taken as the ints they equal, so the node,
        # its text and every memo keyed by it see plain 0/1 (np.int64(1) has no text form).
        # Floats are refused above even where they equal 0 or 1: 1.0 == 1 shares a dict key,
        # so a float layout must never get as far as a memo.
        if depth == 3:
            _set(self, "layout", tuple(tuple(tuple(int(v) for v in row) for row in m) for m in mats))
        else:
            _set(self, "layout", tuple(tuple(int(v) for v in row) for row in self.layout))

    @property
    def per_head(self) -> bool:
        return isinstance(self.layout[0][0], tuple)


@dataclass(frozen=True)
class GlobalTokens(Pattern):
    """The listed flat token indices see every key and are seen by every query."""

    NAME: ClassVar[str] = "global_tokens"
    indices: tuple[int, ...]

    def __post_init__(self) -> None:
        idx = _freeze(self.indices) if isinstance(self.indices, (list, tuple)) else (self.indices,)
        if not idx:
            raise field_error(PatternError, "global_tokens.indices", idx, "at least one index")
        for i, v in enumerate(idx):
            _check_int(f"global_tokens.indices[{i}]", v, 0, "a flat token index >= 0")
        _set(self, "indices", idx)


@dataclass(frozen=True)
class Document(Pattern):
    """Packed sequences: keep when ``ids[q] == ids[k]`` (one id per flat token)."""

    NAME: ClassVar[str] = "document"
    ids: tuple[int, ...]

    def __post_init__(self) -> None:
        ids = _freeze(self.ids)
        if not isinstance(ids, tuple) or not ids:
            raise field_error(PatternError, "document.ids", ids, "one integer id per token")
        for i, v in enumerate(ids):
            _check_int(f"document.ids[{i}]", v, 0, "an integer id >= 0")
        _set(self, "ids", ids)


def _check_axis(field_name: str, value: Any) -> None:
    _check_int(field_name, value, 0, "an axis index 0-2")
    if value > 2:
        raise field_error(PatternError, field_name, value, "an axis index 0-2")


@dataclass(frozen=True)
class Band(Pattern):
    """Keep when ``lo <= k[axis] - q[axis] <= hi`` on one grid axis (unclamped).

    ``None`` leaves that side open: ``band(0, hi=0)`` is causal along axis 0,
    ``band(1, -3, 3)`` a window of 7 rows that, unlike a neighborhood, is cut
    (not shifted) at the borders. The band need not hold the diagonal.
    """

    NAME: ClassVar[str] = "band"
    axis: int
    lo: int | None = None
    hi: int | None = None

    def __post_init__(self) -> None:
        _check_axis("band.axis", self.axis)
        for name in ("lo", "hi"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise field_error(PatternError, f"band.{name}", value, "an integer or None (open)")
        if self.lo is None and self.hi is None:
            raise field_error(PatternError, "band.lo/hi", (None, None), "at least one bound")
        if self.lo is not None and self.hi is not None and self.hi < self.lo:
            raise field_error(PatternError, "band.hi", self.hi, f">= band.lo = {self.lo}")


@dataclass(frozen=True)
class BlockDiagonal(Pattern):
    """Keep when ``q[axis] // block == k[axis] // block``: blocks of ``block`` rows on one axis."""

    NAME: ClassVar[str] = "block_diagonal"
    axis: int
    block: int

    def __post_init__(self) -> None:
        _check_axis("block_diagonal.axis", self.axis)
        _check_int("block_diagonal.block", self.block, 1, "an integer >= 1")


@dataclass(frozen=True)
class Congruent(Pattern):
    """Keep when ``(q[axis] - k[axis]) % modulus == offset`` (``strided`` on one axis)."""

    NAME: ClassVar[str] = "congruent"
    axis: int
    modulus: int
    offset: int = 0

    def __post_init__(self) -> None:
        _check_axis("congruent.axis", self.axis)
        _check_int("congruent.modulus", self.modulus, 1, "an integer >= 1")
        if (
            isinstance(self.offset, bool)
            or not isinstance(self.offset, int)
            or not (0 <= self.offset < self.modulus)
        ):
            raise field_error(
                PatternError, "congruent.offset", self.offset, f"0..{self.modulus - 1} (modulus - 1)"
            )


@dataclass(frozen=True)
class KeyRange(Pattern):
    """Keep when ``lo <= k[axis] <= hi``, whatever the query: a condition on the key alone.

    ``None`` leaves that side open. On a 1-D grid ``key_range(0, hi=15) | causal()``
    is a prefix LM: every query sees the first 16 tokens, and the rest causally.
    Bounds past the axis are allowed (cut to it, as for :class:`Band`).
    """

    NAME: ClassVar[str] = "key_range"
    axis: int
    lo: int | None = None
    hi: int | None = None

    def __post_init__(self) -> None:
        _check_axis("key_range.axis", self.axis)
        for name in ("lo", "hi"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise field_error(PatternError, f"key_range.{name}", value, "an integer or None (open)")
        if self.lo is None and self.hi is None:
            raise field_error(PatternError, "key_range.lo/hi", (None, None), "at least one bound")
        if self.lo is not None and self.hi is not None and self.hi < self.lo:
            raise field_error(PatternError, "key_range.hi", self.hi, f">= key_range.lo = {self.lo}")


# --- primitives with data given at call time (Note [Runtime data]) -------------


def _check_block(field_name: str, value: Any) -> None:
    allowed = "an integer >= 1 (flat blocks) or a tuple of 1-3 integers >= 1 (one per grid axis)"
    if isinstance(value, tuple):
        if not 1 <= len(value) <= 3:
            raise field_error(PatternError, field_name, value, allowed)
        for i, v in enumerate(value):
            _check_int(f"{field_name}[{i}]", v, 1, "an integer >= 1")
    else:
        _check_int(field_name, value, 1, allowed)


@dataclass(frozen=True)
class BlockMask(RuntimePrimitive):
    """A block layout given at call time: keep ``(q, k)`` iff
    ``data["block_mask"][b, h, blk(q), blk(k)] != 0``.

    ``block`` an int: blocks of ``block`` consecutive flat tokens (any grid rank); a tuple
    with one size per grid axis: box blocks, numbered row-major over the grid of blocks (the
    block of a token is the row-major index of ``coord_a // block_a``). The data are a bool
    or integer tensor ``[B or 1, H or 1, QB, KB]``, ``QB = KB`` = the number of blocks.
    """

    NAME: ClassVar[str] = "block_mask"
    DATA: ClassVar[tuple[str, ...]] = ("block_mask",)
    block: IntOrTuple

    def __post_init__(self) -> None:
        _set(self, "block", _freeze(self.block))
        _check_block("block_mask.block", self.block)


@dataclass(frozen=True)
class TopkBlocks(RuntimePrimitive):
    """Top-k key blocks given at call time: keep ``(q, k)`` iff ``blk(k)`` is among
    ``data["topk_blocks"][b, h, blk(q), :]``, an integer tensor ``[B or 1, H or 1, QB, K]``
    of block indices in ``[-1, KB)`` (-1: no block). Blocks as for :class:`BlockMask`."""

    NAME: ClassVar[str] = "topk_blocks"
    DATA: ClassVar[tuple[str, ...]] = ("topk_blocks",)
    block: IntOrTuple

    def __post_init__(self) -> None:
        _set(self, "block", _freeze(self.block))
        _check_block("topk_blocks.block", self.block)


@dataclass(frozen=True)
class Documents(RuntimePrimitive):
    """Packed documents given at call time: keep ``(q, k)`` iff ``ids[b, q] == ids[b, k]``,
    from ``data["documents"]`` (integer ids ``[B or 1, N]``) or ``data["cu_seqlens"]``
    (FlashAttention's varlen offsets ``[S + 1]``: sequence s is tokens ``cu[s] .. cu[s+1] - 1``
    of every batch row; the tokens from ``cu[-1]`` on form one more document)."""

    NAME: ClassVar[str] = "documents"
    DATA: ClassVar[tuple[str, ...]] = ("documents", "cu_seqlens")


@dataclass(frozen=True)
class KeyLengths(RuntimePrimitive):
    """Key padding given at call time: keep ``(q, k)`` iff the flat index of ``k`` is below
    ``data["key_lengths"][b]`` (an integer tensor ``[B]``). A query whose keys are all cut
    gets a zero row (Note [Queries with no keys] in attncc.reference)."""

    NAME: ClassVar[str] = "key_lengths"
    DATA: ClassVar[tuple[str, ...]] = ("key_lengths",)


@dataclass(frozen=True)
class KeyMask(RuntimePrimitive):
    """Keys marked valid at call time (a KV cache's evicted or unwritten slots, padding that is
    not a suffix): keep ``(q, k)`` iff ``data["key_mask"][b, k]`` (or ``[b, h, k]``) is true, a
    bool or integer tensor (non-zero keeps) ``[B or 1, N]`` or ``[B or 1, H or 1, N]`` over the
    flat key index. A query whose keys are all masked gets a zero row (Note [Queries with no
    keys] in attncc.reference)."""

    NAME: ClassVar[str] = "key_mask"
    DATA: ClassVar[tuple[str, ...]] = ("key_mask",)


# --- combinators -------------------------------------------------------------


def _refuse_root_only(field_name: str, op: Pattern) -> None:
    """Note [Root-only nodes]."""
    if op.ROOT_ONLY:
        why = f"{op.NAME} carries its own token space; combine patterns inside its pairs instead"
        raise field_error(PatternError, field_name, op.NAME, "patterns on one grid", why)


def _flatten(cls: type, operands: Sequence[Pattern]) -> tuple[Pattern, ...]:
    out: list[Pattern] = []
    for op in operands:
        if not isinstance(op, Pattern):
            raise field_error(PatternError, f"{cls.NAME} operand", op, "a pattern")
        _refuse_root_only(f"{cls.NAME} operand", op)
        out.extend(op.operands if isinstance(op, cls) else (op,))
    return tuple(out)


@dataclass(frozen=True)
class Union(Pattern):
    """Keep where any operand keeps (see Note [Union flattening])."""

    NAME: ClassVar[str] = "union"
    operands: tuple[Pattern, ...] = field(default=())

    def __post_init__(self) -> None:
        _set(self, "operands", _flatten(Union, self.operands))
        if len(self.operands) < 2:
            raise field_error(PatternError, "union.operands", len(self.operands), "2 or more")
        _set_depth(self)
        _set_runtime(self)

    @property
    def children(self) -> tuple[Pattern, ...]:
        return self.operands


@dataclass(frozen=True)
class Intersection(Pattern):
    """Keep where every operand keeps (see Note [Union flattening])."""

    NAME: ClassVar[str] = "intersection"
    operands: tuple[Pattern, ...] = field(default=())

    def __post_init__(self) -> None:
        _set(self, "operands", _flatten(Intersection, self.operands))
        if len(self.operands) < 2:
            raise field_error(PatternError, "intersection.operands", len(self.operands), "2 or more")
        _set_depth(self)
        _set_runtime(self)

    @property
    def children(self) -> tuple[Pattern, ...]:
        return self.operands


@dataclass(frozen=True)
class PerHead(Pattern):
    """Head ``h`` uses ``patterns[h]``; the head count must equal ``len(patterns)``."""

    NAME: ClassVar[str] = "per_head"
    patterns: tuple[Pattern, ...]

    def __post_init__(self) -> None:
        pats = _freeze(self.patterns)
        if not isinstance(pats, tuple) or not pats:
            raise field_error(PatternError, "per_head.patterns", pats, "a non-empty list of patterns")
        for i, p in enumerate(pats):
            if not isinstance(p, Pattern):
                raise field_error(PatternError, f"per_head.patterns[{i}]", p, "a pattern")
            if isinstance(p, PerHead):
                raise field_error(PatternError, f"per_head.patterns[{i}]", str(p), "no nested per_head")
            _refuse_root_only(f"per_head.patterns[{i}]", p)
            if p.runtime_leaves:
                allowed = "patterns without data given at call time (whose data carry their own heads)"
                why = f"{p.runtime_leaves[0]} reads [B, H, ...] data: put it outside the per_head"
                raise field_error(PatternError, f"per_head.patterns[{i}]", str(p), allowed, why)
        _set(self, "patterns", pats)
        _set_depth(self)

    @property
    def children(self) -> tuple[Pattern, ...]:
        return self.patterns


# --- builder API -------------------------------------------------------------

PRIMITIVES: dict[str, type[Pattern]] = {
    cls.NAME: cls
    for cls in (
        Dense,
        Neighborhood,
        SlidingWindow,
        Causal,
        Axial,
        Strided,
        BlockSparse,
        GlobalTokens,
        Document,
        Band,
        BlockDiagonal,
        Congruent,
        KeyRange,
        BlockMask,
        TopkBlocks,
        Documents,
        KeyLengths,
        KeyMask,
    )
}

NODES: tuple[type[Pattern], ...] = (*PRIMITIVES.values(), Union, Intersection, PerHead)
"""Every concrete node class."""


def dense() -> Pattern:
    return Dense()


def neighborhood(
    window: IntOrTuple,
    dilation: IntOrTuple = 1,
    stride: IntOrTuple = 1,
    causal: BoolOrTuple = False,
) -> Pattern:
    return Neighborhood(window, dilation, stride, causal)


def sliding_window(left: int, right: int = 0) -> Pattern:
    return SlidingWindow(left, right)


def causal() -> Pattern:
    return Causal()


def axial(axes: int | Sequence[int] | None = None) -> Pattern:
    return Axial(axes)  # type: ignore[arg-type]


def strided(stride: int, offset: int = 0) -> Pattern:
    return Strided(stride, offset)


def block_sparse(layout: Sequence, block: int) -> Pattern:
    return BlockSparse(layout, block)  # type: ignore[arg-type]


def global_tokens(indices: int | Sequence[int]) -> Pattern:
    return GlobalTokens(indices)  # type: ignore[arg-type]


def document(ids: Sequence[int]) -> Pattern:
    return Document(ids)  # type: ignore[arg-type]


def band(axis: int, lo: int | None = None, hi: int | None = None) -> Pattern:
    return Band(axis, lo, hi)


def block_diagonal(axis: int, block: int) -> Pattern:
    return BlockDiagonal(axis, block)


def congruent(axis: int, modulus: int, offset: int = 0) -> Pattern:
    return Congruent(axis, modulus, offset)


def key_range(axis: int, lo: int | None = None, hi: int | None = None) -> Pattern:
    return KeyRange(axis, lo, hi)


def block_mask(block: int | Sequence[int]) -> Pattern:
    """A block layout given at call time as ``data={"block_mask": tensor}`` (:class:`BlockMask`)."""
    return BlockMask(block)  # type: ignore[arg-type]


def topk_blocks(block: int | Sequence[int]) -> Pattern:
    """Top-k key blocks given at call time as ``data={"topk_blocks": tensor}`` (:class:`TopkBlocks`)."""
    return TopkBlocks(block)  # type: ignore[arg-type]


def documents() -> Pattern:
    """Documents given at call time as ``data={"documents": ids}`` or ``{"cu_seqlens": cu}``
    (:class:`Documents`)."""
    return Documents()


def key_lengths() -> Pattern:
    """Key padding given at call time as ``data={"key_lengths": lengths}`` (:class:`KeyLengths`)."""
    return KeyLengths()


def key_mask() -> Pattern:
    """Valid keys given at call time as ``data={"key_mask": mask}`` (:class:`KeyMask`)."""
    return KeyMask()


def union(*patterns: Pattern) -> Pattern:
    return patterns[0] if len(patterns) == 1 else Union(patterns)


def intersection(*patterns: Pattern) -> Pattern:
    return patterns[0] if len(patterns) == 1 else Intersection(patterns)


def per_head(patterns: Sequence[Pattern]) -> Pattern:
    return PerHead(patterns)  # type: ignore[arg-type]


def fields_of(node: Pattern) -> dict[str, Any]:
    """The node's parameters in declaration order (for printing and specs)."""
    return {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}  # type: ignore[arg-type]

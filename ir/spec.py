"""Spec files: a pattern bound to a grid (plus optional heads, head dim, dtype).

YAML or JSON, e.g.::

    pattern: neighborhood(window=(31, 31))
    grid: [128, 128]
    heads: 16
    head_dim: 128
    dtype: bfloat16
    score: softcap(50.0)    # optional: a score's text (attncc.ir.score), softmax by default
    queries: [2, 128, 128]  # optional: the queries are a box of the grid (a KV cache's last frames)
    q_grid: [77]            # optional, instead: the queries' own grid (cross-attention)

``queries`` (one size per grid axis, or an int on a sequence) says the queries cover a box of
the grid, placed per call (``q_offset``, the end by default: Note [Query regions] in
attncc.lower.plan); the keys are the whole grid. ``q_grid`` (1 to 3 sizes, or an int for a
sequence) puts the queries on a grid of their own and makes ``grid`` the keys' alone (Note
[Cross-attention] in attncc.runtime.cross): the pattern may compare no query's place with a
key's. Without either, queries and keys are the grid.

``pattern`` is the text form, or the same tree as mappings, which suits long
block layouts: ``{block_sparse: {layout: [[1, 0], [1, 1]], block: 64}}``,
``{union: [p, q]}``, ``{intersection: [p, q]}``, ``{per_head: [p, q]}``.

A token space of segments (Note [Segment spaces] in attncc.ir.segments) takes ``segments``
instead of ``grid``, the segments in token order, and a pattern per pair of segments, each
key ``'q -> k'`` (quoted: a YAML ``*`` starts an alias)::

    segments: {text: 226, video: [16, 48, 48]}
    pattern:
      "text -> *": dense()
      "video -> video": neighborhood(window=(7, 15, 15))
      "video -> text": dense()

(or the text ``by_segments(segments(...), {...})`` of the same space). ``attncc analyze`` and
``attncc inspect`` take such a spec; the other commands refuse it, naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from attncc.errors import AttnccError, SpecError, field_error, form_error
from attncc.ir.grid import Grid
from attncc.ir.nodes import PRIMITIVES, Pattern, intersection, per_head, union
from attncc.ir.score import Score, parse_score
from attncc.ir.segments import BySegments, Segments
from attncc.ir.text import parse
from attncc.ir.validate import validate, validate_cross, validate_segments

DTYPES = ("float16", "bfloat16", "float32")
_FIELDS = (
    "pattern",
    "grid",
    "segments",
    "heads",
    "head_dim",
    "dtype",
    "score",
    "queries",
    "q_grid",
    "name",
    "description",
)


class _SpecLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses anchors and aliases.

    Note [No YAML aliases]: an alias repeats a node without copying it, so a few lines
    of ``&a [*b, *b, ...]`` stand for a value of billions of elements, which every
    later step (validation, ``str`` of a name, the pattern tree) would walk in full.
    A spec never needs one: the value can be written out.
    """

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            what = f"*{event.anchor}" if isinstance(event, yaml.AliasEvent) else f"&{event.anchor}"
            raise SpecError(
                f"line {event.start_mark.line + 1}: YAML anchors and aliases ({what}) are not allowed "
                "in a spec file (an alias can stand for an enormous value); write the value out"
            )
        return super().compose_node(parent, index)


@dataclass(frozen=True)
class Spec:
    """A pattern on a grid, with the shapes a kernel would be built for."""

    pattern: Pattern
    grid: Grid
    heads: int
    head_dim: int = 128
    dtype: str = "bfloat16"
    name: str = ""
    score: Score = dataclasses.field(default_factory=Score)  # softmax, no terms
    queries: tuple[int, ...] | None = None  # the queries' box of the grid; None: all of it
    q_grid: Grid | None = None  # the queries' own grid (cross-attention: grid is the keys'); None: grid
    space: Segments | None = None  # a space of segments: ``grid`` is then its N tokens in a row


def load_spec(path: str | Path) -> Spec:
    """Read and validate a ``.yaml``/``.yml``/``.json`` spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"spec file {str(path)!r} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"spec file {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_SpecLoader)
    except SpecError as e:
        raise SpecError(f"spec file {str(path)!r}, {e}") from None
    except (ValueError, yaml.YAMLError) as e:  # ValueError: a JSON error, or an int of > 4300 digits
        raise SpecError(
            f"spec file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'YAML'}: {e}"
        ) from None
    try:
        return spec_from_data(data, default_name=path.stem)
    except AttnccError as e:
        raise type(e)(f"{path}: {e}") from None


def spec_from_data(data: Any, default_name: str = "") -> Spec:
    if not isinstance(data, dict):
        raise field_error(
            SpecError, "spec", type(data).__name__, "a mapping with fields " + ", ".join(_FIELDS)
        )
    for key in data:
        if key not in _FIELDS:
            raise field_error(SpecError, "spec field", key, ", ".join(_FIELDS), "unknown field")
    for key in ("pattern", "grid" if "segments" not in data else "segments"):
        if key not in data:
            raise SpecError(f"spec field {key!r} is missing; it is required")
    space, q_grid = None, None
    if "segments" in data:
        for key in ("grid", "queries", "q_grid"):
            if key in data:
                allowed = "no grid, queries or q_grid field with segments (the space is every query)"
                raise field_error(SpecError, key, data[key], allowed)
        space = _space(data["segments"])
        grid = Grid((space.size,))
        pattern: Pattern = _segments_pattern(data["pattern"], space)
        heads = validate_segments(pattern, data.get("heads"))
    else:
        grid_value = data["grid"]
        if isinstance(grid_value, bool) or not isinstance(grid_value, (int, list)):
            raise field_error(SpecError, "grid", grid_value, "a list of 1 to 3 integers >= 1")
        grid = Grid(tuple(grid_value) if isinstance(grid_value, list) else grid_value)
        pattern = pattern_from_data(data["pattern"])
        q_grid = _q_grid(data.get("q_grid"), data.get("queries"))
        if q_grid is None:
            heads = validate(pattern, grid, data.get("heads"))
        else:
            heads = validate_cross(pattern, q_grid, grid, data.get("heads"))
    head_dim = data.get("head_dim", 128)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise field_error(SpecError, "head_dim", head_dim, "an integer >= 1")
    dtype = data.get("dtype", "bfloat16")
    if dtype not in DTYPES:
        raise field_error(SpecError, "dtype", dtype, ", ".join(DTYPES))
    score_text = data.get("score", "softmax")
    if not isinstance(score_text, str):
        expected = "a score's text, e.g. 'softcap(50.0) + alibi(0.5, 0.25)'"
        raise form_error(SpecError, "score", score_text, expected)
    score = parse_score(score_text)
    score.check(grid, heads)
    if q_grid is not None or space is not None:
        for name in ("alibi", "rel_pos_bias"):
            if getattr(score, name) is not None:
                if space is not None:
                    why = "relative positions are not defined across segments (Note [Segment spaces])"
                    raise field_error(SpecError, "score", name, "terms that read no positions", why)
                why = "q_grid is not the keys' grid: no query has a position among the keys"
                raise field_error(
                    SpecError, "score", score_text, "terms other than alibi and rel_pos_bias", why
                )
    queries = _queries(data.get("queries"), grid)
    name = str(data.get("name", default_name))
    return Spec(pattern, grid, heads, head_dim, dtype, name, score, queries, q_grid, space)


def _space(value: Any) -> Segments:
    """The spec's ``segments``: a mapping of names to shapes, in token order."""
    if not isinstance(value, dict) or not value:
        allowed = "a mapping of segment names to shapes, e.g. {text: 226, video: [16, 48, 48]}"
        raise field_error(SpecError, "segments", value, allowed)
    shapes = []
    for name, shape in value.items():
        if isinstance(shape, bool) or not isinstance(shape, (int, list)):
            allowed = "an integer >= 1 (a 1-D run) or a list of 1 to 3 integers >= 1 (a grid)"
            raise field_error(SpecError, f"segments.{name}", shape, allowed)
        shapes.append(tuple(shape) if isinstance(shape, list) else (shape,))
    return Segments(tuple(value), tuple(shapes))


def _segments_pattern(value: Any, space: Segments) -> BySegments:
    """The pattern of a spec with ``segments``: ``{'q -> k': pattern}`` or a by_segments text."""
    allowed = f"a mapping {{'q -> k': pattern}} (segment names of {space} or '*'), or by_segments text"
    if isinstance(value, str):
        pattern = parse(value)
        if not isinstance(pattern, BySegments) or pattern.space != space:
            other = isinstance(pattern, BySegments)
            why = f"the text is {'by_segments of another space' if other else 'not by_segments'}"
            raise field_error(SpecError, "pattern", value, allowed, why)
        return pattern
    if not isinstance(value, dict) or not value:
        raise field_error(SpecError, "pattern", value, allowed)
    pairs = []
    for key, entry in value.items():
        sides = key.split("->") if isinstance(key, str) else []
        if len(sides) != 2:
            raise field_error(SpecError, "pattern key", key, "'q -> k', each a segment name or '*'")
        pairs.append(((sides[0].strip(), sides[1].strip()), pattern_from_data(entry)))
    return BySegments(space, tuple(pairs))


def on_grid(spec: Spec, command: str) -> Spec:
    """``spec``, for a command that runs kernels on one grid: a space of segments is refused."""
    if spec.space is not None:
        allowed = "a grid field (of the commands, attncc analyze and inspect take segments so far)"
        raise field_error(SpecError, f"segments (for attncc {command})", str(spec.space), allowed)
    return spec


def one_grid(spec: Spec, command: str) -> Spec:
    """``spec``, for a command that runs queries on the keys' grid: one with ``q_grid`` is refused."""
    if spec.q_grid is not None:
        allowed = (
            "no q_grid field (attncc analyze and compile take it; attncc.attention(..., q_grid=...) runs it)"
        )
        raise field_error(SpecError, f"q_grid (for attncc {command})", spec.q_grid.shape, allowed)
    return spec
    return spec


def whole_grid(spec: Spec, command: str) -> Spec:
    """``spec``, for a command that runs every query of the grid: one with ``queries``,
    ``segments`` (:func:`on_grid`) or ``q_grid`` (:func:`one_grid`) is refused."""
    if one_grid(on_grid(spec, command), command).queries:
        allowed = "no queries field (it runs every query of the grid; analyze, inspect and compile take it)"
        raise field_error(SpecError, f"queries (for attncc {command})", spec.queries, allowed)
    return spec


def _queries(value: Any, grid: Grid) -> tuple[int, ...] | None:
    """The spec's ``queries`` box (None: the whole grid, also when it is the grid)."""
    if value is None:
        return None
    sizes = [value] if isinstance(value, int) and grid.rank == 1 else value
    allowed = f"a list of {grid.rank} integers, each from 1 to the grid's {grid.shape}"
    fits = isinstance(sizes, list) and len(sizes) == grid.rank
    if not fits or not all(type(s) is int and 1 <= s <= g for s, g in zip(sizes, grid.shape)):
        raise field_error(SpecError, "queries", value, allowed)
    return None if tuple(sizes) == grid.shape else tuple(sizes)


def _q_grid(value: Any, queries: Any) -> Grid | None:
    """The spec's ``q_grid`` (None: the queries are on the keys' grid)."""
    if value is None:
        return None
    sizes = [value] if isinstance(value, int) else value
    if (
        not isinstance(sizes, list)
        or not 1 <= len(sizes) <= 3
        or not all(type(s) is int and s >= 1 for s in sizes)
    ):
        raise field_error(
            SpecError, "q_grid", value, "a list of 1 to 3 integers >= 1, or an integer (a sequence)"
        )
    if queries is not None:
        why = "queries is a box of the keys' grid, q_grid a grid of the queries' own"
        raise field_error(SpecError, "q_grid", value, "absent when queries is given", why)
    return Grid(tuple(sizes))


def pattern_from_data(data: Any) -> Pattern:
    """A pattern from its text form or its tree of single-key mappings."""
    if isinstance(data, str):
        return parse(data)
    if not isinstance(data, dict) or len(data) != 1:
        raise field_error(SpecError, "pattern", data, "a text pattern or a mapping with one primitive name")
    ((name, args),) = data.items()
    if name in ("union", "intersection", "per_head"):
        if not isinstance(args, list) or not args:
            raise field_error(SpecError, f"pattern.{name}", args, "a non-empty list of patterns")
        ops = [pattern_from_data(a) for a in args]
        return per_head(ops) if name == "per_head" else (union if name == "union" else intersection)(*ops)
    if name not in PRIMITIVES:
        known = ", ".join(sorted([*PRIMITIVES, "union", "intersection", "per_head"]))
        raise field_error(SpecError, "pattern name", name, known, "unknown primitive")
    cls = PRIMITIVES[name]
    args = {} if args is None else args
    if not isinstance(args, dict):
        raise field_error(SpecError, f"pattern.{name}", args, "a mapping of argument names to values")
    try:
        return cls(**args)
    except TypeError:
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        raise field_error(SpecError, f"pattern.{name} arguments", sorted(args), ", ".join(names)) from None

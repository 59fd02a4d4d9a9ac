"""Cross-attention: queries on a grid of their own, keys and values on another (issue 16 part 3).

Note [Cross-attention]: ``attncc.attention(q, k, v, pattern, q_grid=...)`` puts q on its own
grid (text tokens over an image's, an image's over a text's, a decoder's over an encoder's),
independent of k's: no query has a place among the keys, so a pattern across the two grids
may compare no query's place with a key's. It keeps a pair from the key's flat index and the
call's data alone: ``dense()``, ``key_lengths()`` (keys per batch element), ``key_range`` on a
1-D k, and ``documents()`` with an id per query and per key (``data["query_documents"]`` beside
``data["documents"]``): a query sees the keys of its id, the interval of its image when the
keys' ids are sorted. Geometric primitives (causal, windows, neighborhoods, ...) are refused
(attncc.ir.validate.validate_cross), as are score terms of relative positions (alibi,
rel_pos_bias) and score functions, which read positions on one grid.

Such a problem is an ordinary one on one 1-D grid, which the general kernels and their query
regions (Note [Query regions] in attncc.lower.plan) already run, forward and backward, so a
cross call lowers to it (:class:`Embedding`), exactly:

- keys at tokens ``0 .. Nk - 1`` of a grid of ``length`` tokens, queries a region of ``Nq``
  tokens at ``offset``;
- without ``documents()``: ``offset`` 0 and ``length = max(Nq, Nk)`` (for ``Nq <= Nk`` the
  keys' own tensors, no copy: a text over an image runs as a region of the image);
- with ``documents()``: the queries after the keys (``offset = Nk``, ``length = Nk + Nq``), so
  one id per token of the grid holds both sides' ids (the keys' then the queries');
- keys past ``Nk`` (``length > Nk``) are zero padding of k and v, cut by
  ``& key_range(0, hi=Nk - 1)``, a static condition the plans walk past: their tiles are never
  visited, but the padding is a copy of k and v per call (and of ``key_bias``/``bias``).

The copy is what this costs over kernels that tile the queries' own length: it appears only
with ``Nq > Nk`` or ``documents()``. Gradients flow through the padding to the caller's k, v
and term tensors. A forward step of 1-64 queries is a region of a 1-D grid like any other, so
the decode kernels may take it (Note [Decode dispatch] in attncc.runtime.decode): they compute
the same embedded problem.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attncc.errors import AttnccError, PatternError, field_error, form_error
from attncc.ir.grid import Grid
from attncc.ir.nodes import Documents, Pattern, key_range
from attncc.ir.score import Score
from attncc.ir.text import format_pattern
from attncc.ir.validate import validate, validate_cross
from attncc.memo import memo

TERMS = "temperature, softcap, query_bias [B|1, H|1, Nq], key_bias [B|1, H|1, Nk], bias [B|1, H|1, Nq, Nk]"
"""The score terms a cross call takes (Note [Cross-attention])."""


@dataclass(frozen=True)
class Embedding:
    """Where a cross call sits on one 1-D grid (Note [Cross-attention]): ``length`` tokens, the
    keys at ``0 .. keys - 1``, the queries at ``offset .. offset + queries - 1``."""

    queries: int
    keys: int
    length: int
    offset: int

    @property
    def padding(self) -> int:
        """Zero keys after the real ones (cut by the pattern's ``key_range``)."""
        return self.length - self.keys


Shape = tuple[int, ...]


def plan(pattern: Pattern, q_grid: Shape, grid: Shape, heads: int) -> tuple[str, Embedding]:
    """The embedded pattern's text and the :class:`Embedding` of a cross call of ``heads`` query
    heads on ``q_grid`` over keys on ``grid``, after checking the pattern across them."""
    if not isinstance(pattern, Pattern):  # perhaps unhashable: the check says what it is instead
        validate(pattern, Grid(grid), heads)
    text, length, offset = _plan(pattern, q_grid, grid, heads)
    return text, Embedding(math.prod(q_grid), math.prod(grid), length, offset)


@torch.compiler.assume_constant_result  # Note [Patterns under torch.compile] in attncc.runtime.dynamo
def _plan(pattern: Pattern, q_grid: Shape, grid: Shape, heads: int) -> tuple[str, int, int]:
    return _embedded(pattern, q_grid, grid, heads)


@memo  # eager calls check and format once
def _embedded(pattern: Pattern, q_grid: Shape, grid: Shape, heads: int) -> tuple[str, int, int]:
    validate_cross(pattern, Grid(q_grid), Grid(grid), heads)
    n_q, n_k = math.prod(q_grid), math.prod(grid)
    documents = any(isinstance(leaf, Documents) for leaf in pattern.runtime_leaves)
    length, offset = (n_k + n_q, n_k) if documents else (max(n_q, n_k), 0)
    embedded = pattern & key_range(0, hi=n_k - 1) if length > n_k else pattern
    validate(embedded, Grid((length,)), heads)
    return format_pattern(embedded), length, offset


def padded(t: torch.Tensor, embedding: Embedding) -> torch.Tensor:
    """A ``[..., Nk, D]`` k or v with the embedding's zero keys after its own."""
    return F.pad(t, (0, 0, 0, embedding.padding)) if embedding.padding else t


def kernel_data(data: dict[str, torch.Tensor], embedding: Embedding) -> dict[str, torch.Tensor]:
    """The embedded problem's data from a cross call's (attncc.runtime.data.checked_cross): the
    keys' then the queries' ids as one ``[B', length]`` row per batch element; key lengths as
    they are (cut to ``0..Nk``)."""
    out = {key: t for key, t in data.items() if key not in ("documents", "query_documents")}
    if "documents" in data:
        keys, queries = data["documents"], data["query_documents"]
        if keys.shape[0] != queries.shape[0]:  # one of them is shared by the batch: [1, N]
            keys, queries = (t.expand(max(keys.shape[0], queries.shape[0]), -1) for t in (keys, queries))
        out["documents"] = torch.cat([keys, queries], 1).contiguous()
    return out


def score(found: Score, embedding: Embedding) -> Score:
    """The call's score terms on the embedded grid: a key's terms padded with the zero keys;
    terms of relative positions refused (:func:`refuse_positions`)."""
    refuse_positions(found)
    values = []
    for name, value in found.values:
        if name in ("key_bias", "bias") and isinstance(value, torch.Tensor):
            if value.dim() < 1 or value.shape[-1] != embedding.keys:
                form = f"[..., {embedding.keys}]: one per key"
                raise field_error(AttnccError, f"{name} shape", tuple(value.shape), form)
            value = F.pad(value, (0, embedding.padding)) if embedding.padding else value
        values.append((name, value))
    return dataclasses.replace(found, values=tuple(values))


def refuse_positions(found: Score) -> None:
    """Refuse the score terms of relative positions (alibi, rel_pos_bias) across two grids."""
    for name in ("alibi", "rel_pos_bias"):
        if getattr(found, name) is not None:
            why = "q and k are on different grids (q_grid): no query has a position among the keys"
            raise field_error(PatternError, "score", name, TERMS, why)


def refuse_score_function(score_mod: object) -> None:
    """A score function reads positions on one grid: a cross call takes score terms only."""
    if score_mod is not None and not isinstance(score_mod, Score):
        expected = f"score terms ({TERMS}) composed with +"
        raise form_error(AttnccError, "score_mod", type(score_mod).__name__, expected, "a call with q_grid")

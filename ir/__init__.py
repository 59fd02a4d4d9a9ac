"""The pattern IR: primitives, combinators, text form, canonical form, analysis.

Build a pattern with the functions below (or ``parse`` its text), bind it to a
:class:`Grid`, and ask :func:`analyze` what it costs::

    from attncc.ir import Grid, neighborhood, causal, analyze
    p = neighborhood(window=(7, 7), dilation=(2, 1)) & causal()
    a = analyze(p, Grid((64, 64)), q_tile=(8, 16), kv_tile=(8, 16))

A score (softmax, sigmoid, and terms such as ``softcap(c)``, ``alibi(slopes)``,
``rel_pos_bias(table)``, ``key_bias(b)``) is in :mod:`attncc.ir.score`.
"""

from attncc.ir.analysis import Analysis, Tiling, analyze
from attncc.ir.canonical import canonicalize, pattern_hash, resolve_heads, to_graph
from attncc.ir.grid import Grid
from attncc.ir.nodes import (
    Axial,
    Band,
    BlockDiagonal,
    BlockSparse,
    Causal,
    Congruent,
    Dense,
    Document,
    GlobalTokens,
    Intersection,
    KeyRange,
    Neighborhood,
    Pattern,
    PerHead,
    SlidingWindow,
    Strided,
    Union,
    axial,
    band,
    block_diagonal,
    block_sparse,
    causal,
    congruent,
    dense,
    document,
    global_tokens,
    intersection,
    key_range,
    neighborhood,
    per_head,
    sliding_window,
    strided,
    union,
)
from attncc.ir.score import (
    Score,
    alibi,
    bias,
    key_bias,
    parse_score,
    query_bias,
    rel_pos_bias,
    sigmoid,
    softcap,
    temperature,
)
from attncc.ir.spec import Spec, load_spec
from attncc.ir.text import format_pattern, parse
from attncc.ir.validate import validate

__all__ = [
    "Analysis",
    "Axial",
    "Band",
    "BlockDiagonal",
    "BlockSparse",
    "Causal",
    "Congruent",
    "Dense",
    "Document",
    "GlobalTokens",
    "Grid",
    "Intersection",
    "KeyRange",
    "Neighborhood",
    "Pattern",
    "PerHead",
    "Score",
    "SlidingWindow",
    "Spec",
    "Strided",
    "Tiling",
    "Union",
    "alibi",
    "analyze",
    "axial",
    "band",
    "bias",
    "block_diagonal",
    "block_sparse",
    "canonicalize",
    "causal",
    "congruent",
    "dense",
    "document",
    "format_pattern",
    "global_tokens",
    "intersection",
    "key_bias",
    "key_range",
    "load_spec",
    "neighborhood",
    "parse",
    "parse_score",
    "pattern_hash",
    "per_head",
    "query_bias",
    "rel_pos_bias",
    "resolve_heads",
    "sigmoid",
    "sliding_window",
    "softcap",
    "strided",
    "temperature",
    "to_graph",
    "union",
    "validate",
]

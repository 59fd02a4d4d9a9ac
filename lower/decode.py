"""Decode plans: a few queries against a long 1-D key sequence (issue 16 part 2, flash-decoding).

Lowering decides here; ``templates/triton/decode.py.j2`` only spells what the plan says.

Note [Decode]: a decode step has 1 to 64 queries per batch element (at per-batch positions: the
call's ``q_offset``) and up to some 100K keys, so the general kernels' Q tiles of 64-128 rows would
run one program per head with nearly all rows empty, each streaming the whole cache. The decode
kernels instead (1) give a program the rows of every query head of one KV head (GQA), so a K/V
tile is loaded once per group (Note [Decode rows]); (2) split the KV tiles a program's rows see
into ``splits`` parts, one program each, every program writing its rows' partial output and
log-sum-exp, which a second kernel merges by log-sum-exp (flash-decoding; the split count is the
cost model's: Note [Split count] in attncc.autotune.decode); (3) visit only the KV tiles some row
of the program keeps (Note [Decode iteration]). Forward only: the backward of a decode call is
the general kernels' (attncc.runtime.decode_op refuses a call that needs a gradient).

Note [Decode rows]: a program's rows are (query i, query head g of its KV head's group), query
major: row ``r = i * G + g`` (G query heads per KV head), padded to a power of two of at least 16
rows (``tl.dot``'s least); more rows than ``block_m`` are cut into ``m_tiles`` programs, each
over consecutive queries. Each row reads its own query, head and position (the batch element's
offset plus ``i``); the pattern and the score terms see the row's global position.

Note [Decode iteration]: how a program finds its KV tiles.

- ``range`` plans (patterns of closed-form intervals: causal, sliding windows, key ranges, sinks
  (``sliding_window(w) | key_range(0, hi=s - 1)``), bands, 1-D neighborhoods, strides, dense,
  and ``key_lengths`` as the interval ``[0, length - 1]``): the canonical rule bounds each row's
  keys by at most two intervals ``[first_t(q), last_t(q)]`` (``spans``: an intersection takes
  the larger first and the smaller last of its operands', a union keeps both; more than two are
  taken together as their hull, a superset). The program takes, per span, the tiles from its
  rows' least first key to their greatest last key, merged into one range where the two meet,
  and walks them as one count: no table, no set-up pass.
- ``list`` plans (patterns with block layouts, document ids, global tokens or a key mask,
  static or given per call): per call, on the device, each program's list of the KV tiles some
  row of it keeps (attncc.runtime.decode_lists: exact per tile for block layouts, key masks and
  key intervals, a superset from each tile's id range for documents), which the program walks.

Every visited tile is masked per element by the exact rule (``mask_expr``, the general kernels'
rule spelled by :func:`attncc.lower.lowering.spell_rule`), so a span or list that is a superset
costs only loads: Note [Decode masks every tile].

Note [Decode masks every tile]: the general kernels run full tiles in a loop without mask
arithmetic, because they are tensor-core bound. A decode program computes ``block_m x block_n``
scores (16 x 64 for one query of 8 heads) for every ``2 x block_n x D`` K/V elements it streams:
it is bound by memory, and the mask's few integer operations per score hide under the loads
(benchmarks/STATIC.md, "Decode"). So there is one loop, with no branch in its body: Triton
software-pipelines its loads (cp.async on sm_90).

Note [Paged caches]: a serving engine keeps K and V in a pool of fixed-size pages (``[pages,
page size, H_kv, D]``, as vLLM and FlashInfer lay them out) and gives each sequence a block
table (``[B, pages per sequence]`` int32: page ``j`` of sequence ``b`` holds its keys ``j x page
.. (j + 1) x page - 1``). A paged plan reads key ``n`` of batch element ``b`` at row ``n % page`` of
page ``table[b, n // page]``: per key, not per tile, so any page size works (1 included) and a
tile may span pages. The pattern, its spans and lists are those of the logical sequence of
``pages per sequence x page`` keys; a table entry past a sequence's end is never read for a key
the pattern keeps (clamped into the pool for the keys a visited tile holds beyond it). The page
size is a constexpr (Triton compiles a kernel per size: a deployment has one). A tile reads one
table entry when it lies in one page (pages of a multiple of its 64 keys) and one per page it
touches for smaller pages that are powers of two (16, 32); other sizes (1 included) read an entry
per key. The table reads and the 64-bit row addresses cost some 100-200 instructions per KV tile
over a contiguous cache's (benchmarks/STATIC.md, "Decode"), under the tile's loads: a decode
program is bound by memory. Under triton 3.6 an entry per key puts branches in the KV loop (3.9
none), which pages of a power-of-two size of at least 2 avoid.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import sympy

from attncc.errors import PatternError, field_error
from attncc.ir import symbolic
from attncc.ir.canonical import canonicalize
from attncc.ir.grid import Grid
from attncc.ir.nodes import (
    BlockMask,
    BlockSparse,
    Document,
    Documents,
    GlobalTokens,
    KeyMask,
    Pattern,
    TopkBlocks,
)
from attncc.ir.score import INPUTS, Score, as_score
from attncc.ir.symbolic import AllOf, AnyOf, FlatRange, GridBox, Rule, Runtime, rules
from attncc.lower.lowering import (
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    _check_pow2,
    runtime_leaves,
    spell_rule,
    to_triton,
)
from attncc.lower.plan import LOG2E, Lookup, RuntimeLeaf
from attncc.settings import MAX_DECODE_SPLITS

MAX_QUERIES = 64  # Note [Decode]: more queries are a prefill chunk, the general kernels' work
MAX_SPLITS = MAX_DECODE_SPLITS  # the most programs one program's tiles are split over (Note [Split count])
TERMS = ("temperature", "alibi")  # the tensor terms the decode kernels read (and softcap, a constant)
# Leaves that make a plan a ``list`` plan (Note [Decode iteration]).
LISTED = (BlockSparse, BlockMask, TopkBlocks, Document, Documents, GlobalTokens, KeyMask)

# Note [Decode warps]: 16 rows take 4 warps; from 32 rows on, 4 warps hold too much of the score
# and accumulator tiles per thread (sm_90, bf16, D = 128: 32 rows on 4 warps spill, 168
# registers; on 8 warps 126 and none: benchmarks/STATIC.md "Decode"), so they take 8.
WIDE_ROWS = 32
_kl = sympy.Symbol("kl", integer=True)  # a batch element's key length (the key_lengths leaf)
_MAX_SPANS = 2


@dataclass(frozen=True)
class DecodeConfig:
    """The launch knobs of the decode kernel: the most rows of a program, keys per KV tile,
    warps (None: lowering picks, Note [Decode warps]) and pipeline stages."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int | None = None
    num_stages: int = 3

    def __post_init__(self) -> None:
        _check_pow2("decode block_m", self.block_m, 16, 128)
        _check_pow2("decode block_n", self.block_n, 16, 256)
        if self.num_warps not in (None, 1, 2, 4, 8):
            raise field_error(PatternError, "decode num_warps", self.num_warps, "1, 2, 4, 8 or None")
        if isinstance(self.num_stages, bool) or self.num_stages not in range(1, 6):
            raise field_error(PatternError, "decode num_stages", self.num_stages, "1..5")

    @staticmethod
    def default(device_type: str, head_dim: int, dtype: str) -> DecodeConfig:
        """64-key tiles in 3 stages (three programs fit an sm_90 SM at D = 128: 70 KiB of shared
        memory each), 32-key tiles at D = 256 and for fp32 (IEEE dots on the FMA pipes: on 8
        warps, as 4 spill at D = 128); the interpreter takes 16-row, 16-key tiles, so small tests
        walk many tiles and M tiles."""
        if device_type != "cuda":
            return DecodeConfig(16, 16, 4, 1)
        if dtype == "float32":
            return DecodeConfig(64, 32, 8, 2)
        if head_dim > 128:
            return DecodeConfig(64, 32, None, 2)
        return DecodeConfig(64, 64, None, 3)


@dataclass(frozen=True)
class Span:
    """The keys ``[first(q), last(q)]`` a row at position ``q`` may keep under one term (Note
    [Decode iteration]): Triton expressions of ``q`` and ``kl`` (the batch element's key length)."""

    first: str
    last: str


@dataclass(frozen=True)
class DecodePlan:
    """The decode kernels of one head-independent pattern on a 1-D sequence (module notes)."""

    keys: int  # N, the sequence's length
    queries: int  # queries per batch element (Lq)
    group: int  # query heads per KV head (G)
    head_dim: int
    head_dim_padded: int
    dtype: str
    block_m: int  # rows per program (Note [Decode rows])
    block_n: int  # keys per KV tile
    iteration: str  # "range" or "list" (Note [Decode iteration])
    spans: tuple[Span, ...]  # range plans: at most two
    mask_expr: str  # keep(q, k), the exact rule (attncc.lower.lowering.spell_rule)
    lookups: tuple[Lookup, ...]  # the rule's static tables (its int32 buffer: table_values)
    runtime: tuple[RuntimeLeaf, ...]  # the leaves whose data the kernel reads (Note [Runtime plans])
    keys_bound: int  # the most keys one row may see (for the split count: attncc.autotune.decode)
    softcap: float | None = None
    temperature: bool = False
    alibi: str | None = None  # "flat" or "signed"
    fast_tanh: bool = False
    paged: bool = False  # K/V in a pool of pages read through a block table (Note [Paged caches])
    num_warps: int = 4
    num_stages: int = 3

    @property
    def rows(self) -> int:
        return self.queries * self.group

    @property
    def m_tiles(self) -> int:
        return math.ceil(self.rows / self.block_m)

    @property
    def kv_tiles(self) -> int:
        return math.ceil(self.keys / self.block_n)

    @property
    def max_splits(self) -> int:
        return MAX_SPLITS

    @property
    def ragged(self) -> bool:
        """Whether the last KV tile holds padding keys."""
        return self.keys % self.block_n != 0

    def has(self, name: str) -> bool:
        return getattr(self, name) not in (None, False)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The tensor terms the kernel reads, in the ops' order (Note [Term inputs] in attncc.lower.plan)."""
        return tuple(name for name in INPUTS if name in TERMS and self.has(name))

    @property
    def score_units(self) -> float:
        return LOG2E

    @property
    def softcap_in_units(self) -> float:
        assert self.softcap is not None, "a plan without a soft-cap has no cap to spell"
        return self.softcap * LOG2E


def score_refusal(score: Score) -> str | None:
    """Why the decode kernels do not take ``score`` (its form), or None."""
    if score.kind != "softmax":
        return f"score {score.kind!r}: the decode kernels take softmax"
    if score.dropout:
        return "dropout: decode is inference"
    if score.grads:
        return f"learned terms {score.grads}: the decode kernels have no backward"
    others = [name for name in INPUTS if score.has(name) and name not in TERMS]
    if others:
        return f"score terms {others}: the decode kernels take softcap, temperature and alibi"
    return None


def lower_decode(
    pattern: Pattern,
    keys: int,
    queries: int,
    group: int,
    head_dim: int,
    dtype: str,
    score: str | Score = "softmax",
    device_type: str = "cuda",
    config: DecodeConfig | None = None,
    paged: bool = False,
) -> DecodePlan:
    """Plan the decode kernels of a head-independent ``pattern`` on a sequence of ``keys`` tokens,
    for ``queries`` queries of ``group`` query heads per KV head; ``paged``: K/V are read from a
    pool of pages through a block table (Note [Paged caches])."""
    if dtype not in SUPPORTED_DTYPES:
        raise field_error(PatternError, "dtype", dtype, ", ".join(SUPPORTED_DTYPES))
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise field_error(PatternError, "head_dim", head_dim, f"1..{MAX_HEAD_DIM}")
    if not 1 <= queries <= min(MAX_QUERIES, keys):
        allowed = f"1..{min(MAX_QUERIES, keys)} (more queries are a prefill: the general kernels)"
        raise field_error(PatternError, "decode queries", queries, allowed)
    if group < 1:
        raise field_error(PatternError, "decode group", group, "an integer >= 1 (query heads per KV head)")
    scored = as_score(score)
    refused = score_refusal(scored)
    if refused:
        allowed = "softmax, with softcap, temperature and alibi"
        raise field_error(PatternError, "decode score", scored.text, allowed, refused)
    config = config or DecodeConfig.default(device_type, head_dim, dtype)
    grid = Grid((keys,))
    canon = canonicalize(pattern, grid)
    rule = rules(canon, grid)
    mask_expr, lookups = spell_rule(rule, grid)
    listed = _listed(canon)
    spans = () if listed else spans_of(rule, keys)
    rows = queries * group
    block_m = min(config.block_m, max(16, 1 << (rows - 1).bit_length()))
    return DecodePlan(
        keys=keys,
        queries=queries,
        group=group,
        head_dim=head_dim,
        head_dim_padded=max(16, 1 << (head_dim - 1).bit_length()),
        dtype=dtype,
        block_m=block_m,
        block_n=config.block_n,
        iteration="list" if listed else "range",
        spans=tuple(Span(_spell(f), _spell(last)) for f, last in spans),
        mask_expr=mask_expr,
        lookups=lookups,
        runtime=runtime_leaves(canon, grid),
        keys_bound=keys if listed else _keys_bound(spans, keys),
        softcap=scored.softcap,
        temperature=scored.temperature,
        alibi=None if scored.alibi is None else ("signed" if scored.alibi == "signed" else "flat"),
        fast_tanh=scored.softcap is not None and device_type == "cuda" and dtype != "float32",
        paged=paged,
        num_warps=config.num_warps or (8 if block_m >= WIDE_ROWS else 4),
        num_stages=config.num_stages,
    )


def _listed(p: Pattern) -> bool:
    return isinstance(p, LISTED) or any(_listed(op) for op in getattr(p, "operands", ()))


Interval = tuple[sympy.Expr, sympy.Expr]


def spans_of(rule: Rule, keys: int) -> list[Interval]:
    """At most two intervals per row that hold every key ``rule`` keeps (Note [Decode iteration])."""
    whole = [(sympy.Integer(0), sympy.Integer(keys - 1))]
    if isinstance(rule, GridBox):
        return [(rule.axes[0].first, rule.axes[0].last)]
    if isinstance(rule, FlatRange):
        return [(rule.range.first, rule.range.last)]
    if isinstance(rule, Runtime) and rule.node.NAME == "key_lengths":
        return [(sympy.Integer(0), _kl - 1)]
    if isinstance(rule, AnyOf):
        parts = [span for r in rule.rules for span in spans_of(r, keys)]
    elif isinstance(rule, AllOf):
        parts = [
            (sympy.Max(*(f for f, _ in combo)), sympy.Min(*(last for _, last in combo)))
            for combo in itertools.product(*(spans_of(r, keys) for r in rule.rules))
        ]
    else:
        return whole  # a predicate or data with no interval (list plans take those)
    if len(parts) > _MAX_SPANS:
        return [(sympy.Min(*(f for f, _ in parts)), sympy.Max(*(last for _, last in parts)))]
    return parts


def _spell(expr: sympy.Expr) -> str:
    return to_triton(sympy.sympify(expr))


def _keys_bound(spans: list[Interval], keys: int) -> int:
    """The most keys the spans hold for one row, over every position (key lengths at ``keys``)."""
    q = np.arange(keys, dtype=np.int64)
    covered = np.zeros((keys,), np.int64)
    intervals = []
    for first, last in spans:
        f, l_ = (
            np.clip(symbolic.to_numpy(sympy.sympify(e).subs(_kl, keys))(q), 0, keys - 1)
            for e in (first, last)
        )
        intervals.append((f, l_))
        covered += np.maximum(l_ - f + 1, 0)
    if len(intervals) == 2:  # less the keys both hold
        (f0, l0), (f1, l1) = intervals
        covered -= np.maximum(np.minimum(l0, l1) - np.maximum(f0, f1) + 1, 0)
    return int(covered.max()) if keys else 0

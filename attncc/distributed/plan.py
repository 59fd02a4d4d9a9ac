"""Context-parallel plans from the pattern's analysis (issue 19): which keys each rank needs.

Note [Planning from the analysis]: the analysis counts kept pairs per (query tile, key tile)
exactly, from the closed forms (attncc.ir.analysis.analyze). Taking the query tiles to be the
sharding's chunks and the key tiles to be single slices of the leading axis gives, for every
chunk, the kept pairs against every key slice: a slice with a count above zero is one the
chunk's queries see. A rank needs the slices some chunk of it sees that another rank owns, and
gets them from their owners; its work is the kept pairs of its chunks, over all heads. A key
slice moves whole (every kv head, both k and v), so the unit of transfer is a slice of the
leading axis: for a neighborhood that is the halo, for a causal pattern the slices before the
rank's last query, for a dense one everything. A pattern with data given at call time
(``documents()``, ``block_mask``, ...) is planned for the most its data could keep (Note
[Data-dependent analysis] in attncc.ir.analysis): the keys any data could let it see.

Note [Key blocks]: the analysis counts against every key slice, which for a long sequence (a
1-D grid of 512K tokens has 512K slices) is more tiles than it takes and more than a plan needs.
Past ``MAX_KEY_BLOCKS`` slices, keys are counted and moved in blocks of a few slices (a divisor
of the rows every chunk boundary falls on, so a block has one owner): a block some query sees
moves whole, which can add up to a block's worth per run of needed keys. Grids up to
``MAX_KEY_BLOCKS`` slices long are planned slice by slice, exactly (tests/test_distributed.py
holds them to the mask).

Note [Bytes of the methods]: figures are the forward pass's bytes received per rank; the
backward sends the same amounts back (dK/dV to the owners; the reverse all-to-alls).
``p2p`` (attncc's plan) receives the needed slices' k and v. Ring attention passes every other
rank's k and v shard through each rank: ``(R - 1) * N / R`` tokens of k and v. Ulysses
all-to-alls q, k, v over heads and the output back: from each of the ``R - 1`` other ranks a rank
receives that rank's ``N / R`` tokens in ``H / R`` query heads (q, then the output) and ``H_kv /
R`` kv heads (k and v), i.e. ``(R - 1) * N / R * (2 H + 2 H_kv) / R`` rows of ``head_dim``
values; its work is its ``H / R`` heads over every query. Ring attention's
work is attncc's on the same sharding (a ring that skips the keys its queries never see).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

from attncc.distributed.sharding import Sharding
from attncc.errors import AttnccError, field_error
from attncc.ir.analysis import analyze
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern

METHODS = ("p2p", "ulysses")
Rows = tuple[tuple[int, int], ...]  # half-open ranges of the leading axis


def _ranges(flags: np.ndarray) -> Rows:
    """The maximal runs ``[lo, hi)`` where ``flags`` is true."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return tuple(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _count(rows: Rows) -> int:
    return sum(hi - lo for lo, hi in rows)


@dataclass(frozen=True)
class Slices:
    """The slices of the leading axis (``rows``, half-open ranges) that rank ``dst`` gets from ``src``."""

    src: int
    dst: int
    rows: Rows

    @property
    def count(self) -> int:
        return _count(self.rows)


@dataclass(frozen=True)
class RankPlan:
    """One rank's part of a :class:`Plan` (Note [Planning from the analysis])."""

    rank: int
    rows: Rows  # the slices it owns, one range per chunk, in its layout's order
    incoming: tuple[Slices, ...]  # per source rank it needs slices from, in rank order
    outgoing: tuple[Slices, ...]  # per destination rank that needs its slices, in rank order
    sees_own: tuple[bool, ...]  # per chunk: whether its queries see keys of this rank
    sees_remote: tuple[bool, ...]  # per chunk: whether its queries see keys of another rank
    work: int  # kept pairs of its queries, over all heads
    ulysses_work: int  # kept pairs of its heads over every query, under Ulysses

    @property
    def received_rows(self) -> int:
        return sum(s.count for s in self.incoming)


@dataclass(frozen=True)
class Plan:
    """Who needs which keys from whom, and what each method would move (Note [Bytes of the methods]).

    ``method`` is the planner's pick: ``p2p`` (the needed slices, point to point) or
    ``ulysses`` (the head all-to-all), with ``reason``.
    """

    grid: Grid
    sharding: Sharding
    heads: int
    kv_heads: int
    head_dim: int
    itemsize: int
    ranks: tuple[RankPlan, ...]
    method: str
    reason: str
    data_dependent: bool  # planned for the most its data could keep

    @property
    def slice_tokens(self) -> int:
        return math.prod(self.grid.shape[1:])

    def p2p_bytes(self, rank: int) -> int:
        """Bytes of k and v rank ``rank`` receives under this plan."""
        return (
            self.ranks[rank].received_rows
            * self.slice_tokens
            * 2
            * self.kv_heads
            * self.head_dim
            * self.itemsize
        )

    def ring_bytes(self, rank: int) -> int:
        """Bytes of k and v a rank receives under ring attention (every other shard)."""
        others = self.grid.size - self.sharding.size(rank, self.grid)
        return others * 2 * self.kv_heads * self.head_dim * self.itemsize

    @property
    def ulysses_fits(self) -> bool:
        """Whether the head all-to-all applies: heads and kv heads divide into the ranks, which
        hold as many tokens each."""
        r = self.sharding.ranks
        return self.heads % r == 0 and self.kv_heads % r == 0 and self.sharding.even

    def ulysses_bytes(self, rank: int) -> int:
        """Bytes a rank receives under Ulysses: q, k, v over heads and the output back."""
        r = self.sharding.ranks
        rows = (r - 1) * (self.grid.size // r) * (2 * self.heads + 2 * self.kv_heads) // r
        return rows * self.head_dim * self.itemsize

    def bytes(self, method: str, rank: int) -> int:
        """Bytes rank ``rank`` receives in the forward pass under ``method`` (p2p, ring, ulysses)."""
        return {"p2p": self.p2p_bytes, "ring": self.ring_bytes, "ulysses": self.ulysses_bytes}[method](rank)

    def work(self, method: str) -> list[int]:
        """Kept pairs per rank under ``method`` (ring's is p2p's: the same queries per rank)."""
        if method == "ulysses":
            return [p.ulysses_work for p in self.ranks]
        return [p.work for p in self.ranks]

    def imbalance(self, method: str = "p2p") -> float:
        """Max over mean work per rank (1.0 is perfect balance)."""
        work = self.work(method)
        mean = sum(work) / len(work)
        return max(work) / mean if mean else 1.0


MAX_KEY_BLOCKS = 4096


def key_block(length: int, step: int) -> int:
    """Slices of the leading axis per unit of transfer (Note [Key blocks]): the smallest divisor
    of ``step`` (rows every chunk boundary is a multiple of) that keeps a ``length``-row axis
    within ``MAX_KEY_BLOCKS`` blocks, else ``step``."""
    return next((d for d in range(1, step + 1) if step % d == 0 and length // d <= MAX_KEY_BLOCKS), step)


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise field_error(AttnccError, name, value, f"an integer >= {low}")
    return value


@functools.lru_cache(maxsize=64)
def plan(
    pattern: Pattern,
    grid: Grid,
    sharding: Sharding,
    heads: int = 1,
    kv_heads: int | None = None,
    head_dim: int = 128,
    itemsize: int = 2,
) -> Plan:
    """The context-parallel plan of ``pattern`` on ``grid`` split by ``sharding`` (Note [Planning
    from the analysis]): for every pair of ranks the slices one needs of the other, each rank's
    work, the bytes of this plan, of ring attention and of Ulysses, and the method picked."""
    heads = _check_int("heads", heads, 1)
    kv_heads = heads if kv_heads is None else _check_int("kv_heads", kv_heads, 1)
    if heads % kv_heads:
        raise field_error(AttnccError, "kv_heads", kv_heads, f"a divisor of heads = {heads}")
    _check_int("head_dim", head_dim, 1)
    _check_int("itemsize", itemsize, 1)
    bounds = sharding.bounds(grid)
    step = math.gcd(*bounds)  # rows per query tile: every chunk is whole tiles
    rest = grid.shape[1:]
    unit = key_block(grid.shape[0], step)
    a = analyze(pattern, grid, q_tile=(step, *rest), kv_tile=(unit, *rest), heads=heads, head_dim=head_dim)
    per_head = a.tile_counts  # [H or 1, query tiles, key blocks]
    tiles = per_head.sum(0) * (heads if per_head.shape[0] == 1 else 1)
    head_totals = np.broadcast_to(per_head.sum((1, 2)), (heads,))
    spans = [slice(lo // step, hi // step) for lo, hi in itertools.pairwise(bounds)]  # query tiles per chunk
    counts = np.stack([tiles[t].sum(0) for t in spans])  # [chunks, key blocks]
    seen = np.repeat(counts > 0, unit, axis=1)  # [chunks, slices]: the key slices each chunk's queries see
    owner = np.array([sharding.owner(row, grid) for row in range(grid.shape[0])])
    per_rank = heads // sharding.ranks if heads % sharding.ranks == 0 else 0
    needs: dict[tuple[int, int], Rows] = {}
    for dst in range(sharding.ranks):
        wanted = seen[list(sharding.chunk_ids(dst))].any(0)
        for src in range(sharding.ranks):
            rows = _ranges(wanted & (owner == src)) if src != dst else ()
            if rows:
                needs[src, dst] = rows
    ranks = []
    for r in range(sharding.ranks):
        chunks = list(sharding.chunk_ids(r))
        mine = owner == r
        ranks.append(
            RankPlan(
                rank=r,
                rows=sharding.rows(r, grid),
                incoming=tuple(Slices(s, r, needs[s, r]) for s in range(sharding.ranks) if (s, r) in needs),
                outgoing=tuple(Slices(r, d, needs[r, d]) for d in range(sharding.ranks) if (r, d) in needs),
                sees_own=tuple(bool(seen[c][mine].any()) for c in chunks),
                sees_remote=tuple(bool(seen[c][~mine].any()) for c in chunks),
                work=int(counts[chunks].sum()),
                ulysses_work=int(head_totals[r * per_rank : (r + 1) * per_rank].sum()),
            )
        )
    draft = Plan(grid, sharding, heads, kv_heads, head_dim, itemsize, tuple(ranks), "p2p", "",
                 a.data_dependent)  # fmt: skip
    method, reason = _pick(draft)
    return Plan(grid, sharding, heads, kv_heads, head_dim, itemsize, tuple(ranks), method, reason,
                a.data_dependent)  # fmt: skip


def _pick(p: Plan) -> tuple[str, str]:
    """Note [Picking the method]: the head all-to-all when it fits (heads and kv heads divide
    into the ranks) and moves fewer bytes to the busiest rank than the needed slices do; the
    needed slices otherwise, which for a local pattern is a halo and always wins."""
    r = p.sharding.ranks
    p2p = max(p.p2p_bytes(i) for i in range(r))
    if r == 1:
        return "p2p", "one rank: nothing moves"
    if not p.ulysses_fits:
        why = "as many tokens on every rank" if not p.sharding.even else ""
        why = why or f"heads ({p.heads}) and kv heads ({p.kv_heads}) divisible by {r} ranks"
        return "p2p", f"ulysses needs {why}"
    ulysses = max(p.ulysses_bytes(i) for i in range(r))
    if ulysses < p2p:
        return "ulysses", f"its all-to-all moves {ulysses:,} bytes to a rank, the needed keys {p2p:,}"
    return "p2p", f"the needed keys move {p2p:,} bytes to the busiest rank, ulysses {ulysses:,}"


MAX_BALANCE_TILES = 1024


def balanced_sharding(
    pattern: Pattern, grid: Grid, ranks: int, heads: int = 1, kv_heads: int | None = None
) -> Sharding:
    """A contiguous sharding whose cuts even the work out (Note [Balanced cuts]).

    Note [Balanced cuts]: the analysis counts the kept pairs of every run of ``step`` rows (the
    smallest divisor of the leading axis that gives at most ``MAX_BALANCE_TILES`` runs); rank
    ``r`` begins at the run boundary where the running total comes closest to ``r / ranks`` of
    the whole. For a pattern whose work per row is uneven (packed documents of mixed lengths, a
    causal window's first rows) this evens out what equal chunks cannot; zigzag does it for a
    causal pattern with equal shards, which Ulysses needs.
    """
    _check_int("ranks", ranks, 1)
    length = grid.shape[0]
    step = next(d for d in range(1, length + 1) if length % d == 0 and length // d <= MAX_BALANCE_TILES)
    if length // step < ranks:
        raise field_error(AttnccError, "ranks", ranks, f"at most {length // step} (runs of {step} rows)")
    a = analyze(pattern, grid, q_tile=(step, *grid.shape[1:]), kv_tile=grid.shape, heads=heads)
    prefix = np.cumsum(a.tile_counts.sum((0, 2)))  # kept pairs up to the end of each run
    cuts: list[int] = []
    for r in range(1, ranks):
        lowest = cuts[-1] // step + 1 if cuts else 1  # at least one run per rank
        highest = length // step - (ranks - r)
        ends = np.arange(lowest, highest + 1)
        best = ends[np.argmin(np.abs(prefix[ends - 1] - prefix[-1] * r / ranks))]
        cuts.append(int(best) * step)
    return Sharding(ranks, "contiguous", tuple(cuts))


def choose_sharding(
    pattern: Pattern, grid: Grid, ranks: int, heads: int = 1, kv_heads: int | None = None
) -> Sharding:
    """The sharding (contiguous, zigzag or :func:`balanced_sharding`, in that order of
    preference) whose busiest rank has the least work, then the fewest bytes; an equal split the
    leading axis does not cut into is skipped."""
    best: tuple[int, int, Sharding] | None = None
    candidates = [Sharding(ranks, order) for order in ("contiguous", "zigzag")]
    candidates = [s for s in candidates if grid.shape[0] % s.chunks == 0]
    if 1 < ranks <= grid.shape[0]:
        candidates.append(balanced_sharding(pattern, grid, ranks, heads, kv_heads))
    for sharding in candidates:
        p = plan(pattern, grid, sharding, heads, kv_heads)
        key = (max(p.work("p2p")), max(p.p2p_bytes(i) for i in range(ranks)), sharding)
        if best is None or key[:2] < best[:2]:
            best = key
    if best is None:
        raise field_error(AttnccError, "grid.shape[0]", grid.shape[0], f"a multiple of {ranks} (ranks)")
    return best[2]

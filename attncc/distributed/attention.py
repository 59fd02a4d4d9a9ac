"""``attncc.distributed.attention``: sparse attention over a sharded grid (issue 19).

Note [Context-parallel execution]: every rank holds its tokens' q, k and v (``Sharding``) and
computes its own queries. Under the plan's ``p2p`` method it posts the exchange of the key slices
other ranks need from it and that it needs from them (Note [Exchange and wait] in
attncc.distributed.exchange), writes its own k/v into a buffer of the whole grid, and runs each
of its query chunks as a query region (its place in the grid: ``q_offset``) against its own keys
only, the pattern intersected with ``key_range`` over its rows: this overlaps the transfer. Once
the slices have arrived, they go into the buffer and each chunk that sees keys elsewhere runs
again, the pattern intersected with the received rows. The two partial results merge by their
log-sum-exp (:func:`merge`, torch operations, so autograd differentiates through the log-sum-exp
too), and the backward returns the received slices' dK/dV to their owners. The kernels visit only
key tiles the restricted pattern reaches, so the buffer's slices that never arrive (zeros) are
never read. The buffer costs O(N) memory per rank for k and v: ring attention needs O(N / R)
(a shortfall of this design, which reuses the query-region kernels unchanged).

Under ``ulysses`` every rank all-to-alls q, k and v over heads, so that it holds ``H / R`` heads
of every token, runs the whole pattern on them, and all-to-alls the output back.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from attncc.distributed.exchange import all_to_all, exchange, route_of, wait
from attncc.distributed.plan import METHODS, Plan, Rows, plan
from attncc.distributed.sharding import Sharding
from attncc.errors import AttnccError, field_error
from attncc.ir.canonical import resolve_heads
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern, key_range, per_head, union
from attncc.ir.text import format_pattern
from attncc.runtime.library import attention as local_attention


def _within(rows: Rows) -> Pattern:
    """Keys whose leading coordinate lies in one of ``rows`` (half-open ranges)."""
    return union(*(key_range(0, lo, hi - 1) for lo, hi in rows))


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Outputs ``[B, H, n, D]`` of attention over disjoint key sets, with their log-sum-exps
    ``[B, H, n]``, merged into the output over their union (float32; a query no part sees
    gets zeros, as the kernels give it)."""
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([p[1] for p in parts])
    top = lse.detach().amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # no key at all: weights 0
    weights = torch.exp(lse - top)  # exp(-inf) = 0 for a part without keys for that query
    total = weights.sum(0)
    total = torch.where(total > 0, total, torch.ones_like(total))
    out = sum(w[..., None] * p[0].float() for w, p in zip(weights, parts))
    return (out / total[..., None]).to(parts[0][0].dtype)


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid, sharding: Sharding, rank: int
) -> None:
    local = sharding.size(rank, grid)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[2] != local:
            allowed = f"[B, H, {local}, D] (this rank's {local} of the grid's {grid.size} tokens)"
            raise field_error(AttnccError, f"{name}.shape", tuple(t.shape), allowed)
    if k.shape != v.shape or k.shape[:1] + k.shape[3:] != q.shape[:1] + q.shape[3:]:
        raise field_error(AttnccError, "k.shape", tuple(k.shape), f"v's {tuple(v.shape)}, batch and D of q")


# Note [Context parallelism under torch.compile]: dynamo cannot trace the exchange (process
# groups, batch_isend_irecv, autograd Functions holding requests in flight; tracing them fails
# hard in torch 2.13), so the whole call runs eagerly: a compiled model graph-breaks here and
# compiles the blocks around it (the projections of ContextParallelAttention among them).
@torch.compiler.disable
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    grid: Grid | tuple[int, ...],
    sharding: Sharding,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
    method: str | None = None,
) -> torch.Tensor:
    """Context-parallel :func:`attncc.attention` of ``pattern`` on ``grid``, split by ``sharding``
    across the ranks of ``group`` (the default group when None); differentiable.

    Each rank passes its own tokens (``sharding.shard``): ``q`` ``[B, H, n, D]``, ``k``/``v``
    ``[B, H_kv, n, D]`` with ``n = sharding.size(rank, grid)``, and gets its tokens' output ``[B, H, n, D]``.
    The result is the single-process one's rows (deterministic for a fixed world size).
    ``method`` (``p2p`` or ``ulysses``) overrides the plan's pick (Note [Picking the method]).
    Example, on 4 ranks::

        sharding = Sharding(4, "zigzag")
        mine = [sharding.shard(t, dist.get_rank(), Grid(4096)) for t in (q, k, v)]
        out = attncc.distributed.attention(*mine, causal(), Grid(4096), sharding)
    """
    grid = grid if isinstance(grid, Grid) else Grid(tuple(grid))
    world = dist.get_world_size(group)
    if sharding.ranks != world:
        raise field_error(AttnccError, "sharding.ranks", sharding.ranks, f"{world} (the group's size)")
    rank = dist.get_rank(group)
    _check(q, k, v, grid, sharding, rank)
    if pattern.runtime_leaves:
        names = ", ".join(leaf.NAME for leaf in pattern.runtime_leaves)
        allowed = f"a pattern without data given at call time ({names}: not run context-parallel yet)"
        raise field_error(AttnccError, "pattern", format_pattern(pattern), allowed)
    p = plan(pattern, grid, sharding, q.shape[1], k.shape[1], q.shape[3], q.element_size())
    method = p.method if method is None else method
    if method not in METHODS:
        raise field_error(AttnccError, "method", method, ", ".join(METHODS))
    if method == "ulysses":
        if not p.ulysses_fits:
            allowed = f"p2p (ulysses needs heads and kv heads divisible by {world} ranks, even shards)"
            raise field_error(AttnccError, "method", method, allowed)
        return _ulysses(q, k, v, pattern, grid, sharding, group, scale, rank)
    return _p2p(q, k, v, pattern, grid, p, group, scale, rank)


def _p2p(q, k, v, pattern: Pattern, grid: Grid, p: Plan, group, scale, rank: int) -> torch.Tensor:
    """Note [Context-parallel execution], the needed slices point to point."""
    mine = p.ranks[rank]
    per_row = math.prod(grid.shape[1:])
    route = route_of(mine, per_row)
    own, received, pending = exchange(torch.stack((k, v)), route, group)
    own_tokens = torch.cat([torch.arange(lo * per_row, hi * per_row) for lo, hi in mine.rows]).to(q.device)
    buffer = own.new_zeros(*own.shape[:3], grid.size, own.shape[4]).index_copy(3, own_tokens, own)
    chunks = list(zip(mine.rows, q.split([(hi - lo) * per_row for lo, hi in mine.rows], 2)))
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in chunks]
    for i, ((lo, _), q_chunk) in enumerate(chunks):
        if mine.sees_own[i]:
            restricted = pattern & _within(mine.rows)
            parts[i].append(local_attention(q_chunk, buffer[0], buffer[1], restricted, scale, True, grid,
                                            q_offset=lo))  # fmt: skip
    arrived = wait(pending, received)
    if arrived:
        tokens = torch.cat(
            [torch.arange(lo * per_row, hi * per_row) for s in mine.incoming for lo, hi in s.rows]
        )
        buffer = buffer.index_copy(3, tokens.to(q.device), torch.cat(arrived, 3))
        remote = pattern & _within(tuple(r for s in mine.incoming for r in s.rows))
        for i, ((lo, _), q_chunk) in enumerate(chunks):
            if mine.sees_remote[i]:
                parts[i].append(local_attention(q_chunk, buffer[0], buffer[1], remote, scale, True, grid,
                                                q_offset=lo))  # fmt: skip
    outs = [merge(ps) if ps else torch.zeros_like(q_chunk) for ps, (_, q_chunk) in zip(parts, chunks)]
    return torch.cat(outs, 2)


def _ulysses(
    q, k, v, pattern: Pattern, grid: Grid, sharding: Sharding, group, scale, rank: int
) -> torch.Tensor:
    """The head all-to-all: ``H / R`` heads of every token on each rank."""
    world = sharding.ranks
    order = sharding.order_index(grid).to(q.device)
    inverse = torch.argsort(order)

    def gather_heads(t: torch.Tensor) -> torch.Tensor:
        b, h, n, d = t.shape  # [B, H, n, D] → [R, B, H / R, n, D] → all-to-all → [B, H / R, N, D]
        parts = all_to_all(t.reshape(b, world, h // world, n, d).transpose(0, 1), group)
        return parts.permute(1, 2, 0, 3, 4).reshape(b, h // world, world * n, d).index_select(2, inverse)

    heads = resolve_heads(pattern, q.shape[1])
    share = q.shape[1] // world
    mine = heads[rank * share : (rank + 1) * share]
    local = mine[0] if len(set(mine)) == 1 else per_head(list(mine))
    out = local_attention(gather_heads(q), gather_heads(k), gather_heads(v), local, scale, grid=grid)
    b, h, n, d = out.shape[0], q.shape[1], q.shape[2], q.shape[3]
    back = out.index_select(2, order).reshape(b, share, world, n, d).permute(2, 0, 1, 3, 4)
    return all_to_all(back, group).transpose(0, 1).reshape(b, h, n, d)

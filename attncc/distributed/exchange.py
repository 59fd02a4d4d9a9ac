"""Differentiable communication for context parallelism: the needed key slices point to point,
and the head all-to-all (issue 19).

Note [Exchange and wait]: the forward of :class:`_Exchange` posts every send and receive of a
rank's k/v slices at once (``batch_isend_irecv``) and returns without waiting, so the rank
computes its queries against its own keys while the slices travel; :class:`_Wait` then waits
for them before the remote keys are read. Its backward sends the gradients of the received
slices back to their owners and receives, from every rank it sent slices to, the gradients of
those slices, adding them to its own k/v gradient in rank order (deterministic). Every rank
runs exactly one exchange per call, forward and backward, since the exchange also returns the
rank's own k/v, which every rank's output depends on: no rank skips the backward's messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from attncc.distributed.plan import RankPlan, Rows

_FORWARD, _BACKWARD = 0, 1  # message tags


@dataclass(frozen=True)
class Route:
    """A rank's messages: ``(peer, local token indices)`` of its own k/v to send, and ``(peer,
    tokens)`` to receive, in rank order."""

    sends: tuple[tuple[int, torch.Tensor], ...]
    receives: tuple[tuple[int, int], ...]


@dataclass(eq=False)
class Pending:
    """The posted receives of an exchange (Note [Exchange and wait])."""

    works: list = field(default_factory=list)


def local_tokens(own: Rows, rows: Rows, per_row: int) -> torch.Tensor:
    """The positions, in a rank's local tokens (its ``own`` ranges in order), of the tokens of
    ``rows`` (each a run of ``own``'s slices, perhaps across two adjacent owned ranges)."""
    local = {row: at for at, row in enumerate(r for lo, hi in own for r in range(lo, hi))}
    slots = torch.tensor([local[r] for lo, hi in rows for r in range(lo, hi)], dtype=torch.int64)
    return (slots[:, None] * per_row + torch.arange(per_row)).flatten()


def route_of(rank_plan: RankPlan, per_row: int) -> Route:
    sends = tuple((s.dst, local_tokens(rank_plan.rows, s.rows, per_row)) for s in rank_plan.outgoing)
    receives = tuple((s.src, s.count * per_row) for s in rank_plan.incoming)
    return Route(sends, receives)


def _peer(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, route: Route, group, pending: Pending, kv: torch.Tensor):  # type: ignore[override]
        """``kv`` ``[2, B, H_kv, n, D]`` (k and v of the rank's tokens) → ``(kv, *received)``."""
        ctx.route, ctx.group = route, group
        ops, received = [], []
        for peer, index in route.sends:
            part = kv.index_select(3, index.to(kv.device)).contiguous()
            ops.append(dist.P2POp(dist.isend, part, _peer(group, peer), group, _FORWARD))
        for peer, tokens in route.receives:
            buf = kv.new_empty(*kv.shape[:3], tokens, kv.shape[4])
            ops.append(dist.P2POp(dist.irecv, buf, _peer(group, peer), group, _FORWARD))
            received.append(buf)
        pending.works = dist.batch_isend_irecv(ops) if ops else []
        ctx.kv_shape = kv.shape
        return (kv, *received)

    @staticmethod
    def backward(ctx, grad_kv: torch.Tensor, *grad_received: torch.Tensor):  # type: ignore[override]
        route, group = ctx.route, ctx.group
        ops, returned = [], []
        for (peer, _), grad in zip(route.receives, grad_received):
            ops.append(dist.P2POp(dist.isend, grad.contiguous(), _peer(group, peer), group, _BACKWARD))
        for peer, index in route.sends:
            buf = grad_kv.new_empty(*grad_kv.shape[:3], len(index), grad_kv.shape[4])
            ops.append(dist.P2POp(dist.irecv, buf, _peer(group, peer), group, _BACKWARD))
            returned.append((index, buf))
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        grad = grad_kv.clone()
        for index, buf in returned:  # rank order: the same sums on every run
            grad.index_add_(3, index.to(grad.device), buf)
        return None, None, None, grad


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pending: Pending, *received: torch.Tensor):  # type: ignore[override]
        for work in pending.works:
            work.wait()
        pending.works = []
        return received

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        return (None, *grads)


def exchange(kv: torch.Tensor, route: Route, group) -> tuple[torch.Tensor, list[torch.Tensor], Pending]:
    """Post the exchange of ``kv``'s slices (Note [Exchange and wait]): ``(kv, received
    buffers, pending)``; the buffers hold data only after :func:`wait`."""
    pending = Pending()
    own, *received = _Exchange.apply(route, group, pending, kv)
    return own, received, pending


def wait(pending: Pending, received: list[torch.Tensor]) -> list[torch.Tensor]:
    """The received slices, once they have arrived."""
    if not received:
        for work in pending.works:
            work.wait()
        return []
    out = _Wait.apply(pending, *received)
    return list(out) if isinstance(out, tuple) else [out]


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, x: torch.Tensor):  # type: ignore[override]
        """``x`` ``[R, ...]``: part ``i`` goes to rank ``i``; returns part ``i`` from rank ``i``."""
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)  # x's strides: contiguous, as the collective writes it
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return None, out


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable equal-split all-to-all over ``x``'s first dimension."""
    return _AllToAll.apply(group, x)

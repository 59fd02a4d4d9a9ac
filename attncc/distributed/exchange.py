"""Differentiable communication for context parallelism: the needed key slices point to point,
and the head all-to-all (issue 19).

Note [Exchange and wait]: the forward of :class:`_Exchange` posts every send and receive of a
rank's k/v slices at once (``batch_isend_irecv``) and returns without waiting, so the rank
computes its queries against its own keys while the slices travel; :class:`_Wait` then waits
for them before the remote keys are read. In the backward, the gradients of the received slices
are known as soon as the remote keys' part is differentiated: :class:`_Wait`'s backward posts
their sends back to the owners, and the receives of the gradients of the slices this rank sent,
so they travel while autograd differentiates the own keys' part (created earlier in the forward,
it runs later). :class:`_Exchange`'s backward waits for them and adds them to the rank's own k/v
gradient in rank order (deterministic); a rank that received nothing posts there. Every rank runs
exactly one exchange per call, forward and backward, since the exchange also returns the rank's
own k/v, which every rank's output depends on: no rank skips the backward's messages.
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
    """An exchange's messages in flight (Note [Exchange and wait]): the forward's, then the
    backward's, with the buffers the returned gradients arrive in (None: not posted yet)."""

    route: Route
    group: dist.ProcessGroup | None
    works: list = field(default_factory=list)
    returned: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    sent: list[torch.Tensor] = field(default_factory=list)  # kept alive until the sends complete

    def post_backward(self, grad_received: tuple[torch.Tensor, ...], like: torch.Tensor) -> None:
        """Send the received slices' gradients back; receive those of the slices this rank sent."""
        ops, self.returned = [], []
        self.sent = [grad.contiguous() for grad in grad_received]
        for (peer, _), grad in zip(self.route.receives, self.sent):
            ops.append(dist.P2POp(dist.isend, grad, _peer(self.group, peer), self.group, _BACKWARD))
        for peer, index in self.route.sends:
            buf = like.new_empty(*like.shape[:3], len(index), like.shape[4])
            ops.append(dist.P2POp(dist.irecv, buf, _peer(self.group, peer), self.group, _BACKWARD))
            self.returned.append((index, buf))
        self.works = dist.batch_isend_irecv(ops) if ops else []


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
    def forward(ctx, pending: Pending, kv: torch.Tensor):  # type: ignore[override]
        """``kv`` ``[2, B, H_kv, n, D]`` (k and v of the rank's tokens) → ``(kv, *received)``."""
        ctx.pending = pending
        route, group = pending.route, pending.group
        ops, received = [], []
        for peer, index in route.sends:
            part = kv.index_select(3, index.to(kv.device)).contiguous()
            ops.append(dist.P2POp(dist.isend, part, _peer(group, peer), group, _FORWARD))
        for peer, tokens in route.receives:
            buf = kv.new_empty(*kv.shape[:3], tokens, kv.shape[4])
            ops.append(dist.P2POp(dist.irecv, buf, _peer(group, peer), group, _FORWARD))
            received.append(buf)
        pending.works = dist.batch_isend_irecv(ops) if ops else []
        return (kv, *received)

    @staticmethod
    def backward(ctx, grad_kv: torch.Tensor, *grad_received: torch.Tensor):  # type: ignore[override]
        pending: Pending = ctx.pending
        if pending.returned is None:  # no _Wait posted them: this rank received nothing
            pending.post_backward(grad_received, grad_kv)
        for work in pending.works:
            work.wait()
        grad = grad_kv.clone()
        for index, buf in pending.returned or []:  # rank order: the same sums on every run
            grad.index_add_(3, index.to(grad.device), buf)
        pending.works, pending.returned, pending.sent = [], None, []
        return None, grad


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pending: Pending, *received: torch.Tensor):  # type: ignore[override]
        ctx.pending = pending
        for work in pending.works:
            work.wait()
        pending.works = []
        return received

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        ctx.pending.post_backward(grads, grads[0])
        return (None, *grads)


def exchange(kv: torch.Tensor, route: Route, group) -> tuple[torch.Tensor, list[torch.Tensor], Pending]:
    """Post the exchange of ``kv``'s slices (Note [Exchange and wait]): ``(kv, received
    buffers, pending)``; the buffers hold data only after :func:`wait`."""
    pending = Pending(route, group)
    own, *received = _Exchange.apply(pending, kv)
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

"""``ContextParallelAttention``: an :class:`attncc.nn.SparseAttention` run context-parallel (issue 19)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from attncc.distributed.attention import attention
from attncc.distributed.sharding import Sharding
from attncc.errors import AttnccError, field_error
from attncc.nn import SparseAttention


class ContextParallelAttention(nn.Module):
    """``attn``'s attention over a grid split across the ranks of ``group`` by ``sharding``.

    ``forward(x)`` takes this rank's tokens ``[B, n, dim]`` (``sharding.shard(x, rank, grid,
    dim=1)`` of the whole ``[B, N, dim]``) and returns their output, the rows of ``attn(x)``.
    The projections are ``attn``'s own (shared, not copied): each rank holds the same weights
    and, in training, their gradients are summed over the group as for any data-parallel model
    (DDP or an all-reduce). ``method`` overrides the planner's pick (attncc.distributed.attention).
    """

    def __init__(
        self,
        attn: SparseAttention,
        sharding: Sharding,
        group: dist.ProcessGroup | None = None,
        method: str | None = None,
    ) -> None:
        super().__init__()
        if attn.rpb is not None:
            raise field_error(
                AttnccError, "attn.rpb", "a relative position bias", "None (not run context-parallel)"
            )
        if attn.attn_drop:
            raise field_error(AttnccError, "attn.attn_drop", attn.attn_drop, "0.0 (not run context-parallel)")
        sharding.check(attn.grid)
        self.attn, self.sharding, self.group, self.method = attn, sharding, group, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        local = self.sharding.size(dist.get_rank(self.group), a.grid)
        if x.dim() != 3 or x.shape[1:] != (local, a.dim):
            raise field_error(
                AttnccError, "x.shape", tuple(x.shape), f"[B, {local}, {a.dim}] (this rank's tokens)"
            )
        q = a.q(x).unflatten(-1, (a.heads, a.head_dim)).transpose(1, 2)
        k, v = a.kv(x).unflatten(-1, (2, a.kv_heads, a.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, a.pattern, a.grid, self.sharding, self.group, method=self.method)
        return a.proj(out.transpose(1, 2).flatten(-2))

"""``attncc.nn.SparseAttention``: multi-head attention with a sparse pattern, as a drop-in module.

Vision and video models keep tokens as ``[B, *grid, C]`` (or flattened
``[B, N, C]``); the module projects them to heads, runs
:func:`attncc.attention` in the spatial layout (no permute copies), and
projects back. ``kv_heads < heads`` gives GQA/MQA. ``rel_pos_bias=True`` learns a
relative position bias per head (NATTEN's and Swin's ``rpb``: attncc.ir.rel_pos_bias), and
``attn_drop`` drops attention probabilities while training (timm's ``attn_drop``).
``CrossAttention`` takes its keys and values from a separate context ``[B, M, context_dim]``
(text over an image, an image over a text: Note [Cross-attention] in attncc.runtime.cross).
"""

from __future__ import annotations

import torch
from torch import nn

from attncc.errors import AttnccError, field_error
from attncc.ir.canonical import canonicalize, resolve_heads
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern, dense
from attncc.ir.score import rel_pos_bias as rel_pos_bias_term
from attncc.ir.score import table_units
from attncc.ir.symbolic import offset_reach, rules
from attncc.ir.validate import validate, validate_cross
from attncc.runtime.library import attention


def table_sizes(pattern: Pattern, grid: Grid, heads: int) -> tuple[int, ...]:
    """The smallest relative position table (``2 r + 1`` per axis) that reaches every offset
    ``pattern`` keeps on ``grid``, in units of its dilation (Note [Score terms] in
    attncc.ir.score): for a neighborhood of window ``w``, NATTEN's ``2 w - 1``."""
    radius = [0] * grid.rank
    for head in resolve_heads(pattern, heads):
        canon = canonicalize(head, grid)
        units = table_units(canon, grid)
        for a, (reach, unit) in enumerate(zip(offset_reach(rules(canon, grid), grid), units)):
            radius[a] = max(radius[a], -(-reach // unit))
    return tuple(2 * r + 1 for r in radius)


class SparseAttention(nn.Module):
    """Multi-head self-attention restricted to ``pattern`` on ``grid``.

    ``forward(x)`` takes ``[B, *grid, dim]`` or ``[B, N, dim]`` (N = grid size)
    and returns the same shape. ``dim`` must split into ``heads`` heads.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        pattern: Pattern,
        grid: tuple[int, ...] | Grid,
        kv_heads: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        rel_pos_bias: bool = False,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if heads < 1 or dim % heads:
            raise field_error(AttnccError, "heads", heads, f"a divisor of dim = {dim}")
        if kv_heads < 1 or heads % kv_heads:
            raise field_error(AttnccError, "kv_heads", kv_heads, f"a divisor of heads = {heads}")
        self.grid = grid if isinstance(grid, Grid) else Grid(tuple(grid))
        validate(pattern, self.grid, heads)  # a pattern that cannot fit fails here, not at the first step
        self.pattern, self.heads, self.kv_heads = pattern, heads, kv_heads
        self.dim = dim
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        if isinstance(attn_drop, bool) or not isinstance(attn_drop, (int, float)) or not 0 <= attn_drop < 1:
            raise field_error(AttnccError, "attn_drop", attn_drop, "a number in [0, 1)")
        self.attn_drop = float(attn_drop)
        self.rpb: nn.Parameter | None = None
        if rel_pos_bias:
            # As NATTEN and Swin: one table per head reaching every kept offset, truncated normal.
            self.rpb = nn.Parameter(torch.empty(heads, *table_sizes(pattern, self.grid, heads)))
            nn.init.trunc_normal_(self.rpb, std=0.02)

    @classmethod
    def from_fused(
        cls, qkv: nn.Linear, proj: nn.Linear, heads: int, pattern: Pattern, grid: tuple[int, ...] | Grid
    ) -> SparseAttention:
        """A module with the weights of a fused ``qkv`` projection (rows q, k, v, each heads x head_dim,
        as timm and most ViTs lay them out) and an output ``proj``: a drop-in for their attention."""
        dim = proj.in_features
        if qkv.out_features != 3 * dim or qkv.in_features != dim:
            raise field_error(AttnccError, "qkv", tuple(qkv.weight.shape), f"a Linear({dim}, {3 * dim})")
        module = cls(
            dim, heads, pattern, grid, qkv_bias=qkv.bias is not None, proj_bias=proj.bias is not None
        )
        bias = (None, None) if qkv.bias is None else (qkv.bias[:dim], qkv.bias[dim:])
        return module._load((qkv.weight[:dim], bias[0]), (qkv.weight[dim:], bias[1]), proj)

    @classmethod
    def from_projections(
        cls,
        q: nn.Linear,
        k: nn.Linear,
        v: nn.Linear,
        proj: nn.Linear,
        heads: int,
        pattern: Pattern,
        grid: tuple[int, ...] | Grid,
    ) -> SparseAttention:
        """A module with the weights of separate ``q``, ``k``, ``v`` projections and an output
        ``proj`` (Hugging Face's q_proj/k_proj/v_proj/o_proj); k and v with fewer heads give GQA."""
        dim = q.in_features
        for name, layer in (("q", q), ("proj", proj)):
            if tuple(layer.weight.shape) != (dim, dim):
                raise field_error(AttnccError, name, tuple(layer.weight.shape), f"a Linear({dim}, {dim})")
        if heads < 1 or dim % heads:
            raise field_error(AttnccError, "heads", heads, f"a divisor of dim = {dim}")
        head_dim = dim // heads
        kv_shape = (k.out_features, dim)  # kv_heads x head_dim rows, for k and v alike
        for name, layer in (("k", k), ("v", v)):
            if tuple(layer.weight.shape) != kv_shape or not kv_shape[0] or kv_shape[0] % head_dim:
                allowed = f"k and v both a Linear({dim}, kv_heads x {head_dim})"
                raise field_error(AttnccError, name, tuple(layer.weight.shape), allowed)
        biased = {layer.bias is not None for layer in (q, k, v)}
        if len(biased) != 1:
            raise field_error(AttnccError, "q/k/v bias", "mixed", "a bias on all three or on none")
        module = cls(
            dim, heads, pattern, grid, kv_heads=k.out_features // head_dim, qkv_bias=biased.pop(),
            proj_bias=proj.bias is not None,
        )  # fmt: skip
        kv_bias = None if k.bias is None else torch.cat([k.bias, v.bias])
        return module._load((q.weight, q.bias), (torch.cat([k.weight, v.weight]), kv_bias), proj)

    def _load(
        self,
        q: tuple[torch.Tensor, torch.Tensor | None],
        kv: tuple[torch.Tensor, torch.Tensor | None],
        proj: nn.Linear,
    ) -> SparseAttention:
        """Copy (weight, bias) of the q and kv projections and ``proj`` in; on their device and dtype."""
        module = self.to(proj.weight.device, proj.weight.dtype)
        with torch.no_grad():
            for layer, (weight, bias) in ((module.q, q), (module.kv, kv)):
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
            module.proj.load_state_dict(proj.state_dict())
        return module

    def forward(
        self, x: torch.Tensor, attn_mask: None = None, is_causal: bool = False, data: dict | None = None
    ) -> torch.Tensor:
        """``attn_mask``/``is_causal`` are accepted for drop-in calls and must stay unset: the
        pattern is the mask (use ``causal()`` in it). ``data`` gives the pattern's data that come
        with each call (a block layout, document ids, key lengths: :func:`attncc.attention`)."""
        if attn_mask is not None or is_causal:
            raise AttnccError(
                "SparseAttention takes no attn_mask or is_causal: the pattern is the mask "
                "(put causal() in the pattern for a causal one)"
            )
        shape = x.shape
        tokens_ok = x.dim() >= 3 and tuple(shape[1:-1]) in (self.grid.shape, (self.grid.size,))
        if not tokens_ok or shape[-1] != self.dim:
            grid = ", ".join(map(str, self.grid.shape))
            allowed = f"[B, {grid}, {self.dim}] or [B, {self.grid.size}, {self.dim}] (dim = {self.dim})"
            raise field_error(AttnccError, "x.shape", tuple(shape), allowed)
        tokens = x.reshape(shape[0], *self.grid.shape, shape[-1])
        q = self.q(tokens).unflatten(-1, (self.heads, self.head_dim))
        k, v = self.kv(tokens).unflatten(-1, (2, self.kv_heads, self.head_dim)).unbind(-3)
        # [B, *grid, H, D]; a 1-D one could read as [B, H, N, D]: say which (Note [Ambiguous layouts])
        score = None if self.rpb is None else rel_pos_bias_term(self.rpb)
        drop = self.attn_drop if self.training else 0.0
        out = attention(
            q,
            k,
            v,
            self.pattern,
            grid=self.grid,
            layout="spatial",
            score_mod=score,
            dropout_p=drop,
            data=data,
        )
        return self.proj(out.flatten(-2)).reshape(shape)


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from ``x`` on ``grid``, keys and values from a context.

    ``forward(x, context, data=None)`` takes ``x`` as ``[B, *grid, dim]`` or ``[B, N, dim]`` (N =
    grid size) and ``context`` as ``[B, M, context_dim]`` (any M: text tokens, an image's tokens
    flattened), and returns ``x``'s shape. ``pattern`` is one across the two grids (Note
    [Cross-attention] in attncc.runtime.cross): ``dense()`` (the default), ``key_lengths()``
    (context padding per batch element), ``documents()`` (each query sees the context tokens of
    its id: ``data={"documents": [B, M], "query_documents": [B, N]}``), ...; ``data`` gives its
    data per call. ``kv_heads < heads`` gives GQA/MQA.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        grid: tuple[int, ...] | Grid,
        pattern: Pattern | None = None,
        context_dim: int | None = None,
        kv_heads: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        context_dim = dim if context_dim is None else context_dim
        if heads < 1 or dim % heads:
            raise field_error(AttnccError, "heads", heads, f"a divisor of dim = {dim}")
        if kv_heads < 1 or heads % kv_heads:
            raise field_error(AttnccError, "kv_heads", kv_heads, f"a divisor of heads = {heads}")
        if isinstance(context_dim, bool) or not isinstance(context_dim, int) or context_dim < 1:
            raise field_error(AttnccError, "context_dim", context_dim, "an integer >= 1 (None: dim)")
        self.grid = grid if isinstance(grid, Grid) else Grid(tuple(grid))
        self.pattern = dense() if pattern is None else pattern
        # Fails here, not at the first step, for a pattern that compares places (any context length).
        validate_cross(self.pattern, self.grid, Grid((1,)), heads)
        self.heads, self.kv_heads, self.dim, self.head_dim = heads, kv_heads, dim, dim // heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * kv_heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        if isinstance(attn_drop, bool) or not isinstance(attn_drop, (int, float)) or not 0 <= attn_drop < 1:
            raise field_error(AttnccError, "attn_drop", attn_drop, "a number in [0, 1)")
        self.attn_drop = float(attn_drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor, data: dict | None = None) -> torch.Tensor:
        shape = x.shape
        tokens_ok = x.dim() >= 3 and tuple(shape[1:-1]) in (self.grid.shape, (self.grid.size,))
        if not tokens_ok or shape[-1] != self.dim:
            grid = ", ".join(map(str, self.grid.shape))
            allowed = f"[B, {grid}, {self.dim}] or [B, {self.grid.size}, {self.dim}] (dim = {self.dim})"
            raise field_error(AttnccError, "x.shape", tuple(shape), allowed)
        width = self.kv.in_features
        if context.dim() != 3 or context.shape[0] != shape[0] or context.shape[-1] != width:
            allowed = f"[{shape[0]}, M, {width}] (x's batch, any M >= 1, context_dim = {width})"
            raise field_error(AttnccError, "context.shape", tuple(context.shape), allowed)
        tokens = x.reshape(shape[0], *self.grid.shape, shape[-1])
        q = self.q(tokens).unflatten(-1, (self.heads, self.head_dim))  # [B, *grid, H, D]
        k, v = self.kv(context).unflatten(-1, (2, self.kv_heads, self.head_dim)).unbind(-3)  # [B, M, H_kv, D]
        drop = self.attn_drop if self.training else 0.0
        out = attention(q, k, v, self.pattern, q_grid=self.grid, layout="spatial", dropout_p=drop, data=data)
        return self.proj(out.flatten(-2)).reshape(shape)

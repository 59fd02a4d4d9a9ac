"""``attncc.nn.SparseAttention``: multi-head attention with a sparse pattern, as a drop-in module.

Vision and video models keep tokens as ``[B, *grid, C]`` (or flattened
``[B, N, C]``); the module projects them to heads, runs
:func:`attncc.attention` in the spatial layout (no permute copies), and
projects back. ``kv_heads < heads`` gives GQA/MQA. ``rel_pos_bias=True`` learns a
relative position bias per head (NATTEN's and Swin's ``rpb``: attncc.ir.rel_pos_bias), and
``attn_drop`` drops attention probabilities while training (timm's ``attn_drop``).

Note [Generating with a cache]: a model that generates its grid chunk by chunk (an LM token by
token, a video a few frames at a time) keeps the keys and values it has computed in a
:class:`KVCache` (``SparseAttention.new_cache``) and runs ``forward(x_new, cache=cache)`` on
the new slices of the grid's leading axis only. The new queries are a box of the grid at each
batch element's fill level (query regions: Note [Query regions] in attncc.lower.plan), so the
pattern keeps its meaning in the whole grid; the slices not written yet hold no keys, which the
module says by intersecting the pattern with ``key_lengths()`` (the keys written so far, per
batch element): a pattern causal along the leading axis never reaches them, and any other
pattern sees exactly the keys that exist. The fill levels are a device tensor, so a step never
syncs with the host and torch.compile traces one graph for every step of the same size.

``CrossAttention`` takes its keys and values from a separate context ``[B, M, context_dim]``
(text over an image, an image over a text: Note [Cross-attention] in attncc.runtime.cross).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attncc.errors import AttnccError, field_error
from attncc.ir.canonical import canonicalize, resolve_heads
from attncc.ir.grid import Grid
from attncc.ir.nodes import KeyLengths, Pattern, dense, key_lengths
from attncc.ir.score import rel_pos_bias as rel_pos_bias_term
from attncc.ir.score import table_units
from attncc.ir.segments import BySegments, Segments
from attncc.ir.symbolic import offset_reach, rules
from attncc.ir.validate import validate, validate_cross, validate_segments
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


def _space(
    pattern: Pattern, grid: object, heads: int, rel_pos_bias: bool, attn_drop: float
) -> Segments | None:
    """The space of a pattern per pair of segments, checked against ``grid`` (the space or
    None) and the module's options; None for a pattern on one grid."""
    if not isinstance(pattern, BySegments):
        if isinstance(grid, Segments):
            allowed = "a grid, or by_segments(...) as the pattern of a space of segments"
            raise field_error(AttnccError, "grid", str(grid), allowed)
        return None
    if grid is not None and grid != pattern.space:
        raise field_error(AttnccError, "grid", str(grid), f"None or the pattern's space, {pattern.space}")
    validate_segments(pattern, heads)
    why = "the segments kernels take no score terms or dropout yet (Note [Segment kernels])"
    if rel_pos_bias:
        raise field_error(
            AttnccError, "rel_pos_bias", rel_pos_bias, "False with a pattern per pair of segments", why
        )
    if attn_drop:
        raise field_error(AttnccError, "attn_drop", attn_drop, "0.0 with a pattern per pair of segments", why)
    return pattern.space


@dataclass(eq=False)
class KVCache:
    """The keys and values a :class:`SparseAttention` has computed so far (Note [Generating
    with a cache]): ``k``/``v`` ``[B, *grid, kv_heads, head_dim]``, and ``filled``, an int64
    ``[B]`` tensor of the slices of the grid's leading axis written per batch element (set it to
    start batch elements at different places; ``reset()`` empties the cache)."""

    k: torch.Tensor
    v: torch.Tensor
    filled: torch.Tensor

    def reset(self) -> None:
        self.filled.zero_()


class SparseAttention(nn.Module):
    """Multi-head self-attention restricted to ``pattern`` on ``grid``.

    ``forward(x)`` takes ``[B, *grid, dim]`` or ``[B, N, dim]`` (N = grid size)
    and returns the same shape. ``dim`` must split into ``heads`` heads.

    A pattern per pair of segments (``by_segments``: Note [Segment spaces] in attncc.ir.segments)
    takes its space as ``grid`` (or None): ``x`` is then ``[B, N, dim]`` over the whole space,
    the segments' tokens in turn (a text's, then a video's frames row-major), and the module
    runs the segments kernels (Note [Segment kernels] in attncc.lower.segments), which take no
    ``rel_pos_bias``, ``attn_drop`` or cache yet.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        pattern: Pattern,
        grid: tuple[int, ...] | Grid | Segments | None = None,
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
        self.space = _space(pattern, grid, heads, rel_pos_bias, attn_drop)
        if self.space is not None:
            grid = (self.space.size,)  # the space's tokens in turn: what x and the projections see
        elif grid is None:
            raise field_error(AttnccError, "grid", None, "the grid's sizes (a tuple or an attncc.ir.Grid)")
        self.grid = grid if isinstance(grid, Grid) else Grid(tuple(grid))
        if self.space is None:
            validate(pattern, self.grid, heads)  # a pattern that cannot fit fails here, not at the first step
        self.pattern, self.heads, self.kv_heads = pattern, heads, kv_heads
        # Note [Generating with a cache]: a step's pattern (None: the pattern cuts keys itself)
        own_lengths = any(isinstance(leaf, KeyLengths) for leaf in pattern.runtime_leaves)
        self.cache_pattern = None if own_lengths or self.space else pattern & key_lengths()
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

    def new_cache(
        self, batch: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> KVCache:
        """An empty :class:`KVCache` of ``batch`` sequences over the module's grid (Note
        [Generating with a cache]); dtype and device default to the projections'."""
        weight = self.kv.weight
        shape = (batch, *self.grid.shape, self.kv_heads, self.head_dim)
        k, v = (torch.zeros(shape, dtype=dtype or weight.dtype, device=device or weight.device) for _ in "kv")
        return KVCache(k, v, torch.zeros(batch, dtype=torch.long, device=k.device))

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: None = None,
        is_causal: bool = False,
        data: dict | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``attn_mask``/``is_causal`` are accepted for drop-in calls and must stay unset: the
        pattern is the mask (use ``causal()`` in it). ``data`` gives the pattern's data that come
        with each call (a block layout, document ids, key lengths: :func:`attncc.attention`).
        With ``cache``, ``x`` is the next slices of the grid's leading axis (``[B, t, *grid[1:],
        dim]`` or ``[B, t * prod(grid[1:]), dim]``): their keys and values are written into the
        cache, they attend to every key written so far, and the cache advances by ``t`` (Note
        [Generating with a cache])."""
        if attn_mask is not None or is_causal:
            raise AttnccError(
                "SparseAttention takes no attn_mask or is_causal: the pattern is the mask "
                "(put causal() in the pattern for a causal one)"
            )
        if cache is not None:
            return self._step(x, cache, data)
        shape = x.shape
        tokens_ok = x.dim() >= 3 and tuple(shape[1:-1]) in (self.grid.shape, (self.grid.size,))
        if not tokens_ok or shape[-1] != self.dim:
            grid = ", ".join(map(str, self.grid.shape))
            allowed = f"[B, {grid}, {self.dim}] or [B, {self.grid.size}, {self.dim}] (dim = {self.dim})"
            raise field_error(AttnccError, "x.shape", tuple(shape), allowed)
        tokens = x.reshape(shape[0], *self.grid.shape, shape[-1])
        q = self.q(tokens).unflatten(-1, (self.heads, self.head_dim))
        k, v = self.kv(tokens).unflatten(-1, (2, self.kv_heads, self.head_dim)).unbind(-3)
        if self.space is not None:  # [B, H, N, D] of the whole space (Note [Segment kernels])
            out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.pattern, data=data)
            return self.proj(out.transpose(1, 2).flatten(-2)).reshape(shape)
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

    def _step(self, x: torch.Tensor, cache: KVCache, data: dict | None) -> torch.Tensor:
        """One generation step: ``x``'s slices attend to the cache (Note [Generating with a cache])."""
        if self.space is not None:
            allowed = "None with a pattern per pair of segments (the segments kernels take no cache yet)"
            raise field_error(AttnccError, "cache", "a KVCache", allowed)
        rest, width = self.grid.shape[1:], self.grid.size // self.grid.shape[0]
        shape = x.shape
        spatial = x.dim() == self.grid.rank + 2 and tuple(shape[2:-1]) == rest
        flat = x.dim() == 3 and shape[1] % width == 0
        t = shape[1] if spatial else shape[1] // width
        if not (spatial or flat) or shape[-1] != self.dim or not 1 <= t <= self.grid.shape[0]:
            dims = ", ".join(["t", *map(str, rest)])
            allowed = (
                f"[B, {dims}, {self.dim}] or [B, t x {width}, {self.dim}], t from 1 to {self.grid.shape[0]}"
            )
            raise field_error(AttnccError, "x.shape (with a cache)", tuple(shape), allowed)
        if self.cache_pattern is None:
            why = "the cache gives key_lengths itself (the keys written so far)"
            raise field_error(AttnccError, "pattern (with a cache)", str(self.pattern), "no key_lengths", why)
        b = shape[0]
        if tuple(cache.k.shape[1:-2]) != self.grid.shape or cache.k.shape[0] != b:
            sizes = ", ".join(map(str, self.grid.shape))
            allowed = f"[{b}, {sizes}, kv_heads, head_dim] (SparseAttention.new_cache)"
            raise field_error(AttnccError, "cache.k shape", tuple(cache.k.shape), allowed)
        tokens = x.reshape(b, t, *rest, shape[-1])
        q = self.q(tokens).unflatten(-1, (self.heads, self.head_dim))
        k, v = self.kv(tokens).unflatten(-1, (2, self.kv_heads, self.head_dim)).unbind(-3)
        start = cache.filled
        torch._assert_async(
            (start >= 0).all() & (start + t <= self.grid.shape[0]).all(),
            f"SparseAttention: a cache's filled + {t} new slices must stay within 0..{self.grid.shape[0]}",
        )
        rows = (start[:, None] + torch.arange(t, device=start.device)).clamp(max=self.grid.shape[0] - 1)
        batch = torch.arange(b, device=start.device)[:, None]
        cache.k[batch, rows] = k.to(cache.k.dtype)
        cache.v[batch, rows] = v.to(cache.v.dtype)
        score = None if self.rpb is None else rel_pos_bias_term(self.rpb)
        out = attention(
            q,
            cache.k,
            cache.v,
            self.cache_pattern,
            grid=self.grid,
            layout="spatial",
            q_offset=start,
            score_mod=score,
            dropout_p=self.attn_drop if self.training else 0.0,
            data={**(data or {}), "key_lengths": (start + t) * width},
        )
        cache.filled = start + t
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

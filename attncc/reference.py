"""Brute-force reference attention: the materialised mask, in float32 or float64.

Every kernel attncc generates is checked against :func:`attention`. It builds
the whole ``[B, H, N, N]`` mask from :func:`attncc.ir.mask.mask`, so keep N to a
few thousand tokens.

Note [Queries with no keys]: a query that sees no key (possible with e.g.
``strided`` intersected with a band) gets an output row of zeros and a
log-sum-exp of ``-inf``; it never produces NaN. Kernels must do the same.

Note [Masked keys never touch v]: a row's output depends only on the keys it
keeps. ``probs @ v`` would multiply a masked key's probability (exactly 0) by
its value, and ``0 * inf`` is NaN, so an ``inf`` or NaN in v would reach rows
that never look at it. :func:`_weighted_sum` multiplies only the finite part
of v and adds each kept non-finite value by IEEE's rules (``p * inf = inf``
for ``p > 0``; NaN, or ``inf`` and ``-inf`` together, give NaN).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from attncc.errors import PatternError, field_error
from attncc.ir.canonical import canonicalize, resolve_heads
from attncc.ir.grid import Grid
from attncc.ir.mask import coordinates, cross_mask
from attncc.ir.mask import mask as brute_force_mask
from attncc.ir.nodes import Pattern
from attncc.ir.score import Score, as_score, checked, table_units
from attncc.ir.segments import BySegments
from attncc.layouts import CrossViews, cross_views, query_offsets, to_sdpa_views
from attncc.runtime.cross import refuse_positions
from attncc.runtime.data import checked as checked_data
from attncc.runtime.data import checked_cross


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float | None = None,
    return_lse: bool = False,
    grid: Grid | tuple[int, ...] | None = None,
    score: str | Score = "softmax",
    sigmoid_bias: float | None = None,
    layout: str | None = None,
    score_mod: Score | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    data: dict[str, torch.Tensor] | None = None,
    q_offset: object = None,
    q_grid: Grid | tuple[int, ...] | int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax (or sigmoid) attention, computed naively.

    Layouts: SDPA ``[B, H, N, D]`` (the grid defaults to ``(N,)``; pass
    ``grid`` for an image or video flattened row-major), or spatial
    ``[B, *grid, H, D]`` (the grid is read from the shape; pass ``grid`` to
    say which layout is meant when the rank is ambiguous, or ``layout``: 'sdpa' or
    'spatial', Note [Ambiguous layouts] in attncc.layouts). ``k``/``v`` may
    have fewer heads than ``q`` (GQA/MQA): query head ``h`` reads KV head
    ``h // (H // H_kv)``. The math runs in float64 for float64 inputs and
    float32 otherwise; the output has ``q``'s dtype and layout, the
    log-sum-exp (natural log, ``[B, H, N]`` or ``[B, *grid, H]``) is float32/64.
    See Note [Queries with no keys]. ``score="sigmoid"`` sums
    ``sigmoid(scale * q.k + sigmoid_bias) * v`` over kept keys (FlashSigmoid;
    the bias defaults to ``-ln(N)``); it has no log-sum-exp. ``score_mod`` (or ``score``) adds
    score terms (Note [Score terms] in attncc.ir.score), computed here from their definitions,
    differentiably in their tensors. ``dropout_mask`` (bool ``[B, H, N, N]``, True where kept)
    with ``dropout_p`` drops probabilities as the kernels do: kept ones are divided by
    ``1 - dropout_p``, the normaliser (and the log-sum-exp) sums them undropped. ``data`` gives
    the tensors of the pattern's primitives read at call time (``block_mask``, ``topk_blocks``,
    ``documents`` or ``cu_seqlens``, ``key_lengths``, ``key_mask``: Note [Runtime data forms] in
    attncc.runtime.data), checked as ``attncc.attention`` checks them; the mask then varies by
    batch element. q may cover a box of the keys' grid (a KV cache: Note [Query boxes] in
    attncc.layouts) at ``q_offset`` (:func:`attncc.layouts.query_offsets`); its rows are then
    computed as those rows of the whole grid's problem (the queries in their global positions),
    one batch element at a time, with per-query data (``query_bias``, ``bias``, the dropout
    mask) given for the region's rows. ``q_grid`` puts q on a grid of its own (cross-attention:
    Note [Cross-attention] in attncc.runtime.cross): the mask is
    :func:`attncc.ir.mask.cross_mask`, ``[Nq, Nk]`` per batch element and head, and per-query
    data (``query_bias``, ``bias``, the dropout mask, ``data["query_documents"]``) have q's length.
    A pattern per pair of segments (Note [Segment spaces] in attncc.ir.segments) takes ``[B, H, N,
    D]`` tensors over its whole space (``N = pattern.space.size``) and no ``grid``, ``q_offset``,
    ``q_grid`` or ``data``; its score terms may not read relative positions.
    """
    if isinstance(pattern, BySegments):
        given = {"grid": grid, "q_offset": q_offset, "q_grid": q_grid, "data": data or None}
        given["layout"] = None if layout in (None, "sdpa") else layout
        for name, value in given.items():
            if value is not None:
                why = "a pattern per pair of segments runs on its whole space, [B, H, N, D]"
                raise field_error(PatternError, name, value if name != "data" else sorted(value), "None", why)
        views = to_sdpa_views(q, k, v, (pattern.space.size,), "sdpa")
        if views.region != views.grid.shape:
            why = f"q must cover the space {pattern.space} ({pattern.space.size} tokens)"
            raise field_error(
                PatternError, "q shape", tuple(q.shape), f"[B, H, {pattern.space.size}, D]", why
            )
        terms = as_score(score) if score_mod is None else as_score(score) + score_mod
        for name in ("alibi", "rel_pos_bias"):
            if getattr(terms, name) is not None:
                why = "relative positions are not defined across segments (Note [Segment spaces])"
                raise field_error(PatternError, "score", name, "terms that read no positions", why)
        keep = brute_force_mask(pattern, pattern.space, heads=views.q.shape[1], device=q.device)
        flat = Grid((pattern.space.size,))
        args = (score, sigmoid_bias, score_mod, dropout_p, dropout_mask)
        out, lse = _attend(views.q, views.k, views.v, keep[None], pattern, scale, flat, *args)
        out = views.out.output(out)
        return (out, views.out.lse(lse)) if return_lse and lse is not None else out
    if q_grid is not None:
        cross = cross_views(q, k, v, grid, q_grid, layout)
        args = (pattern, scale, score, sigmoid_bias, score_mod, dropout_p, dropout_mask, data)
        out, lse = _cross(cross, *args)
        out = cross.out.output(out)
        if lse is None:
            return out
        return (out, cross.out.lse(lse)) if return_lse else out
    views = to_sdpa_views(q, k, v, grid, layout)
    args = (pattern, scale, views.grid, score, sigmoid_bias, score_mod, dropout_p, dropout_mask, data)
    if views.region == views.grid.shape and q_offset is None:
        out, lse = _on_grid(views.q, views.k, views.v, *args)
    else:
        offsets = query_offsets(views, q_offset, views.q.shape[0], views.q.device)
        out, lse = _in_regions(views, offsets, args)
    out = views.out.output(out)
    if lse is None:
        return out
    return (out, views.out.lse(lse)) if return_lse else out


def _in_regions(views, offsets: torch.Tensor, args: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each batch element's region rows of the whole grid's problem (Note [Query boxes] in attncc.layouts)."""
    pattern, scale, grid, score, sigmoid_bias, score_mod, dropout_p, dropout_mask, data = args
    b, h = views.q.shape[:2]
    n = grid.size
    terms = as_score(score) if score_mod is None else as_score(score) + score_mod
    normalised = checked_data(pattern, grid, b, h, data, views.q.device)
    box = coordinates(Grid(views.region), views.q.device)  # [Nq, rank]
    strides = torch.tensor([math.prod(grid.shape[a + 1 :]) for a in range(grid.rank)], device=box.device)
    outs, lses = [], []
    for i, offset in enumerate(offsets.tolist()):
        rows = ((box + torch.tensor(offset, device=box.device)) * strides).sum(-1)  # the region's flat rows

        def embed(t: torch.Tensor, dim: int, rows: torch.Tensor = rows) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = n
            return t.new_zeros(shape).index_copy(dim, rows, t)

        def one(t: torch.Tensor, i: int = i) -> torch.Tensor:
            return t[i : i + 1] if t.shape[0] > 1 else t

        q_i = embed(views.q[i : i + 1], 2)
        values = []
        for name, value in terms.values:
            if name in ("query_bias", "bias") and isinstance(value, torch.Tensor):
                value = embed(one(value), 2)
            elif name == "key_bias" and isinstance(value, torch.Tensor):
                value = one(value)
            values.append((name, value))
        terms_i = dataclasses.replace(terms, values=tuple(values))
        mask_i = None if dropout_mask is None else embed(one(dropout_mask), 2)
        data_i = {key: one(t) for key, t in normalised.items()}
        if "topk_blocks" in data_i:  # normalised into a layout, which _on_grid takes as indices again
            layout = data_i["topk_blocks"]
            blocks = torch.arange(layout.shape[-1], device=layout.device)
            data_i["topk_blocks"] = torch.where(layout != 0, blocks, -1)
        out, lse = _on_grid(
            q_i, views.k[i : i + 1], views.v[i : i + 1], pattern, scale, grid, terms_i, sigmoid_bias, None,
            dropout_p, mask_i, data_i,
        )  # fmt: skip
        outs.append(out[:, :, rows])
        lses.append(None if lse is None else lse[:, :, rows])
    return torch.cat(outs), (None if lses[0] is None else torch.cat(lses))


def _cross(views: CrossViews, pattern, scale, score, sigmoid_bias, score_mod, dropout_p, dropout_mask, data):
    """(out, lse or None) of q on its own grid over k's (Note [Cross-attention] in attncc.runtime.cross)."""
    q, grid = views.q, views.grid
    h = q.shape[1]
    refuse_positions(as_score(score) if score_mod is None else as_score(score) + score_mod)
    normalised = checked_cross(pattern, views.q_grid.size, grid, q.shape[0], h, data, q.device)
    keep = cross_mask(pattern, views.q_grid, grid, heads=h, device=q.device, data=normalised)
    args = (score, sigmoid_bias, score_mod, dropout_p, dropout_mask)
    return _attend(q, views.k, views.v, keep, pattern, scale, grid, *args)


def _on_grid(q, k, v, pattern, scale, grid, score, sigmoid_bias, score_mod, dropout_p, dropout_mask, data):
    """(out, lse or None) of ``[B, H, N, D]`` views covering ``grid``."""
    h = q.shape[1]
    normalised = checked_data(pattern, grid, q.shape[0], h, data, q.device)
    keep = brute_force_mask(pattern, grid, heads=h, device=q.device, data=normalised)  # [1|B, 1|H, N, N]
    args = (score, sigmoid_bias, score_mod, dropout_p, dropout_mask)
    return _attend(q, k, v, keep, pattern, scale, grid, *args)


def _attend(q, k, v, keep, pattern, scale, grid, score, sigmoid_bias, score_mod, dropout_p, dropout_mask):
    """(out, lse or None) of ``[B, H, Nq, D]`` q over ``[B, H_kv, Nk, D]`` k and v on ``grid``
    where ``keep`` (``[1|B, 1|H, Nq, Nk]``) is true."""
    d = q.shape[-1]
    h, h_kv = q.shape[1], k.shape[1]
    terms = checked(score if score_mod is None else as_score(score) + score_mod, grid, h, False)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (t.to(compute) for t in (q, k, v))
    kc, vc = (t.repeat_interleave(h // h_kv, dim=1) for t in (kc, vc))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = _scores(qc @ kc.transpose(-1, -2) * scale, terms, pattern, grid)
    scores = scores.masked_fill(~keep, -math.inf)
    keep_drop = 1.0 if dropout_mask is None else dropout_mask.to(compute) / (1.0 - dropout_p)
    if terms.kind == "sigmoid":
        bias = -math.log(scores.shape[-1]) if sigmoid_bias is None else sigmoid_bias
        weights = torch.sigmoid(scores + bias)  # sigmoid(-inf) = 0
        return _weighted_sum(weights * keep_drop, vc, keep).to(q.dtype), None
    lse = torch.logsumexp(scores, dim=-1)  # -inf where a row keeps nothing
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    return _weighted_sum(probs * keep_drop, vc, keep).to(q.dtype), lse


def _scores(s: torch.Tensor, terms: Score, pattern: Pattern, grid: Grid) -> torch.Tensor:
    """The scaled scores ``[B, H, N, N]`` with the score's terms applied, in the order of Note
    [Score terms] (attncc.ir.score), from their definitions."""
    h, n, device, dtype = s.shape[1], s.shape[-1], s.device, s.dtype

    def data(name: str) -> torch.Tensor:
        value = terms.value(name)
        return torch.as_tensor(value, device=device).to(dtype)

    coords = coordinates(grid, device)  # [N, rank]
    offset = coords[None, :, :] - coords[:, None, :]  # [q, k, rank]: the key less the query
    flat = torch.arange(n, device=device)
    flat_offset = (flat[None, :] - flat[:, None]).to(dtype)
    if terms.temperature:
        s = s * data("temperature").reshape(-1, 1, 1)
    if terms.softcap is not None:
        s = terms.softcap * torch.tanh(s / terms.softcap)
    if terms.alibi == "signed":
        s = s + data("alibi").reshape(h, 1, 1) * flat_offset
    elif terms.alibi == "axes" and grid.rank > 1:
        slopes = data("alibi").reshape(h, -1).expand(h, grid.rank)
        s = s - torch.einsum("ha,qka->hqk", slopes, offset.abs().to(dtype))
    elif terms.alibi is not None:
        s = s - data("alibi").reshape(h, 1, 1) * flat_offset.abs()
    if terms.rel_pos_bias is not None:
        table = data("rel_pos_bias")
        per_head = []
        for head_pattern in resolve_heads(pattern, h):
            units = torch.tensor(table_units(canonicalize(head_pattern, grid), grid), device=device)
            sizes = torch.tensor(terms.rel_pos_bias, device=device)
            index = (torch.div(offset, units, rounding_mode="floor") + sizes // 2).clamp(min=0)
            index = torch.minimum(index, sizes - 1)  # past the reach: never kept (lowering checks)
            per_head.append(index)
        rows = table.expand(h, *table.shape[1:])
        s = s + torch.stack([rows[i][tuple(per_head[i].unbind(-1))] for i in range(h)])
    for name in ("query_bias", "key_bias"):
        if terms.has(name):
            b = data(name)
            s = s + (b[..., :, None] if name == "query_bias" else b[..., None, :])
    if terms.bias:
        s = s + data("bias")
    return s


def _weighted_sum(weights: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``weights @ v`` over the kept keys only (Note [Masked keys never touch v]):
    weights ``[B, H, N, N]``, v ``[B, H, N, D]``, keep ``[1 or B, 1 or H, N, N]``."""
    finite = torch.isfinite(v)
    out = weights @ v.masked_fill(~finite, 0.0)
    if bool(finite.all()):
        return out
    kept = keep.to(v.dtype)
    seen = {name: kept @ hit.to(v.dtype) > 0 for name, hit in
            (("inf", v == math.inf), ("-inf", v == -math.inf), ("nan", v.isnan()))}  # fmt: skip
    out = out.masked_fill(seen["inf"], math.inf).masked_fill(seen["-inf"], -math.inf)
    return out.masked_fill(seen["nan"] | (seen["inf"] & seen["-inf"]), math.nan)

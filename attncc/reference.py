"""Brute-force reference attention: the materialised mask, in float32 or float64.

Every kernel attncc generates is checked against :func:`attention`. It builds
the whole ``[H, N, N]`` mask from :func:`attncc.ir.mask.mask`, so keep N to a
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

import math

import torch

from attncc.ir.grid import Grid
from attncc.ir.mask import mask as brute_force_mask
from attncc.ir.nodes import Pattern
from attncc.ir.score import Score, checked
from attncc.layouts import to_sdpa_layout


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
    the bias defaults to ``-ln(N)``); it has no log-sum-exp. A :class:`attncc.ir.Score` (or its
    text) adds its terms to the scaled scores first (Note [Score terms] in attncc.ir.score).
    """
    grid, (q, k, v), found = to_sdpa_layout(q, k, v, grid, layout)
    d = q.shape[-1]
    h, h_kv = q.shape[1], k.shape[1]
    terms = checked(score, grid, h, return_lse)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (t.to(compute) for t in (q, k, v))
    kc, vc = (t.repeat_interleave(h // h_kv, dim=1) for t in (kc, vc))
    keep = brute_force_mask(pattern, grid, heads=h, device=q.device)  # [1 or H, N, N]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = (qc @ kc.transpose(-1, -2)) * scale
    if terms.softcap is not None:
        scores = terms.softcap * torch.tanh(scores / terms.softcap)
    if terms.alibi is not None:
        position = torch.arange(grid.size, device=q.device, dtype=compute)
        distance = (position[:, None] - position[None, :]).abs()
        slopes = torch.tensor(terms.alibi, device=q.device, dtype=compute)
        scores = scores - slopes[:, None, None] * distance
    scores = scores.masked_fill(~keep[None], -math.inf)
    if terms.kind == "sigmoid":
        bias = -math.log(scores.shape[-1]) if sigmoid_bias is None else sigmoid_bias
        weights = torch.sigmoid(scores + bias)  # sigmoid(-inf) = 0
        return found.output(_weighted_sum(weights, vc, keep).to(q.dtype))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where a row keeps nothing
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = _weighted_sum(probs, vc, keep).to(q.dtype)
    out, lse = found.output(out), found.lse(lse)
    return (out, lse) if return_lse else out


def _weighted_sum(weights: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``weights @ v`` over the kept keys only (Note [Masked keys never touch v]):
    weights ``[B, H, N, N]``, v ``[B, H, N, D]``, keep ``[1 or H, N, N]``."""
    finite = torch.isfinite(v)
    out = weights @ v.masked_fill(~finite, 0.0)
    if bool(finite.all()):
        return out
    kept = keep[None].to(v.dtype)
    seen = {name: kept @ hit.to(v.dtype) > 0 for name, hit in
            (("inf", v == math.inf), ("-inf", v == -math.inf), ("nan", v.isnan()))}  # fmt: skip
    out = out.masked_fill(seen["inf"], math.inf).masked_fill(seen["-inf"], -math.inf)
    return out.masked_fill(seen["nan"] | (seen["inf"] & seen["-inf"]), math.nan)

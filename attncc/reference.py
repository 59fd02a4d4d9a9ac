"""Brute-force reference attention: the materialised mask, in float32 or float64.

Every kernel attncc generates is checked against :func:`attention`. It builds
the whole ``[H, N, N]`` mask from :func:`attncc.ir.mask.mask`, so keep N to a
few thousand tokens.

Note [Queries with no keys]: a query that sees no key (possible with e.g.
``strided`` intersected with a band) gets an output row of zeros and a
log-sum-exp of ``-inf``; it never produces NaN. Kernels must do the same.
"""

from __future__ import annotations

import math

import torch

from attncc.errors import AttnccError, field_error
from attncc.ir.grid import Grid
from attncc.ir.mask import mask as brute_force_mask
from attncc.ir.nodes import Pattern


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float | None = None,
    return_lse: bool = False,
    grid: Grid | tuple[int, ...] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention, computed naively.

    Layouts: SDPA ``[B, H, N, D]`` (the grid defaults to ``(N,)``; pass
    ``grid`` for an image or video flattened row-major), or spatial
    ``[B, *grid, H, D]`` (the grid is read from the shape; pass ``grid`` to
    say which layout is meant when the rank is ambiguous). ``k``/``v`` may
    have fewer heads than ``q`` (GQA/MQA): query head ``h`` reads KV head
    ``h // (H // H_kv)``. The math runs in float64 for float64 inputs and
    float32 otherwise; the output has ``q``'s dtype and layout, the
    log-sum-exp (natural log, ``[B, H, N]`` or ``[B, *grid, H]``) is float32/64.
    See Note [Queries with no keys].
    """
    grid, spatial = _layout(q, grid)
    if k.shape[:-1] != v.shape[:-1] or k.dim() != q.dim():
        raise field_error(
            AttnccError, "k/v shape", (tuple(k.shape), tuple(v.shape)), "matching k and v, same rank as q"
        )
    if spatial:
        q, k, v = (t.flatten(1, grid.rank).transpose(1, 2) for t in (q, k, v))
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d or h % h_kv:
        raise field_error(
            AttnccError, "k shape", tuple(k.shape), f"[{b}, H_kv, {n}, {d}] with H_kv dividing {h}"
        )
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (t.to(compute) for t in (q, k, v))
    kc, vc = (t.repeat_interleave(h // h_kv, dim=1) for t in (kc, vc))
    keep = brute_force_mask(pattern, grid, heads=h, device=q.device)  # [1 or H, N, N]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = (qc @ kc.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep[None], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # -inf where a row keeps nothing
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = (probs @ vc).to(q.dtype)
    if spatial:
        out = out.transpose(1, 2).unflatten(1, grid.shape)
        lse = lse.transpose(1, 2).unflatten(1, grid.shape)
    return (out, lse) if return_lse else out


def _layout(q: torch.Tensor, grid: Grid | tuple[int, ...] | None) -> tuple[Grid, bool]:
    """Which layout ``q`` is in, and its grid."""
    if grid is not None and not isinstance(grid, Grid):
        grid = Grid(tuple(grid))
    if q.dim() < 4 or q.dim() > 6:
        raise field_error(
            AttnccError, "q.dim()", q.dim(), "4 ([B, H, N, D] or [B, L, H, D]), 5 or 6 ([B, *grid, H, D])"
        )
    if q.dim() > 4:
        spatial_grid = Grid(tuple(q.shape[1:-2]))
        if grid is not None and grid != spatial_grid:
            raise field_error(AttnccError, "grid", grid.shape, f"{spatial_grid.shape} (q's spatial dims)")
        return spatial_grid, True
    if grid is not None and grid.rank == 1 and grid.size == q.shape[1] and grid.size != q.shape[2]:
        return grid, True  # [B, L, H, D] named by its grid
    if grid is None:
        grid = Grid((q.shape[2],))
    if grid.size != q.shape[2]:
        raise field_error(AttnccError, "grid", grid.shape, f"a grid of {q.shape[2]} tokens (q.shape[2])")
    return grid, False

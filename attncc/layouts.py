"""Tensor layouts: SDPA ``[B, H, N, D]`` and spatial ``[B, *grid, H, D]``.

Everything inside attncc works on SDPA-shaped views; the spatial layout is a
view of the same memory (flatten the grid, swap two axes), so no copy is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attncc.errors import AttnccError, field_error
from attncc.ir.grid import Grid


@dataclass(frozen=True)
class Layout:
    """How to view a tensor of the caller's layout as ``[B, H, N, D]`` and back."""

    grid: Grid
    spatial: bool

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, D]`` view of a q/k/v/out-shaped tensor."""
        return t.flatten(1, self.grid.rank).transpose(1, 2) if self.spatial else t

    def output(self, t: torch.Tensor) -> torch.Tensor:
        """Caller's layout of a ``[B, H, N, D]`` result."""
        return t.transpose(1, 2).unflatten(1, self.grid.shape) if self.spatial else t

    def lse(self, t: torch.Tensor) -> torch.Tensor:
        """Caller's layout of a ``[B, H, N]`` log-sum-exp: ``[B, *grid, H]`` when spatial."""
        return t.transpose(1, 2).unflatten(1, self.grid.shape) if self.spatial else t


def to_sdpa_layout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid | tuple[int, ...] | None
) -> tuple[Grid, tuple[torch.Tensor, torch.Tensor, torch.Tensor], Layout]:
    """Detect the layout, check shapes, and return ``[B, H, N, D]`` views."""
    layout = _detect(q, grid)
    if k.shape != v.shape or k.dim() != q.dim():
        raise field_error(
            AttnccError, "k/v shape", (tuple(k.shape), tuple(v.shape)), "k and v alike, with q's rank"
        )
    qs, ks, vs = layout(q), layout(k), layout(v)
    b, h, n, d = qs.shape
    h_kv = ks.shape[1]
    if ks.shape[0] != b or ks.shape[2] != n or ks.shape[3] != d or h % h_kv:
        allowed = f"[{b}, H_kv, {n}, {d}] with H_kv dividing {h}"
        raise field_error(AttnccError, "k shape", tuple(k.shape), allowed)
    return layout.grid, (qs, ks, vs), layout


def _detect(q: torch.Tensor, grid: Grid | tuple[int, ...] | None) -> Layout:
    if grid is not None and not isinstance(grid, Grid):
        grid = Grid(tuple(grid))
    if not 4 <= q.dim() <= 6:
        raise field_error(
            AttnccError, "q.dim()", q.dim(), "4 ([B, H, N, D] or [B, L, H, D]), 5 or 6 ([B, *grid, H, D])"
        )
    if q.dim() > 4:
        spatial_grid = Grid(tuple(q.shape[1:-2]))
        if grid is not None and grid != spatial_grid:
            raise field_error(AttnccError, "grid", grid.shape, f"{spatial_grid.shape} (q's spatial dims)")
        return Layout(spatial_grid, True)
    if grid is not None and grid.rank == 1 and grid.size == q.shape[1] and grid.size != q.shape[2]:
        return Layout(grid, True)  # [B, L, H, D] named by its grid
    grid = grid or Grid((q.shape[2],))
    if grid.size != q.shape[2]:
        raise field_error(AttnccError, "grid", grid.shape, f"a grid of {q.shape[2]} tokens (q.shape[2])")
    return Layout(grid, False)


def check_score(score: str, return_lse: bool) -> None:
    """Score variants: softmax, or sigmoid (which has no log-sum-exp)."""
    if score not in ("softmax", "sigmoid"):
        raise field_error(AttnccError, "score", score, "softmax, sigmoid")
    if score == "sigmoid" and return_lse:
        raise field_error(AttnccError, "return_lse", True, "False with score='sigmoid' (no normaliser)")

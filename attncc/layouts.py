"""Tensor layouts: SDPA ``[B, H, N, D]`` and spatial ``[B, *grid, H, D]``.

Everything inside attncc works on SDPA-shaped views; the spatial layout is a
view of the same memory (flatten the grid, swap two axes), so no copy is made.
"""

from __future__ import annotations

import operator
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


LAYOUTS = ("sdpa", "spatial")


def to_sdpa_layout(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Grid | tuple[int, ...] | None,
    layout: str | None = None,
) -> tuple[Grid, tuple[torch.Tensor, torch.Tensor, torch.Tensor], Layout]:
    """Detect the layout (or take the one ``layout`` names), check shapes, and return
    ``[B, H, N, D]`` views."""
    found = _detect(q, grid, layout)
    if k.shape != v.shape or k.dim() != q.dim():
        raise field_error(
            AttnccError, "k/v shape", (tuple(k.shape), tuple(v.shape)), "k and v alike, with q's rank"
        )
    qs, ks, vs = found(q), found(k), found(v)
    b, h, n, d = qs.shape
    h_kv = ks.shape[1]
    for name, size in (("B", b), ("H", h), ("H_kv", h_kv), ("D", d)):
        if size < 1:  # a head count of 0 would divide by zero, a head dim of 0 scale by 1 / 0
            raise field_error(AttnccError, f"{name} (of q/k/v [B, H, N, D])", size, "an integer >= 1")
    if ks.shape[0] != b or ks.shape[2] != n or ks.shape[3] != d or h % h_kv:
        allowed = f"[{b}, H_kv, {n}, {d}] with H_kv dividing {h}"
        raise field_error(AttnccError, "k shape", tuple(k.shape), allowed)
    return found.grid, (qs, ks, vs), found


def _detect(q: torch.Tensor, grid: Grid | tuple[int, ...] | None, layout: str | None) -> Layout:
    """Note [Ambiguous layouts]: a 4-D q is SDPA's [B, H, N, D] or a 1-D spatial [B, L, H, D]
    (NATTEN's, FlashAttention's). attncc reads it as SDPA's unless ``layout`` or ``grid``
    says otherwise, and refuses where both readings are plausible and nothing says which:
    dim 1 at least as long as dim 2 (SDPA's reading would have as many heads as tokens or
    more, which is how a [B, L, H, D] tensor reads), or a 1-D grid as long as both dims."""
    if layout is not None and layout not in LAYOUTS:
        raise field_error(
            AttnccError, "layout", layout, "'sdpa' ([B, H, N, D]), 'spatial' ([B, *grid, H, D]), None"
        )
    if grid is not None and not isinstance(grid, Grid):
        grid = Grid(tuple(grid))
    if not 4 <= q.dim() <= 6:
        raise field_error(
            AttnccError, "q.dim()", q.dim(), "4 ([B, H, N, D] or [B, L, H, D]), 5 or 6 ([B, *grid, H, D])"
        )
    shape = static_shape(q)
    if q.dim() > 4 or layout == "spatial":
        if q.dim() > 4 and layout == "sdpa":
            raise field_error(AttnccError, "layout", layout, f"'spatial' or None for a {q.dim()}-D q")
        spatial_grid = Grid(shape[1:-2])
        if grid is not None and grid != spatial_grid:
            raise field_error(AttnccError, "grid", grid.shape, f"{spatial_grid.shape} (q's spatial dims)")
        return Layout(spatial_grid, True)
    if layout is None and grid is not None and grid.rank == 1 and grid.size == shape[1]:
        if grid.size != shape[2]:
            return Layout(grid, True)  # [B, L, H, D] named by its grid
        raise AttnccError(_ambiguous(shape, "grid=" + str(grid.shape) + " fits both"))
    if layout is None and grid is None and shape[1] >= shape[2] and shape[1] > 1:
        raise AttnccError(_ambiguous(shape, "nothing says which"))
    grid = grid or Grid((shape[2],))
    if grid.size != shape[2]:
        raise field_error(AttnccError, "grid", grid.shape, f"a grid of {shape[2]} tokens (q.shape[2])")
    return Layout(grid, False)


def static_shape(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s shape with every size but the batch's (dim 0) a Python int (Note [Static shapes])."""
    return (t.shape[0], *(operator.index(size) for size in t.shape[1:]))


# Note [Static shapes]: the kernel is specialised to the grid, the head count and the head dim,
# and the pattern's text is checked against them at trace time (Note [Patterns under
# torch.compile] in attncc.runtime.dynamo), so under torch.compile those sizes must be Python
# ints. When torch.compile's automatic dynamic shapes make a size symbolic (the second length a
# compiled function sees), ``operator.index`` specialises it: the graph guards on the size and
# a new one traces once more, where a symbolic size would fail the trace. The batch size is left
# alone: the kernel launches for any batch, so it may stay symbolic (one graph for every batch).


def _ambiguous(shape: tuple[int, ...], why: str) -> str:
    return (
        f"q.shape = {shape} is ambiguous ({why}): SDPA's [B, H, N, D] would be {shape[1]} heads of "
        f"{shape[2]} tokens, a 1-D spatial [B, L, H, D] (NATTEN's) {shape[1]} tokens in {shape[2]} "
        "heads; pass layout='sdpa' or layout='spatial' (Note [Ambiguous layouts])"
    )

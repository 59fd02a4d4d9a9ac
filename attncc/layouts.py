"""Tensor layouts: SDPA ``[B, H, N, D]`` and spatial ``[B, *grid, H, D]``.

Everything inside attncc works on SDPA-shaped views; the spatial layout is a
view of the same memory (flatten the grid, swap two axes), so no copy is made.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from attncc.errors import AttnccError, field_error, form_error
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


@dataclass(frozen=True, eq=False)
class Views:
    """``[B, H, N, D]`` views of a call's q, k and v. ``grid``: the keys' grid; ``region``: the
    shape of the box of it the queries cover (the grid's shape when they cover all of it: Note
    [Query boxes]); ``out``: the caller's layout of q-shaped results."""

    grid: Grid
    region: tuple[int, ...]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: Layout


# Note [Query boxes]: q may cover a box of the keys' grid (a KV cache: the last tokens of a
# sequence, the last frames of a video, a chunk of a prefill). Its shape is q's: in the spatial
# layout q's grid dims; in SDPA's, q's length (on a grid of rank > 1, whole trailing axes: a
# number of leading-axis slices). The keys' grid is read from k the way a single grid is read
# from q. Where the box lies is the call's ``q_offset`` (query_offsets, below).


def to_sdpa_views(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Grid | tuple[int, ...] | None,
    layout: str | None = None,
) -> Views:
    """Detect the layout from k (or take the one ``layout`` names), check shapes, and return
    ``[B, H, N, D]`` views with q's region of the keys' grid (Note [Query boxes])."""
    if k.shape != v.shape or k.dim() != q.dim():
        raise field_error(
            AttnccError, "k/v shape", (tuple(k.shape), tuple(v.shape)), "k and v alike, with q's rank"
        )
    # The keys' grid is the pattern's: read from q when q covers it all, else from k.
    found = _detect(q, grid, layout) if q.shape == k.shape else _detect(k, grid, layout, "k")
    region, out = _region(q, found)
    qs, ks, vs = out(q), found(k), found(v)
    _check_heads(qs, ks, k)
    return Views(found.grid, region, qs, ks, vs, out)


def _check_heads(qs: torch.Tensor, ks: torch.Tensor, k: torch.Tensor) -> None:
    """q's and k's ``[B, H, N, D]`` views agree: one batch, one head dim, H_kv dividing H."""
    b, h, _, d = qs.shape
    h_kv, n = ks.shape[1], ks.shape[2]
    for name, size in (("B", b), ("H", h), ("H_kv", h_kv), ("D", d)):
        if size < 1:  # a head count of 0 would divide by zero, a head dim of 0 scale by 1 / 0
            raise field_error(AttnccError, f"{name} (of q/k/v [B, H, N, D])", size, "an integer >= 1")
    if ks.shape[0] != b or ks.shape[3] != d or h % h_kv:
        allowed = f"[{b}, H_kv, {n}, {d}] with H_kv dividing {h}"
        raise field_error(AttnccError, "k shape", tuple(k.shape), allowed)


@dataclass(frozen=True, eq=False)
class CrossViews:
    """``[B, H, N, D]`` views of a cross call's q, on its own grid ``q_grid``, and k and v, on
    ``grid`` (Note [Cross-attention] in attncc.runtime.cross); ``out``: q's layout."""

    q_grid: Grid
    grid: Grid
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: Layout


def as_grid(name: str, value: object) -> Grid:
    """A grid given as a :class:`Grid`, a tuple of sizes or an int (a sequence)."""
    if isinstance(value, Grid):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, tuple):
        raise form_error(AttnccError, name, value, "a Grid, a tuple of 1-3 sizes or an int (a sequence)")
    try:
        return Grid(value)
    except AttnccError as e:
        raise field_error(AttnccError, name, value, "1 to 3 sizes, each an integer >= 1") from e


def cross_views(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Grid | tuple[int, ...] | None,
    q_grid: object,
    layout: str | None = None,
) -> CrossViews:
    """``[B, H, N, D]`` views of q on its own grid ``q_grid`` (a :class:`Grid`, a tuple or an
    int) and of k, v on theirs (``grid``, or read from k as :func:`to_sdpa_views` reads it).
    q takes the call's layout: SDPA's ``[B, H, prod(q_grid), D]`` or ``[B, *q_grid, H, D]``;
    where ``layout`` is None and only one of them fits q's shape, that one (else k's shape says,
    Note [Ambiguous layouts])."""
    q_grid = as_grid("q_grid", q_grid)
    if k.shape != v.shape:
        raise field_error(AttnccError, "k/v shape", (tuple(k.shape), tuple(v.shape)), "k and v alike")
    shape = static_shape(q)
    if layout is None:
        readings = {"sdpa": q.dim() == 4 and shape[2] == q_grid.size, "spatial": shape[1:-2] == q_grid.shape}
        if sum(readings.values()) == 1:
            layout = "sdpa" if readings["sdpa"] else "spatial"
    keys = _detect(k, grid, layout, "k")
    if keys.spatial:
        fits, form = q.dim() == q_grid.rank + 3 and shape[1:-2] == q_grid.shape, f"[B, {q_grid.shape}, H, D]"
    else:
        fits, form = q.dim() == 4 and shape[2] == q_grid.size, f"[B, H, {q_grid.size}, D]"
    if not fits:
        why = f"q on q_grid {q_grid.shape} in the call's {'spatial' if keys.spatial else 'SDPA'} layout"
        raise field_error(AttnccError, "q shape", shape, form, why)
    out = Layout(q_grid, keys.spatial)
    qs, ks, vs = out(q), keys(k), keys(v)
    _check_heads(qs, ks, k)
    return CrossViews(q_grid, keys.grid, qs, ks, vs, out)


def query_offsets(views: Views, q_offset: object, batch: int, device: torch.device) -> torch.Tensor:
    """Where each batch element's queries lie in the keys' grid: an int64 ``[B, rank]`` tensor of
    the region's first coordinate per axis (Note [Query boxes]). ``q_offset``: None (the
    region ends where the grid does: bottom-right, FlashAttention's and SDPA's
    ``causal_lower_right`` alignment, so a query of a KV cache's last token is its last
    position), an int (the offset along the leading axis; the other axes bottom-right), a tuple
    (one per axis), or an integer tensor ``[B]`` or ``[B, rank]`` (per batch element: a
    serving batch's cache lengths, read on the device; an offset out of range is clamped to it).
    """
    grid, region = views.grid.shape, views.region
    last = tuple(g - r for g, r in zip(grid, region))
    allowed = f"0..{last} per axis (the region {region} inside the grid {grid})"
    if q_offset is None:
        values: tuple[int, ...] = last
    elif isinstance(q_offset, torch.Tensor):
        if q_offset.dtype.is_floating_point or q_offset.dtype == torch.bool:
            raise field_error(AttnccError, "q_offset dtype", q_offset.dtype, "an integer tensor")
        if q_offset.device != device:
            raise field_error(AttnccError, "q_offset device", q_offset.device, f"the device of q ({device})")
        if tuple(q_offset.shape) not in ((batch,), (batch, len(grid))):
            raise field_error(
                AttnccError, "q_offset shape", tuple(q_offset.shape), f"({batch},) or ({batch}, {len(grid)})"
            )
        per_axis = q_offset.reshape(batch, -1).long()
        if per_axis.shape[1] == 1:
            rest = torch.tensor(last[1:], dtype=torch.long, device=device).expand(batch, len(grid) - 1)
            per_axis = torch.cat([per_axis, rest], 1)
        return torch.minimum(per_axis.clamp(min=0), torch.tensor(last, device=device))
    else:
        given = (q_offset,) if isinstance(q_offset, int) and not isinstance(q_offset, bool) else q_offset
        if not isinstance(given, tuple) or not all(
            isinstance(o, int) and not isinstance(o, bool) for o in given
        ):
            raise form_error(
                AttnccError, "q_offset", q_offset, "None, an int, a tuple of ints or an integer tensor"
            )
        values = given + last[len(given) :] if len(given) <= len(grid) else given
        if len(values) != len(grid) or any(not 0 <= o <= m for o, m in zip(values, last)):
            raise field_error(AttnccError, "q_offset", q_offset, allowed)
    return torch.tensor(values, dtype=torch.long, device=device).expand(batch, len(grid))


def _region(q: torch.Tensor, keys: Layout) -> tuple[tuple[int, ...], Layout]:
    """The box of the keys' grid q covers, and q's layout (Note [Query boxes])."""
    grid, shape = keys.grid, static_shape(q)
    if keys.spatial:
        region = shape[1:-2]
        if len(region) != grid.rank or any(r < 1 or r > g for r, g in zip(region, grid.shape)):
            allowed = f"{grid.rank} sizes, each from 1 to the keys' grid {grid.shape}"
            raise field_error(AttnccError, "q grid", region, allowed)
        return region, Layout(Grid(region), True)
    n_q, rest = shape[2], math.prod(grid.shape[1:])
    if n_q == grid.size:
        return grid.shape, keys
    if not 1 <= n_q <= grid.size or n_q % rest:
        allowed = f"1 to {grid.size} tokens, whole slices of the keys' grid {grid.shape} ({rest} tokens each)"
        raise field_error(AttnccError, "q length", n_q, allowed)
    region = (n_q // rest, *grid.shape[1:])
    return region, Layout(Grid(region), False)


def _detect(
    q: torch.Tensor, grid: Grid | tuple[int, ...] | None, layout: str | None, name: str = "q"
) -> Layout:
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
            AttnccError,
            f"{name}.dim()",
            q.dim(),
            "4 ([B, H, N, D] or [B, L, H, D]), 5 or 6 ([B, *grid, H, D])",
        )
    shape = static_shape(q)
    if q.dim() > 4 or layout == "spatial":
        if q.dim() > 4 and layout == "sdpa":
            raise field_error(AttnccError, "layout", layout, f"'spatial' or None for a {q.dim()}-D {name}")
        spatial_grid = Grid(shape[1:-2])
        if grid is not None and grid != spatial_grid:
            raise field_error(
                AttnccError, "grid", grid.shape, f"{spatial_grid.shape} ({name}'s spatial dims)"
            )
        return Layout(spatial_grid, True)
    if layout is None and grid is not None and grid.rank == 1 and grid.size == shape[1]:
        if grid.size != shape[2]:
            return Layout(grid, True)  # [B, L, H, D] named by its grid
        raise AttnccError(_ambiguous(shape, "grid=" + str(grid.shape) + " fits both", name))
    if layout is None and grid is None and shape[1] >= shape[2] and shape[1] > 1:
        raise AttnccError(_ambiguous(shape, "nothing says which", name))
    grid = grid or Grid((shape[2],))
    if grid.size != shape[2]:
        raise field_error(AttnccError, "grid", grid.shape, f"a grid of {shape[2]} tokens ({name}.shape[2])")
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


def _ambiguous(shape: tuple[int, ...], why: str, name: str = "q") -> str:
    return (
        f"{name}.shape = {shape} is ambiguous ({why}): SDPA's [B, H, N, D] would be {shape[1]} heads of "
        f"{shape[2]} tokens, a 1-D spatial [B, L, H, D] (NATTEN's) {shape[1]} tokens in {shape[2]} "
        "heads; pass layout='sdpa' or layout='spatial' (Note [Ambiguous layouts])"
    )

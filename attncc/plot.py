"""Pictures of a pattern: its mask, its tile map, and one query's keys on the grid."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from attncc.ir.analysis import EMPTY, FULL, PARTIAL, Analysis, analyze, keys_of
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern

_MAX_CELLS = 512  # the mask panel shows at most this many cells per side
_TILE_COLOURS = ListedColormap(["#f4f4f4", "#f2a541", "#2a6f97"])  # empty, partial, full


def draw(pattern: Pattern, grid: Grid, tiled: Analysis, path: str | Path, title: str = "") -> None:
    """Write a PNG: the mask (exact up to 512 tokens, else kept fraction per
    cell), the tile map of ``tiled`` for head 0, and for 2-D/3-D grids the keys
    of the centre query drawn on the grid."""
    n = grid.size
    cell = max(1, math.ceil(n / _MAX_CELLS))
    fine = analyze(pattern, grid, cell, cell, heads=tiled.heads)
    sizes = fine.q_tiling.sizes(grid)
    fraction = fine.tile_counts[0] / np.outer(sizes, sizes)
    panels = 3 if grid.rank > 1 else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 5), constrained_layout=True)
    axes[0].imshow(fraction, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    what = "mask" if cell == 1 else f"kept fraction per {cell}x{cell} block"
    axes[0].set_title(f"{what} (query rows, key columns)")
    classes = tiled.tile_classes[0]
    axes[1].imshow(classes, cmap=_TILE_COLOURS, vmin=0, vmax=2, interpolation="nearest")
    full, partial, empty = ((classes == c).sum() for c in (FULL, PARTIAL, EMPTY))
    axes[1].set_title(
        f"tiles q {tiled.q_tiling} / kv {tiled.kv_tiling}:\n"
        f"{full} full (blue), {partial} partial (orange), {empty} empty"
    )
    axes[1].set_xlabel("KV tile")
    axes[1].set_ylabel("Q tile")
    if grid.rank > 1:
        centre = tuple(s // 2 for s in grid.shape)
        query = int(np.ravel_multi_index(centre, grid.shape))
        seen = keys_of(pattern, grid, query).reshape(grid.shape).astype(float)
        if grid.rank == 3:
            seen = seen[centre[0]]
        seen[centre[-2], centre[-1]] = 0.5
        axes[2].imshow(seen, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        frame = f", frame {centre[0]}" if grid.rank == 3 else ""
        axes[2].set_title(f"keys of query {centre}{frame}")
    fig.suptitle(title or f"grid {grid}")
    fig.savefig(path, dpi=110)
    plt.close(fig)

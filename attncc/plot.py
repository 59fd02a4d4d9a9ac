"""Pictures of a pattern: its mask, two tile maps, and one query's keys on the grid.

One row of panels per distinct head pattern (a ``per_head`` pattern gets a labelled row
for each): the kept fraction per block of the mask, the tile map of the first tiling
``attncc analyze`` was given (flat 128-token tiles by default: what a row-major kernel
walks), the tile map of the box tiling that the kernel lowering plans actually runs, and,
on a 2-D or 3-D grid, the keys of the centre query. On a 3-D grid the panels mark the
time frames: lines between frames on the mask and the tile maps, the keys frame by frame.

A space of segments (:func:`draw_segments`) gets one row: the mask over the whole space and
the tile map of the first tiling, with lines where segments meet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure, SubFigure

from attncc.errors import AttnccError, form_error
from attncc.ir.analysis import (
    EMPTY,
    FULL,
    PARTIAL,
    Analysis,
    HeadGroup,
    SegmentsAnalysis,
    Tiling,
    analyze,
    analyze_segments,
    cross_keys,
    keys_of,
)
from attncc.ir.canonical import resolve_heads
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.ir.spec import Spec
from attncc.ir.text import format_pattern
from attncc.lower.lowering import kernel_tables
from attncc.lower.plan import RANK, KernelPlan
from attncc.lower.visits import tile_map, tiles_per_group

_MAX_CELLS = 512  # the mask panel shows at most this many cells per side
_MAX_FRAMES = 12  # the keys panel of a 3-D grid shows at most this many frames
_MAX_LINES = 64  # frame or group boundaries drawn on a panel, at most
_TILE_COLOURS = ListedColormap(["#f4f4f4", "#f2a541", "#2a6f97"])  # EMPTY, PARTIAL, FULL
_RED = "#c0392b"
_LINE = {"color": _RED, "linewidth": 0.6, "alpha": 0.7}
_PANEL = 4.6  # inches per panel side
_STYLE = {"axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7}


def draw(
    spec: Spec, tiled: Analysis | None, plans: Sequence[tuple[HeadGroup, KernelPlan]], path: str | Path
) -> None:
    """Write :func:`figure` (:func:`cross_figure` for a spec with ``q_grid``) as a PNG."""
    with plt.rc_context(_STYLE):  # ticks are made as the figure is drawn: keep the style until then
        fig = cross_figure(spec) if tiled is None else figure(spec, tiled, plans)
        try:
            fig.savefig(path, dpi=110)
        except OSError as e:
            raise form_error(
                AttnccError, "png path", str(path), "a writable file", e.strerror or str(e)
            ) from None
        finally:
            plt.close(fig)


def figure(spec: Spec, tiled: Analysis, plans: Sequence[tuple[HeadGroup, KernelPlan]]) -> Figure:
    """The picture of ``spec``: one row per head group of ``plans`` (labelled when there are
    several) of the mask (exact up to 512 tokens, else kept fraction per cell), the tile map
    of ``tiled``, the tile map of the group's kernel plan and, on 2-D/3-D grids, the keys of
    the centre query."""
    grid = spec.grid
    cell = max(1, math.ceil(grid.size / _MAX_CELLS))
    fine = analyze(spec.pattern, grid, cell, cell, heads=tiled.heads)
    fraction = fine.tile_counts / np.outer(fine.q_tiling.sizes(grid), fine.kv_tiling.sizes(grid))
    written = resolve_heads(spec.pattern, spec.heads)  # each head's pattern as the user wrote it
    cols = 4 if grid.rank > 1 else 3
    fig = plt.figure(figsize=(_PANEL * cols, _PANEL * len(plans) + 0.4), layout="constrained")
    for row, (group, plan) in zip(fig.subfigures(len(plans), 1, squeeze=False)[:, 0], plans):
        head = group.heads[0]
        one = head if tiled.tile_classes.shape[0] > 1 else 0  # one map per head, or one shared
        axes = row.subplots(1, cols)
        _mask_panel(row, axes[0], fraction[one], cell, grid)
        _analysis_panel(axes[1], tiled.tile_classes[one], tiled.q_tiling, tiled.kv_tiling, grid)
        _kernel_panel(axes[2], group.pattern, grid, plan)
        if grid.rank > 1:
            _keys_panel(axes[3], spec.pattern, grid, head)
        if len(plans) > 1:
            label = f"{group.label}: {_short(format_pattern(written[head]))}"
            row.suptitle(_literal(label), fontsize="medium")
    shown = sum(len(group.heads) for group, _ in plans)
    more = f" (the first {len(plans)} head patterns: {shown} of the heads)" if shown < spec.heads else ""
    title = f"{_literal(spec.name)}: grid {grid}, {_plural(spec.heads, 'head')}{more}"
    fig.suptitle(title, fontweight="bold")
    return fig


def cross_figure(spec: Spec) -> Figure:
    """The mask of a cross-attention ``spec`` (its ``q_grid`` over its keys' ``grid``), one panel
    per distinct head pattern (the first four): exact up to 512 tokens a side, else the kept
    fraction per block. Every query keeps the same keys (:func:`attncc.ir.analysis.cross_keys`),
    so the rows of a panel are alike."""
    assert spec.q_grid is not None
    n_q, n_k = spec.q_grid.size, spec.grid.size
    rows = cross_keys(spec.pattern, spec.grid, spec.heads)
    groups: dict[bytes, list[int]] = {}
    for head, row in enumerate(rows):
        groups.setdefault(row.tobytes(), []).append(head)
    shown = list(groups.values())[:4]
    q_cell, k_cell = max(1, math.ceil(n_q / _MAX_CELLS)), max(1, math.ceil(n_k / _MAX_CELLS))
    starts = np.arange(0, n_k, k_cell)
    fig = plt.figure(figsize=(_PANEL * len(shown), _PANEL + 0.4), layout="constrained")
    for ax, heads in zip(fig.subplots(1, len(shown), squeeze=False)[0], shown):
        row = rows[heads[0]]
        kept = np.add.reduceat(row.astype(float), starts) / np.diff(np.append(starts, n_k))
        image = np.broadcast_to(kept, (math.ceil(n_q / q_cell), len(kept)))
        ax.imshow(image, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        who = f"heads {_short(', '.join(map(str, heads)), 40)}: " if len(groups) > 1 else ""
        ax.set_title(f"{who}{int(row.sum()):,} of {n_k:,} keys per query")
        ax.set_ylabel(
            f"query {'token' if q_cell == 1 else f'block of {q_cell} tokens'} (q_grid {spec.q_grid})"
        )
        ax.set_xlabel(f"key {'token' if k_cell == 1 else f'block of {k_cell} tokens'} (grid {spec.grid})")
    fig.suptitle(f"{_literal(spec.name)}: cross-attention, {_plural(spec.heads, 'head')}", fontweight="bold")
    return fig


def draw_segments(spec: Spec, tiled: SegmentsAnalysis, path: str | Path) -> None:
    """Write :func:`segments_figure` as a PNG."""
    with plt.rc_context(_STYLE):
        fig = segments_figure(spec, tiled)
        try:
            fig.savefig(path, dpi=110)
        except OSError as e:
            raise form_error(
                AttnccError, "png path", str(path), "a writable file", e.strerror or str(e)
            ) from None
        finally:
            plt.close(fig)


def segments_figure(spec: Spec, tiled: SegmentsAnalysis) -> Figure:
    """The picture of a spec of segments (its first head; the maps of all heads are alike
    unless a pair's pattern is per head): the mask (exact up to 512 tokens, else the kept
    fraction per cell, cells cut at segment borders) and the tile map of ``tiled``, with red
    lines where segments meet."""
    space = tiled.space
    cell = max(1, math.ceil(space.size / _MAX_CELLS))
    assert spec.space == space
    fine = analyze_segments(spec.pattern, cell, cell, heads=tiled.heads)  # type: ignore[arg-type]
    fraction = fine.tile_counts[0] / np.outer(fine.q_tiling.sizes(), fine.kv_tiling.sizes())
    fig = plt.figure(figsize=(_PANEL * 2, _PANEL + 0.4), layout="constrained")
    mask_ax, tiles_ax = fig.subplots(1, 2)
    top = 1.0 if cell == 1 else max(float(fraction.max()), 1e-9)
    image = mask_ax.imshow(fraction, cmap="Greys", vmin=0, vmax=top, interpolation="nearest")
    mask_ax.set_title("mask" if cell == 1 else f"kept fraction per cell of up to {cell} tokens")
    fig.colorbar(image, ax=mask_ax, shrink=0.8, label="kept" if cell == 1 else "kept fraction")
    unit = "token" if cell == 1 else "cell"
    mask_ax.set_ylabel(f"query {unit}")
    mask_ax.set_xlabel(
        f"key {unit}" + _segment_lines(mask_ax, fine.q_tiling.starts(), fine.kv_tiling.starts())
    )
    classes = tiled.tile_classes[0]
    tiles_ax.imshow(classes, cmap=_TILE_COLOURS, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
    full, partial, empty = ((classes == c).sum() for c in (FULL, PARTIAL, EMPTY))
    tiles_ax.set_title(
        f"tiles q {tiled.q_tiling} / kv {tiled.kv_tiling}\n"
        f"{full:,} full (blue), {partial:,} partial (orange), {empty:,} empty;\n"
        f"tile bound {tiled.tile_bound:.2f}x"
    )
    tiles_ax.set_ylabel("Q tile")
    lines = _segment_lines(tiles_ax, tiled.q_tiling.starts(), tiled.kv_tiling.starts())
    tiles_ax.set_xlabel("KV tile" + lines)
    fig.suptitle(f"{_literal(spec.name)}: {space}, {_plural(spec.heads, 'head')}", fontweight="bold")
    return fig


def _segment_lines(ax: Axes, rows: Sequence[int], cols: Sequence[int]) -> str:
    """Lines before each segment's first row and column but the first; the axis label's note."""
    for y in rows[1:]:
        ax.axhline(y - 0.5, **_LINE)
    for x in cols[1:]:
        ax.axvline(x - 0.5, **_LINE)
    return "; red lines: segments" if len(rows) > 1 else ""


def _literal(text: str) -> str:
    """``text`` drawn as written: a ``$`` would start matplotlib's mathtext (and a bad formula,
    such as ``$\\frac{a}$``, fail the whole picture)."""
    return text.replace("$", r"\$")


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mask_panel(fig: SubFigure, ax: Axes, fraction: np.ndarray, cell: int, grid: Grid) -> None:
    # The darkest grey is the largest fraction (the colorbar gives the scale): a sparse
    # pattern's blocks are mostly far from whole, and would be near white against 1.
    top = 1.0 if cell == 1 else max(float(fraction.max()), 1e-9)
    image = ax.imshow(fraction, cmap="Greys", vmin=0, vmax=top, interpolation="nearest")
    ax.set_title("mask" if cell == 1 else f"kept fraction per {cell}x{cell} block of tokens")
    unit = "token" if cell == 1 else f"block of {cell} tokens"
    ax.set_ylabel(f"query {unit}")
    fig.colorbar(image, ax=ax, shrink=0.8, label="kept" if cell == 1 else "kept fraction")
    frame = (grid.shape[1] * grid.shape[2] / cell, grid.shape[0]) if grid.rank == 3 else (0, 0)
    ax.set_xlabel(f"key {unit}" + _boundaries(ax, frame, frame))


def _analysis_panel(ax: Axes, classes: np.ndarray, q: Tiling, kv: Tiling, grid: Grid) -> None:
    ax.imshow(classes, cmap=_TILE_COLOURS, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
    full, partial, empty = ((classes == c).sum() for c in (FULL, PARTIAL, EMPTY))
    ax.set_title(
        f"tiles q {q} / kv {kv}\n{full:,} full (blue), {partial:,} partial (orange),\n{empty:,} empty"
    )
    ax.set_ylabel("Q tile")
    lines = _boundaries(ax, _slabs(q, grid), _slabs(kv, grid)) if grid.rank == 3 else ""
    ax.set_xlabel("KV tile" + lines)


def _slabs(tiling: Tiling, grid: Grid) -> tuple[float, int]:
    """On a 3-D grid, tiles of ``tiling`` per slab of frames and the number of slabs: a flat
    tiling has one slab per frame (its tiles may straddle two), a box tiling one per box depth."""
    if tiling.flat:
        return grid.shape[1] * grid.shape[2] / tiling.shape[0], grid.shape[0]
    counts = tiling.counts(grid)
    return counts[1] * counts[2], counts[0]


def _kernel_panel(ax: Axes, pattern: Pattern, grid: Grid, plan: KernelPlan) -> None:
    """The tile pairs the plan's forward kernel visits (:func:`attncc.lower.visits.tile_map`)."""
    classes = tile_map(plan, kernel_tables(pattern, grid, plan))
    ax.imshow(classes, cmap=_TILE_COLOURS, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
    unmasked, masked = (int((classes == c).sum()) for c in (FULL, PARTIAL))
    user = RANK - grid.rank  # the plan pads every grid to rank 3: show the user's rank
    q, kv = ("x".join(map(str, box[user:])) for box in (plan.q_tile, plan.kv_tile))
    groups = math.prod(plan.dilation)
    where = f", {groups} dilation groups" if groups > 1 else ""
    ax.set_title(
        f"kernel tiles q {q} / kv {kv} ({plan.iteration}{where})\n"
        f"tile bound {classes.size / max(unmasked + masked, 1):.2f}x: {unmasked:,} unmasked (blue),\n"
        f"{masked:,} masked (orange), {classes.size - unmasked - masked:,} skipped"
    )
    lines = ""
    if groups > 1:  # a Q tile visits only its group's KV tiles: mark where the groups meet
        q_ends = np.cumsum(tiles_per_group(plan, plan.q_tile))[:-1]
        kv_ends = np.cumsum(tiles_per_group(plan, plan.kv_tile))[:-1]
        if len(q_ends) < _MAX_LINES:
            for y, x in zip(q_ends, kv_ends):
                ax.axhline(y - 0.5, **_LINE)
                ax.axvline(x - 0.5, **_LINE)
            lines = "; red lines: dilation groups"
    elif grid.rank == 3:  # one group: tiles are row-major over boxes, so slabs of frames
        q_tiles, kv_tiles = plan.q_tiles(), plan.kv_tiles()
        lines = _boundaries(
            ax, (q_tiles[1] * q_tiles[2], q_tiles[0]), (kv_tiles[1] * kv_tiles[2], kv_tiles[0])
        )
    ax.set_ylabel("Q tile")
    ax.set_xlabel("KV tile" + lines)


def _boundaries(ax: Axes, rows: tuple[float, int], cols: tuple[float, int]) -> str:
    """Lines between slabs of frames of a 3-D grid, ``(cells per slab, slabs)`` down and
    across; returns the note for the axis label (empty when none are drawn)."""
    if not (1 < rows[1] <= _MAX_LINES and 1 < cols[1] <= _MAX_LINES):
        return ""
    for t in range(1, rows[1]):
        ax.axhline(t * rows[0] - 0.5, **_LINE)
    for t in range(1, cols[1]):
        ax.axvline(t * cols[0] - 0.5, **_LINE)
    return "; red lines: frames"


def _keys_panel(ax: Axes, pattern: Pattern, grid: Grid, head: int) -> None:
    """The keys of the centre query on the grid; a 3-D grid frame by frame, the frames that
    hold keys and one on either side (where the window stops, causal or not)."""
    centre = tuple(s // 2 for s in grid.shape)
    query = int(np.ravel_multi_index(centre, grid.shape))
    seen = keys_of(pattern, grid, query, head).reshape(grid.shape).astype(float)
    seen[centre] = 0.5
    cmap = plt.get_cmap("Blues").with_extremes(bad="white")  # white: the gaps between frames
    if grid.rank == 2:
        ax.imshow(seen, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"keys of query {centre}\n(dark: a key; light: the query)")
        return
    with_keys = np.flatnonzero(seen.any(axis=(1, 2)))  # the query's own frame holds it (0.5)
    lo, hi = max(0, with_keys[0] - 1), min(grid.shape[0] - 1, with_keys[-1] + 1)
    if hi - lo + 1 > _MAX_FRAMES:  # centre the shown frames on the query's
        lo = min(max(0, centre[0] - _MAX_FRAMES // 2), grid.shape[0] - _MAX_FRAMES)
        hi = lo + _MAX_FRAMES - 1
    frames = list(range(lo, hi + 1))
    across = math.ceil(math.sqrt(len(frames)))
    down = math.ceil(len(frames) / across)
    h, w = grid.shape[1], grid.shape[2]
    gap = max(1, min(h, w) // 12)
    sheet = np.full((down * (h + gap) - gap, across * (w + gap) - gap), np.nan)
    for i, t in enumerate(frames):
        y, x = (i // across) * (h + gap), (i % across) * (w + gap)
        sheet[y : y + h, x : x + w] = seen[t]
        label = f"t={t}" + (" (query)" if t == centre[0] else "")
        ax.text(x + 1, y + 1, label, ha="left", va="top", fontsize=7, color=_RED)
    ax.imshow(sheet, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"keys of query {centre}, frame by frame\n(frames {lo}-{hi} of {grid.shape[0]})")

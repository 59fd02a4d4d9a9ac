"""The ``attncc`` command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attncc.autotune.command import tune_cmd
from attncc.autotune.report import model_pick
from attncc.bench.command import bench_cmd
from attncc.cache_cli import cache_cmd
from attncc.errors import AttnccError, PatternError, field_error
from attncc.ir.analysis import (
    Analysis,
    CrossAnalysis,
    HeadGroup,
    SegmentsAnalysis,
    analyze,
    analyze_cross,
    analyze_segments,
    head_groups,
)
from attncc.ir.canonical import pattern_hash
from attncc.ir.score import Score
from attncc.ir.segments import BySegments
from attncc.ir.spec import Spec, load_spec, on_grid, whole_grid
from attncc.ir.symbolic import describe, rules
from attncc.ir.text import format_pattern
from attncc.lower.plan import RANK, KernelPlan
from attncc.machine.command import inspect_cmd
from attncc.outputs import output_file
from attncc.runtime import progress

_DEFAULT_TILES = {
    1: ["128", "64"],
    2: ["128", "8x16", "16x8"],
    3: ["128", "2x8x8", "4x4x8"],
}
_SEGMENT_BOXES = {1: "128", 2: "8x16", 3: "2x8x8"}  # a box of 128 tokens per rank


MAX_TILE = 2**31 - 1  # token indices are int32 in the kernels, and in numpy's analyses


def parse_tile(text: str, name: str) -> int | tuple[int, ...]:
    """``"128"`` (flat run of tokens) or ``"8x16"`` (a box, one size per axis)."""
    parts = text.lower().split("x")
    allowed = f"a size like 128 (flat) or a box like 8x16, each size 1..{MAX_TILE:,}"
    if not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise field_error(PatternError, name, text, allowed)
    sizes = tuple(int(p) for p in parts)
    if not all(1 <= s <= MAX_TILE for s in sizes):  # a tile wider than any grid is a mistyped one
        raise field_error(PatternError, name, text, allowed)
    return sizes[0] if len(sizes) == 1 else sizes


def parse_segment_tile(text: str, name: str) -> int | list[int | tuple[int, ...]]:
    """``"128"`` (flat runs in every segment) or one tile per segment, comma-separated in
    segment order: ``"64,2x8x8"``."""
    parts = text.split(",")
    if len(parts) == 1:
        return parse_tile(text, name)
    return [parse_tile(part.strip(), name) for part in parts]


def _table(spec: Spec, results: list[Analysis] | list[SegmentsAnalysis]) -> Table:
    first = results[0]
    maps = first.tile_classes.shape[0]
    per = "per head" if maps == 1 else f"summed over {maps} heads"
    table = Table(title=f"tilings (tile pairs {per})", title_justify="left")
    for col in ("q tile", "kv tile"):
        table.add_column(col, justify="right", no_wrap=True)  # a space's tiles name each segment
    for col in (
        "tile pairs",
        "empty",
        "partial",
        "full",
        "visited",
        "tile bound",
        "bound / ideal",
    ):
        table.add_column(col, justify="right")
    for a in results:
        visited = a.partial_tiles + a.full_tiles
        table.add_row(
            str(a.q_tiling),
            str(a.kv_tiling),
            f"{a.tile_classes.size:,}",
            f"{a.empty_tiles:,}",
            f"{a.partial_tiles:,}",
            f"{a.full_tiles:,}",
            f"{visited / a.tile_classes.size:.1%}",
            f"{a.tile_bound:.2f}x",
            f"{a.tile_bound / first.ideal_speedup:.2f}",
        )
    return table


def _counts(a: Analysis | CrossAnalysis) -> list[tuple[str, str]]:
    """The summary's rows of kept pairs, density, ideal speedup and FLOPs (their ranges for a
    pattern with data given at call time: Note [Data-dependent analysis] in attncc.ir.analysis)."""
    if not a.data_dependent:
        return [
            ("kept pairs", f"{a.kept_pairs:,} of {a.total_pairs:,}"),
            ("density", f"{a.density:.4%}"),
            ("ideal speedup", f"{a.ideal_speedup:.2f}x (1 / density)"),
            ("FLOPs kept (fwd, B=1)", f"{a.flops_kept / 1e9:,.2f} GFLOP of {a.flops_dense / 1e9:,.2f} dense"),
        ]
    least = a.min_kept_pairs / a.total_pairs
    return [
        ("kept pairs", f"{a.min_kept_pairs:,} to {a.kept_pairs:,} of {a.total_pairs:,}"),
        (
            "density",
            f"data-dependent ({', '.join(a.runtime)} given at call time): {least:.4%} to {a.density:.4%}",
        ),
        ("ideal speedup", f"data-dependent: at least {a.ideal_speedup:.2f}x"),
        (
            "FLOPs kept (fwd, B=1)",
            f"at most {a.flops_kept / 1e9:,.2f} GFLOP of {a.flops_dense / 1e9:,.2f} dense",
        ),
    ]


def _rows_table(spec: Spec, rows: list[tuple[str, str]]) -> Table:
    """The summary's table of ``rows``, with the spec's score after its name and pattern."""
    if spec.score != Score():
        rows.insert(2, ("score", spec.score.text))
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, escape(value))
    return table


def _segments_summary(spec: Spec, a: SegmentsAnalysis) -> Table:
    text = format_pattern(spec.pattern)
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    assert spec.space is not None
    rows = [
        ("spec", spec.name),
        ("pattern", text if len(text) <= 160 else text[:157] + "..."),
        ("segments", f"{spec.space} ({spec.space.size:,} tokens)"),
        ("heads x head_dim", f"{spec.heads} x {spec.head_dim} ({spec.dtype})"),
        ("kept pairs", f"{a.kept_pairs:,} of {a.total_pairs:,}"),
        ("density", f"{a.density:.4%}"),
        ("ideal speedup", f"{a.ideal_speedup:.2f}x (1 / density)"),
        ("FLOPs kept (fwd, B=1)", f"{a.flops_kept / 1e9:,.2f} GFLOP of {a.flops_dense / 1e9:,.2f} dense"),
    ]
    if spec.score != Score():
        rows.insert(2, ("score", spec.score.text))
    for key, value in rows:
        table.add_row(key, escape(value))
    return table


def _segment_closed_forms(spec: Spec) -> str:
    """Each listed pair's closed forms, on the query segment's grid for a same-segment pair, on
    the key segment's for a pair of two (whose keys do not depend on the query)."""
    pattern, space = spec.pattern, spec.space
    assert isinstance(pattern, BySegments) and space is not None
    lines = ["closed forms per pair of segments (q: the query's coordinate in its segment):"]
    for i, j, pair in pattern.listed():
        grid = space.grids[j]
        across = "" if i == j else ", the same keys for every query"
        lines.append(
            f"  {space.names[i]} -> {space.names[j]} (grid {grid}{across}): {format_pattern(pair)[:80]}"
        )
        groups = head_groups(pair, grid, spec.heads)
        for group in groups[:2]:
            if len(groups) > 1:
                lines.append(f"    {group.label}:")
            lines += describe(rules(group.pattern, grid), "    ")
        if len(groups) > 2:
            lines.append(f"    ... and {len(groups) - 2} more head patterns")
    return escape("\n".join(lines))


def _pattern_text(spec: Spec) -> str:
    text = format_pattern(spec.pattern)
    return text if len(text) <= 160 else text[:157] + "..."


def _summary(spec: Spec, a: Analysis) -> Table:
    rows = [
        ("spec", spec.name),
        ("pattern", _pattern_text(spec)),
        ("canonical hash", pattern_hash(spec.pattern, spec.grid)),
        ("grid", f"{spec.grid} ({spec.grid.size:,} tokens)"),
        ("heads x head_dim", f"{spec.heads} x {spec.head_dim} ({spec.dtype})"),
        *_counts(a),
    ]
    if spec.queries:
        rows.insert(4, ("queries", f"a box {spec.queries} of the grid (below: every query, then the box)"))
    return _rows_table(spec, rows)


def _cross_summary(spec: Spec, a: CrossAnalysis) -> Table:
    """What analyze prints for a spec with ``q_grid``: the kept pairs over Nq x Nk and where the
    kernels run the call (Note [Cross-attention] in attncc.runtime.cross)."""
    from attncc.runtime import cross

    assert spec.q_grid is not None
    _, embedding = cross.plan(spec.pattern, spec.q_grid.shape, spec.grid.shape, spec.heads)
    n_q, n_k = spec.q_grid.size, spec.grid.size
    where = f"{n_q:,} queries at token {embedding.offset:,} of a 1-D grid of {embedding.length:,} tokens"
    if embedding.padding:
        where += f"; k and v copied with {embedding.padding:,} zero keys after their own"
    rows = [
        ("spec", spec.name),
        ("pattern", _pattern_text(spec)),
        ("q_grid", f"{spec.q_grid} ({n_q:,} queries, a grid of their own: cross-attention)"),
        ("grid", f"{spec.grid} ({n_k:,} keys)"),
        ("heads x head_dim", f"{spec.heads} x {spec.head_dim} ({spec.dtype}): pairs of H x Nq x Nk"),
        *_counts(a),
        ("kernels", where),
    ]
    return _rows_table(spec, rows)


def _closed_forms(spec: Spec) -> str:
    """The closed-form key range of a query coordinate ``q``, for each distinct head pattern."""
    distinct = head_groups(spec.pattern, spec.grid, spec.heads)
    lines = ["closed forms (q: the query's coordinate on that axis, or its flat index):"]
    for group in distinct[:4]:
        if len(distinct) > 1:
            lines.append(f"  {group.label}: {format_pattern(group.pattern)[:100]}")
        lines += describe(rules(group.pattern, spec.grid), "    ")
    if len(distinct) > 4:
        lines.append(f"  ... and {len(distinct) - 4} more head patterns")
    return escape("\n".join(lines))


def _head_plans(spec: Spec) -> list[tuple[HeadGroup, KernelPlan]]:
    """The first four distinct head patterns of ``spec`` and the plan lowering makes of each
    for a GPU: what the text and the picture of analyze show."""
    from attncc.lower.lowering import LaunchConfig, lower

    config = LaunchConfig.default("cuda", spec.head_dim, spec.dtype)
    return [
        (g, lower(g.pattern, spec.grid, spec.head_dim, spec.dtype, config=config))
        for g in head_groups(spec.pattern, spec.grid, spec.heads)[:4]
    ]


def _kernel_plans(spec: Spec, plans: list[tuple[HeadGroup, KernelPlan]]) -> str:
    """What lowering chose for a GPU: iteration, boxes and the plan's tile-level bound, in the
    spec's rank (plans pad every grid to rank 3)."""
    from attncc.lower.lowering import tile_table
    from attncc.lower.visits import visited_tiles

    lines = ["kernel plan (GPU tiles, one head):"]
    user = RANK - spec.grid.rank
    for group, plan in plans:
        groups = "x".join(map(str, plan.dilation[user:]))
        boxes = f"q {'x'.join(map(str, plan.q_tile[user:]))} / kv {'x'.join(map(str, plan.kv_tile[user:]))}"
        who = f"{group.label}: " if len(plans) > 1 else ""
        if plan.iteration == "runtime":  # Note [Runtime plans] in attncc.lower.plan
            listed = "the tiles visited are listed per call, from its data"
            lines.append(f"  {who}runtime iteration, boxes {boxes}: {listed}")
            continue
        entries = len(tile_table(group.pattern, spec.grid, plan)[1]) if plan.iteration == "table" else 0
        visited, dense = visited_tiles(plan, entries)
        lines.append(
            f"  {who}{plan.iteration} iteration, dilation groups {groups}, boxes {boxes}: "
            f"{visited:,} of {dense:,} tile pairs visited, tile bound {dense / max(visited, 1):.2f}x"
        )
        if spec.queries:
            lines.append(f"  {who}{_region_visits(spec, group)}")
    return escape("\n".join(lines))


def _region_visits(spec: Spec, group: HeadGroup) -> str:
    """The tile pairs the forward visits for the spec's queries, a box at the grid's end (Note
    [Walks of a region] in attncc.lower.visits)."""
    from attncc.lower.lowering import LaunchConfig, kernel_tables, lower
    from attncc.lower.visits import walk

    config = LaunchConfig.default("cuda", spec.head_dim, spec.dtype)
    plan = lower(group.pattern, spec.grid, spec.head_dim, spec.dtype, config=config, region=spec.queries)
    tables = kernel_tables(group.pattern, spec.grid, plan) if plan.iteration == "table" else None
    visited = sum(int(loop.per_program.sum()) for loop in walk(plan, tables))
    return f"queries {'x'.join(map(str, spec.queries))} at the grid's end: {visited:,} tile pairs visited"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attncc")
def cli() -> None:
    """attncc: a compiler for structured sparse attention."""


@cli.command("analyze")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option(
    "--q-tile", "q_tiles", multiple=True, help="Q tile: 128 (flat tokens) or 8x16 (a box). Repeatable."
)
@click.option("--kv-tile", "kv_tiles", multiple=True, help="KV tile, same forms; defaults to the Q tile.")
@click.option(
    "--png",
    type=click.Path(dir_okay=False),
    callback=output_file,
    help="Draw the mask, the tile maps of the first tiling and of the kernel's boxes, one query's keys.",
)
@click.option(
    "--ranks",
    type=click.IntRange(1, 4096),
    help="Plan context parallelism over this many ranks instead: per rank work and bytes received, "
    "attncc's plan against ring attention and Ulysses (docs/distributed.md).",
)
@click.option(
    "--sharding",
    type=click.Choice(["auto", "contiguous", "zigzag", "balanced"]),
    default="auto",
    show_default=True,
    help="With --ranks: how the grid's leading axis is split: equal runs, zigzag, cuts that even "
    "the work out (balanced), or the one of these whose busiest rank works least (auto).",
)
def analyze_cmd(
    spec_path: str,
    q_tiles: tuple[str, ...],
    kv_tiles: tuple[str, ...],
    png: str | None,
    ranks: int | None,
    sharding: str,
) -> None:
    """Exact density, ideal speedup and tile map of the pattern in SPEC (YAML/JSON); with
    --ranks, its context-parallel plan."""
    spec = load_spec(spec_path)
    if ranks is not None:
        if q_tiles or kv_tiles or png:
            raise field_error(PatternError, "--ranks", ranks, "alone (no --q-tile, --kv-tile or --png)")
        _context_parallel(whole_grid(spec, "analyze --ranks"), ranks, sharding)
        return
    if spec.space is not None:
        _analyze_segments(spec, q_tiles, kv_tiles, png)
        return
    runtime = [str(leaf) for leaf in spec.pattern.runtime_leaves]
    if png and runtime:
        allowed = "a pattern whose mask is known before the call"
        why = f"{', '.join(runtime)} read data given at call time: drop --png"
        raise field_error(PatternError, "--png", png, allowed, why)
    if spec.q_grid is not None:
        _analyze_cross(spec, q_tiles + kv_tiles, png)
        return
    results = [
        analyze(
            spec.pattern,
            spec.grid,
            parse_tile(qt, "--q-tile"),
            parse_tile(kt, "--kv-tile"),
            heads=spec.heads,
            head_dim=spec.head_dim,
        )
        for qt, kt in _tile_lists(q_tiles, kv_tiles, _DEFAULT_TILES[spec.grid.rank])
    ]
    console = Console(width=None if sys.stdout.isatty() else 130)
    console.print(_summary(spec, results[0]))
    console.print(_closed_forms(spec), soft_wrap=True)
    plans = _head_plans(spec)
    console.print(_kernel_plans(spec, plans), soft_wrap=True)
    if results[0].data_dependent:
        console.print("cost model: not shown (the tiles a runtime plan visits depend on the call's data)")
    else:
        console.print(model_pick(spec), soft_wrap=True)
    console.print(_table(spec, results))
    console.print(
        "tile bound = tile pairs / visited pairs: the speedup over dense"
        " that a kernel skipping empty tiles can reach."
    )
    if png:
        from attncc.plot import draw

        draw(spec, results[0], plans, png)
        console.print(f"wrote {png}")


def _analyze_cross(spec: Spec, tiles: tuple[str, ...], png: str | None) -> None:
    """analyze of a spec with ``q_grid``: the kept pairs over Nq x Nk and, with ``png``, the mask."""
    if tiles:
        why = "a cross call runs as a region of a 1-D grid: no tilings of q_grid to compare"
        raise field_error(PatternError, "--q-tile/--kv-tile", tiles[0], "absent with a spec's q_grid", why)
    assert spec.q_grid is not None
    a = analyze_cross(spec.pattern, spec.q_grid, spec.grid, spec.heads, spec.head_dim)
    console = Console(width=None if sys.stdout.isatty() else 130)
    console.print(_cross_summary(spec, a))
    if png:
        from attncc.plot import draw

        draw(spec, None, [], png)
        console.print(f"wrote {png}")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,} B"


def _context_parallel(spec: Spec, ranks: int, order: str) -> None:
    """The context-parallel plan of ``spec`` over ``ranks`` ranks (Note [Planning from the
    analysis] in attncc.distributed.plan)."""
    from attncc.distributed import Sharding, balanced_sharding, choose_sharding, plan

    if order == "auto":
        sharding = choose_sharding(spec.pattern, spec.grid, ranks, spec.heads)
    elif order == "balanced":
        sharding = balanced_sharding(spec.pattern, spec.grid, ranks, spec.heads)
    else:
        sharding = Sharding(ranks, order)
    itemsize = {"float32": 4}.get(spec.dtype, 2)
    p = plan(spec.pattern, spec.grid, sharding, spec.heads, head_dim=spec.head_dim, itemsize=itemsize)
    a = analyze(spec.pattern, spec.grid, heads=spec.heads, head_dim=spec.head_dim)
    console = Console(width=None if sys.stdout.isatty() else 130)
    console.print(_summary(spec, a))
    how = "balanced cuts" if sharding.cuts else sharding.order
    table = Table(title=f"context parallelism over {ranks} ranks, {how} along axis 0", title_justify="left")
    columns = ("rank", "rows", "work (kept pairs)", "attncc bytes", "from ranks", "ring bytes")
    for col in (*columns, "ulysses work", "ulysses bytes"):
        table.add_column(col, justify="right")
    for r, rp in enumerate(p.ranks):
        table.add_row(
            str(r),
            " ".join(f"{lo}-{hi - 1}" for lo, hi in rp.rows),
            f"{rp.work:,}",
            _size(p.p2p_bytes(r)),
            ", ".join(str(s.src) for s in rp.incoming) or "none",
            _size(p.ring_bytes(r)),
            f"{rp.ulysses_work:,}" if p.ulysses_fits else "-",
            _size(p.ulysses_bytes(r)) if p.ulysses_fits else "-",
        )
    console.print(table)
    most = {m: max(p.bytes(m, r) for r in range(ranks)) for m in ("p2p", "ring", "ulysses")}
    ulysses = (
        f"ulysses {p.imbalance('ulysses'):.3f}, busiest rank receives {_size(most['ulysses'])}"
        if p.ulysses_fits
        else f"ulysses does not fit ({spec.heads} heads over {ranks} ranks)"
    )
    console.print(
        f"work max/mean: attncc and ring {p.imbalance():.3f}; {ulysses}\n"
        f"busiest rank receives: attncc {_size(most['p2p'])}, ring {_size(most['ring'])}\n"
        f"method: {p.method} ({p.reason})\n"
        "bytes: the forward's k/v (Ulysses: q, k, v, output) received; the backward returns as much."
        + ("\nplanned for the most the call's data could keep." if p.data_dependent else "")
    )


def _tile_lists(
    q_tiles: tuple[str, ...], kv_tiles: tuple[str, ...], default: list[str]
) -> list[tuple[str, str]]:
    """The (Q tile, KV tile) texts of ``--q-tile``/``--kv-tile`` (one KV tile for all, or one per Q tile)."""
    q_list = list(q_tiles) or default
    if kv_tiles and len(kv_tiles) not in (1, len(q_list)):
        raise field_error(
            PatternError, "--kv-tile count", len(kv_tiles), f"1 or {len(q_list)} (one per --q-tile)"
        )
    kv_list = list(kv_tiles) * (len(q_list) if len(kv_tiles) == 1 else 1) if kv_tiles else q_list
    return list(zip(q_list, kv_list))


def _analyze_segments(
    spec: Spec, q_tiles: tuple[str, ...], kv_tiles: tuple[str, ...], png: str | None
) -> None:
    """``attncc analyze`` of a space of segments (Note [Segment tile maps] in attncc.ir.analysis):
    by default each segment in boxes of 128 tokens, then flat runs of 128 and of 64 tokens."""
    assert isinstance(spec.pattern, BySegments) and spec.space is not None
    boxes = ",".join(_SEGMENT_BOXES[g.rank] for g in spec.space.grids)
    default = [boxes, "128", "64"] if len(spec.space.names) > 1 else [boxes]
    results = [
        analyze_segments(
            spec.pattern,
            parse_segment_tile(qt, "--q-tile"),
            parse_segment_tile(kt, "--kv-tile"),
            heads=spec.heads,
            head_dim=spec.head_dim,
        )
        for qt, kt in _tile_lists(q_tiles, kv_tiles, default)
    ]
    console = Console(width=None if sys.stdout.isatty() else 130)
    console.print(_segments_summary(spec, results[0]))
    console.print(_segment_closed_forms(spec), soft_wrap=True)
    console.print(_table(spec, results))
    console.print(
        "tile bound = tile pairs / visited pairs: the speedup over dense"
        " that a kernel skipping empty tiles can reach; each segment is tiled on its own grid."
    )
    if png:
        from attncc.plot import draw_segments

        draw_segments(spec, results[0], png)
        console.print(f"wrote {png}")


@cli.command("compile")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory to write; its name is the package name to import.",
)
@click.option(
    "--device",
    type=click.Choice(["cuda", "cpu"]),
    default="cuda",
    show_default=True,
    help="Tile sizes for a GPU, or small ones for the Triton interpreter.",
)
@click.option("--force", is_flag=True, help="Write over the files of a directory that is not empty.")
def compile_cmd(spec_path: str, out_dir: str, device: str, force: bool) -> None:
    """Write SPEC's kernels as a standalone package (needs only torch and triton)."""
    from attncc.lower.emit import usage, write_package

    spec = on_grid(load_spec(spec_path), "compile")
    start = time.perf_counter()
    with progress.step(f"compiling {Path(spec_path).name} into {out_dir}"):
        path = write_package(spec, out_dir, device, force)
    took = time.perf_counter() - start
    click.echo(f"wrote {path}/ in {took:.1f} s: import {path.name}; {usage(spec, path.name)}")


cli.add_command(tune_cmd)
cli.add_command(bench_cmd)
cli.add_command(cache_cmd)
cli.add_command(inspect_cmd)


def main() -> None:
    """Entry point: attncc errors (and a file that cannot be read or written) print as one line,
    no traceback, exit status 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (AttnccError, OSError) as e:  # OSError: a file the command reads or writes, in the system's words
        click.echo(f"attncc: error: {e}", err=True)
        sys.exit(2)

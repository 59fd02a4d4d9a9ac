"""``attncc cache``: list, inspect, clear, export and import the kernel cache."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attncc.runtime import cache
from attncc.runtime.cache_bundle import export_bundle, import_bundle


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 130)


def _size(n: int) -> str:
    return f"{n:,} B" if n < 1024 else f"{n / 1024:,.1f} KiB"


def _when(created: float) -> str:
    return datetime.datetime.fromtimestamp(created).isoformat(sep=" ", timespec="seconds")


@click.group("cache")
def cache_cmd() -> None:
    """The kernel cache (ATTNCC_CACHE_DIR, else the platform cache directory)."""


@cache_cmd.command("ls")
@click.option("--kind", "kinds", multiple=True, help="Only entries of this kind (kernels, tuning, ...).")
def ls_cmd(kinds: tuple[str, ...]) -> None:
    """One line per entry: key, kind, what it holds, size, when it was made, and its state."""
    statuses = [s for s in cache.scan() if not kinds or s.kind in kinds]
    console = _console()
    if not statuses:
        console.print(f"no entries in {escape(str(cache.root()))}")
        return
    table = Table(title=escape(str(cache.root())), title_justify="left")
    for col in ("key", "kind", "label", "size", "created", "state"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for s in statuses:
        e = s.entry
        table.add_row(
            s.digest[:16] or "-",
            s.kind,
            escape(e.label) if e else "",
            _size(e.size) if e else "",
            _when(e.created) if e else "",
            escape(s.problem) or "ok",
        )
    console.print(table)


@cache_cmd.command("info")
@click.argument("key")
def info_cmd(key: str) -> None:
    """Key parts, versions, files and sizes of the entry KEY (a unique prefix will do)."""
    s = cache.find(key)
    console = _console()
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    rows = [("key", s.digest), ("kind", s.kind), ("path", str(s.path)), ("state", s.problem or "ok")]
    if s.entry:
        e = s.entry
        rows += [("label", e.label), ("created", _when(e.created)), ("size", _size(e.size))]
        rows += [(f"version {k}", v) for k, v in sorted(e.versions.items())]
        rows += [("parts", json.dumps(e.parts, indent=1, sort_keys=True))]
        for name, f in sorted(e.files.items()):
            rows.append((f"file {name}", f"{_size(f['size'])}  sha256 {f['sha256']}"))
    for name, value in rows:
        table.add_row(name, escape(value))
    console.print(table)


@cache_cmd.command("clear")
@click.option("--stale", is_flag=True, help="Only entries of another version, and corrupt ones.")
def clear_cmd(stale: bool) -> None:
    """Remove cache entries (all of them, or only the stale and corrupt ones)."""
    removed = cache.clear(stale_only=stale)
    click.echo(f"removed {removed} entr{'y' if removed == 1 else 'ies'} from {cache.root()}")


@cache_cmd.command("export")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--kind", "kinds", multiple=True, help="Only entries of this kind. Repeatable.")
def export_cmd(file: str, kinds: tuple[str, ...]) -> None:
    """Bundle the intact entries of this version into FILE (a .tar.gz) for another machine."""
    entries = export_bundle(file, kinds)
    click.echo(f"exported {len(entries)} entries to {file} ({_size(Path(file).stat().st_size)})")


@cache_cmd.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def import_cmd(file: str) -> None:
    """Check every entry of the bundle FILE, then install them (nothing if any check fails)."""
    installed, present = import_bundle(file)
    click.echo(f"imported {installed} entries ({present} already present) into {cache.root()}")

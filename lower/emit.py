"""``attncc compile``: write a spec's kernels as a standalone importable package.

The package holds one rendered kernel module per distinct head pattern, its
int32 tables, and an ``__init__`` spelled from ``package_init.py.j2`` whose
``forward`` (differentiable: the backward kernels are in the same modules)
needs only torch and triton.
"""

from __future__ import annotations

import importlib.util
import keyword
import sys
import unicodedata
from pathlib import Path

import numpy as np

from attncc import __version__
from attncc.errors import SpecError, field_error
from attncc.ir.canonical import canonicalize, resolve_heads
from attncc.ir.spec import Spec
from attncc.ir.text import format_pattern
from attncc.ir.validate import required_heads
from attncc.lower.lowering import LaunchConfig, kernel_tables, lower
from attncc.lower.render import ENV, render
from attncc.runtime.cache import write_atomic

# Note [Package names]: a package is imported by its directory's name, so a name that is
# importable already (torch, triton, attncc, numpy, a stdlib module, ...) would shadow that
# module wherever the package lies on the path, or be shadowed by it; and Python NFKC-normalises
# identifiers, so a non-ASCII name can import as another ("ﬁle" is "file"). Only ASCII
# identifiers that name nothing importable are taken. A package never overwrites files
# unasked: a directory that holds anything needs ``force`` (``attncc compile --force``).
_NEEDED = ("attncc", "math", "torch", "triton")  # what a compiled package and attncc import


def _write(path: Path, text: str) -> None:
    """Write atomically (Note [File modes] in attncc.runtime.cache), and not at all when
    unchanged (nothing rebuilds for no reason)."""
    if path.exists() and path.read_text() == text:
        return
    write_atomic(path, text.encode())


def _check_package_dir(out: Path, force: bool = False) -> None:
    """Raise a :class:`SpecError` naming ``out`` unless a package may be written there
    (Note [Package names])."""
    name = out.name
    allowed = "a directory named as an ASCII Python identifier that no importable module has"
    if not (name.isascii() and name.isidentifier()) or keyword.iskeyword(name):
        nfkc = unicodedata.normalize("NFKC", name)
        why = f"Python would import it as {nfkc!r}" if nfkc != name else ""
        raise field_error(SpecError, "-o", str(out), allowed, why)
    if name in _NEEDED or name in sys.stdlib_module_names:
        raise field_error(SpecError, "-o", str(out), allowed, f"it would shadow the module {name}")
    where = _importable_elsewhere(name, out)
    if where is not None:
        raise field_error(SpecError, "-o", str(out), allowed, f"{name} is importable already, from {where}")
    if out.is_file():
        raise field_error(SpecError, "-o", str(out), "a directory", "it is a file")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names and not force:
        held = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        allowed = "a new or empty directory, or --force to write over what it holds"
        raise field_error(SpecError, "-o", str(out), allowed, f"it holds {held}")


def _importable_elsewhere(name: str, out: Path) -> str | None:
    """Where ``import name`` finds a module other than a package at ``out``, or None."""
    try:
        found = importlib.util.find_spec(name)
    except ValueError:  # in sys.modules without a spec, as ``__main__`` may be
        return "sys.modules"
    if found is None:
        return None
    places = list(found.submodule_search_locations or [])
    if places and all(Path(p).resolve() == out.resolve() for p in places):
        return None  # the package written there before, which --force writes over
    return found.origin or places[0]


def write_package(spec: Spec, out_dir: str | Path, device_type: str = "cuda", force: bool = False) -> Path:
    """Write ``out_dir`` as a package named after its last path component; a directory
    that holds anything is written over only with ``force`` (Note [Package names])."""
    out = Path(out_dir)
    _check_package_dir(out, force)
    out.mkdir(parents=True, exist_ok=True)
    shared = required_heads(spec.pattern) is None
    groups: dict = {}
    for head, pattern in enumerate(resolve_heads(spec.pattern, 1 if shared else spec.heads)):
        groups.setdefault(canonicalize(pattern, spec.grid), []).append(head)
    kernels, tables, dkdv_tables = [], [], []
    config = LaunchConfig.default(device_type, spec.head_dim, spec.dtype)
    dkdv_config = LaunchConfig.default_dkdv(device_type, spec.head_dim, spec.dtype)
    for i, (pattern, heads) in enumerate(groups.items()):
        plan = lower(pattern, spec.grid, spec.head_dim, spec.dtype, config=config)
        dkdv = lower(pattern, spec.grid, spec.head_dim, spec.dtype, config=dkdv_config)
        _write(out / f"_kernel{i}.py", render(plan))
        _write(out / f"_kernel{i}_dkdv.py", render(dkdv))  # Note [Backward tiles]
        for into, p in ((tables, plan), (dkdv_tables, dkdv)):
            into.append(tuple(a.astype(np.int32).tolist() for a in kernel_tables(pattern, spec.grid, p)))
        kernels.append({"module": f"_kernel{i}", "heads": None if shared else heads})
    _write(
        out / "_tables.py",
        '"""int32 tables of the kernels (values, offsets, entries, kv_offsets, kv_entries): TABLES for\n'
        'the forward and dQ kernels, DKDV_TABLES for the dK/dV kernels (their own tiles)."""\n\n'
        f"TABLES = {tables!r}\nDKDV_TABLES = {dkdv_tables!r}\n",
    )
    init = ENV.get_template("package_init.py.j2").render(
        name=out.name,
        version=__version__,
        pattern_text=format_pattern(spec.pattern),
        grid="x".join(map(str, spec.grid.shape)),
        grid_dims=", ".join(map(str, spec.grid.shape)),
        grid_tuple=repr(tuple(spec.grid.shape)),
        tokens=spec.grid.size,
        head_dim=spec.head_dim,
        dtype=spec.dtype,
        heads=None if shared else spec.heads,
        kernels=kernels,
    )
    _write(out / "__init__.py", init)
    return out

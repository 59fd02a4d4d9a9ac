"""``attncc compile``: write a spec's kernels as a standalone importable package.

The package holds one rendered kernel module per distinct head pattern, its
int32 tables, and an ``__init__`` spelled from ``package_init.py.j2`` whose
``forward`` (differentiable: the backward kernels are in the same modules)
needs only torch and triton.
"""

from __future__ import annotations

import keyword
import os
import tempfile
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


def _write(path: Path, text: str) -> None:
    """Write atomically, and not at all when unchanged (nothing rebuilds for no reason)."""
    if path.exists() and path.read_text() == text:
        return
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def write_package(spec: Spec, out_dir: str | Path, device_type: str = "cuda") -> Path:
    """Write ``out_dir`` as a package named after its last path component."""
    out = Path(out_dir)
    if not out.name.isidentifier() or keyword.iskeyword(out.name):
        raise field_error(SpecError, "-o", out.name, "a directory named as a Python identifier")
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

"""Render a KernelPlan into Triton source and load it as a module.

A rendered module is a kernel entry of :mod:`attncc.runtime.cache` (its one file
``kernel.py``), keyed by the plan, the source's hash, the backend and the device.

Note [Verified code]: the module that runs is compiled from the bytes whose
sha256 the key binds, which are the bytes the entry's lookup checked
``kernel.py`` against; the file is not read again. Importing it instead would
hash one read and run another (a file swapped in between runs unchecked), and
would write ``__pycache__`` into the entry and prefer a ``.pyc`` found there to
the checked source. Triton reads a ``@jit`` function's source through
``inspect``, i.e. ``linecache``: the checked text is registered there under the
entry's path with no modification time, as ``linecache`` records sources that
came from a module loader, so ``linecache.checkcache`` keeps it and Triton
compiles the same text that runs (only after ``linecache.clearcache()`` would it
read the file, which the cache's owner alone can write). When the cache cannot be
written the same bytes run under a name that is no file at all, so nothing on
disk is ever read for them.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import linecache
from pathlib import Path
from types import ModuleType

import jinja2

from attncc.lower.decode import DecodePlan
from attncc.lower.plan import RUNTIME_ARGS, KernelPlan
from attncc.lower.segments import SegmentPlan
from attncc.memo import memo
from attncc.runtime import cache as kernel_cache

KERNELS = "kernels"  # the cache kind of rendered modules
MODULE = "kernel.py"

ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("attncc.templates", "triton"),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
ENV.globals["RUNTIME_ARGS"] = RUNTIME_ARGS  # the kernels' parameters of runtime data (a plan's names)


def kernel_dir() -> Path:
    """The folder of kernel entries, ``<cache root>/kernels``."""
    return kernel_cache.root() / KERNELS


def render(plan: KernelPlan) -> str:
    """The Triton module source of ``plan``: forward and backward kernels and their launchers."""
    source = ENV.get_template("attention.py.j2").render(plan=plan)
    _check_names(source)
    return source


def _check_names(source: str) -> None:
    """Refuse a module that binds one top-level name twice.

    Note [One name, one constant]: the template's sections (grid, region, score terms,
    runtime data) each write their constants at module level; two sections choosing one
    name would let the later silently redefine the earlier for every kernel, which is
    an out-of-bounds access, not an error. A rendering that does so is a bug of the
    template's, caught here before anything runs.
    """
    seen: set[str] = set()
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names = [node.name]
        for name in names:
            if name in seen:
                raise AssertionError(f"attncc template bug: the kernel module binds {name} twice")
            seen.add(name)


@memo
def load(plan: KernelPlan) -> ModuleType:
    """Render ``plan``, keep its module file in the kernel cache (built once) and run it
    (Note [Verified code]).

    Memoised per process: a second call with an equal plan returns the same module.
    """
    # A plan is rank 3 (leading axes of size 1); the label drops those, as a 12x12 grid's kernel
    # is the 1x12x12 one: 'grid 12x12 q 4x16', not 'grid 1x12x12 q 1x4x16'.
    lead = next((i for i, n in enumerate(plan.grid[:-1]) if n != 1), len(plan.grid) - 1)
    grid, q, kv = ("x".join(map(str, dims[lead:])) for dims in (plan.grid, plan.q_tile, plan.kv_tile))
    label = f"triton {plan.iteration} {plan.dtype} d{plan.head_dim} grid {grid} q {q} kv {kv}"
    return _load(render(plan).encode(), {"plan": dataclasses.asdict(plan)}, label)


def render_decode(plan: DecodePlan) -> str:
    """The Triton module source of a decode plan: its kernel, the merge and their launcher."""
    return ENV.get_template("decode.py.j2").render(plan=plan)


@memo
def load_decode(plan: DecodePlan) -> ModuleType:
    """:func:`load` for a decode plan (attncc.lower.decode)."""
    label = f"triton decode {plan.iteration} {plan.dtype} d{plan.head_dim} keys {plan.keys} rows {plan.rows}"
    return _load(render_decode(plan).encode(), {"decode plan": dataclasses.asdict(plan)}, label)


def render_segments(plan: SegmentPlan) -> str:
    """The Triton module source of a segments plan: its three kernels and their launchers
    (Note [Segment kernels] in attncc.lower.segments)."""
    source = ENV.get_template("segments.py.j2").render(plan=plan)
    _check_names(source)
    return source


@memo
def load_segments(plan: SegmentPlan) -> ModuleType:
    """:func:`load` for a segments plan."""
    shapes = " ".join(f"{s.name} {'x'.join(map(str, s.shape))}" for s in plan.segments)
    label = f"triton segments {plan.dtype} d{plan.head_dim} {shapes}"
    return _load(render_segments(plan).encode(), {"segments plan": dataclasses.asdict(plan)}, label)


def _load(data: bytes, plan: dict, label: str) -> ModuleType:
    """The module of source ``data`` from the kernel cache entry of ``plan`` (its fields)."""
    parts = {
        **plan,
        "sha256": {MODULE: hashlib.sha256(data).hexdigest()},  # binds the file: see attncc.runtime.cache
        "backend": "triton",
        "device": kernel_cache.device_capability(),
    }
    key = kernel_cache.make_key(KERNELS, parts)
    try:
        entry = kernel_cache.build_entry(key, functools.partial(_write_module, data=data), label)
        filename = str(entry.file(MODULE))
    except kernel_cache.Unwritable as e:  # Note [Cache faults] in attncc.runtime.cache: run from memory
        kernel_cache.uncached(e)
        filename = f"<attncc kernel {key.digest[:24]}, not cached>"
    return _module_from_source(f"attncc_kernel_{key.digest[:24]}", filename, data)


def _write_module(folder: Path, data: bytes) -> None:
    kernel_cache.write_atomic(folder / MODULE, data)


def _module_from_source(name: str, filename: str, data: bytes) -> ModuleType:
    """Run the Python source ``data`` as a new module ``name`` whose source is ``filename``.

    ``inspect`` (and so Triton) finds the source in ``linecache``, not on disk; nothing
    is written (Note [Verified code]).
    """
    text = data.decode()
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    module = ModuleType(name)
    module.__file__ = filename
    exec(compile(data, filename, "exec", dont_inherit=True), module.__dict__)
    return module

"""Render a KernelPlan into Triton source and load it as a module.

A rendered module is a kernel entry of :mod:`attncc.runtime.cache` (its one file
``kernel.py``, imported from there: Triton's JIT needs a real source file),
keyed by the plan, the source's hash, the backend and the device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType

import jinja2

from attncc.lower.plan import KernelPlan
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


def kernel_dir() -> Path:
    """The folder of kernel entries, ``<cache root>/kernels``."""
    return kernel_cache.root() / KERNELS


def render(plan: KernelPlan) -> str:
    """The Triton module source of ``plan``: forward and backward kernels and their launchers."""
    return ENV.get_template("attention.py.j2").render(plan=plan)


@cache
def load(plan: KernelPlan) -> ModuleType:
    """Render ``plan``, take its module file from the kernel cache (built once) and import it.

    Memoised per process: a second call with an equal plan returns the same module.
    """
    data = render(plan).encode()
    parts = {
        "plan": dataclasses.asdict(plan),
        "sha256": {MODULE: hashlib.sha256(data).hexdigest()},  # binds the file: see attncc.runtime.cache
        "backend": "triton",
        "device": kernel_cache.device_capability(),
    }
    label = (
        f"triton {plan.iteration} {plan.dtype} d{plan.head_dim} grid {'x'.join(map(str, plan.grid))}"
        f" q {'x'.join(map(str, plan.q_tile))} kv {'x'.join(map(str, plan.kv_tile))}"
    )
    key = kernel_cache.make_key(KERNELS, parts)
    entry = kernel_cache.build_entry(key, lambda folder: (folder / MODULE).write_bytes(data), label)
    spec = importlib.util.spec_from_file_location(f"attncc_kernel_{key.digest[:24]}", entry.file(MODULE))
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""Render a KernelPlan into Triton source and load it as a module.

Rendered files are written once, atomically, under the kernel directory
(``ATTNCC_CACHE_DIR`` or the platform cache directory) named by the hash of
their source, and imported from there: Triton's JIT needs a real source file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType

import jinja2

from attncc.lower.plan import KernelPlan

ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("attncc.templates", "triton"),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def kernel_dir() -> Path:
    root = os.environ.get("ATTNCC_CACHE_DIR")
    if not root:
        import platformdirs  # only when needed: the lent GPU machines lack it

        root = platformdirs.user_cache_dir("attncc")
    return Path(root) / "kernels"


def render(plan: KernelPlan) -> str:
    """The Triton module source of ``plan``: forward and backward kernels and their launchers."""
    return ENV.get_template("attention.py.j2").render(plan=plan)


@cache
def load(plan: KernelPlan) -> ModuleType:
    """Render, write (once) and import the module of ``plan``; cached per process."""
    source = render(plan)
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    path = kernel_dir() / f"attncc_fwd_{digest}.py"
    if not path.exists() or path.read_text() != source:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            f.write(source)
        os.replace(f.name, path)  # readers see the old file or the whole new one
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

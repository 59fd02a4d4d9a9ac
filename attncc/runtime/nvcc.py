"""Building CUDA sources with nvcc into cached shared objects.

A CUTLASS kernel is C++ that nvcc compiles for sm_90a against the headers of
the ``nvidia-cutlass`` wheel (``pip install "attncc[cutlass]"``). One build
takes about a minute of one core, so every shared object is a kernel entry of
:mod:`attncc.runtime.cache` (files ``kernel.cu`` and ``kernel.so``), keyed by the
source's hash, the nvcc version, the flags and the caller's parts: a second
process loads it without running nvcc. A source that does not compile is kept
at ``<cache root>/failed/<digest>.cu`` and named in the :class:`BuildError`,
so the report can be reproduced by hand.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Mapping
from functools import cache
from importlib.util import find_spec
from pathlib import Path

from attncc.errors import BuildError
from attncc.runtime import cache as kernel_cache
from attncc.runtime import progress

KERNELS = "kernels"  # the same cache kind as the Triton modules
SOURCE = "kernel.cu"
LIBRARY = "kernel.so"
ARCH = "sm_90a"  # wgmma and TMA, as the Hopper FMHA mainloop uses them
FLAGS = (
    "-std=c++17",
    "-O3",
    "--expt-relaxed-constexpr",
    "--use_fast_math",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-Xcompiler=-fPIC",
    "-shared",
    "-DNDEBUG",
)
_INCLUDES = ("include", "tools/util/include", "examples")  # under the wheel's ``source``
_TAIL = 4000  # characters of nvcc's report kept in a BuildError


def nvcc_path() -> str | None:
    """``$CUDA_HOME/bin/nvcc`` if it exists, else nvcc on ``PATH``, else None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cutlass_root() -> Path | None:
    """The CUTLASS source tree the ``nvidia-cutlass`` wheel ships (``cutlass_library/source``), or None."""
    spec = find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "source"
    return source if (source / "include" / "cutlass").is_dir() else None


def include_dirs() -> list[Path]:
    """The include folders a CUTLASS kernel compiles against."""
    source = cutlass_root()
    if source is None:
        raise BuildError('the CUTLASS headers are missing: pip install "attncc[cutlass]" (nvidia-cutlass)')
    return [source / folder for folder in _INCLUDES]


def _nvcc() -> str:
    path = nvcc_path()
    if path is None:
        raise BuildError(
            "nvcc is not on PATH and CUDA_HOME/bin/nvcc does not exist: install the CUDA toolkit"
        )
    return path


@cache
def nvcc_version(path: str) -> str:
    """The last line of ``nvcc --version`` (the build id): part of every key."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def command(source: Path, output: Path, includes: list[Path] | None = None) -> list[str]:
    """The nvcc command line that builds ``source`` into the shared object ``output``."""
    dirs = include_dirs() if includes is None else includes
    return [_nvcc(), *FLAGS, *(f"-I{d}" for d in dirs), "-o", str(output), str(source)]


def build(source: str, label: str, parts: Mapping[str, object]) -> Path:
    """The shared object built from ``source``: from the kernel cache, or built into it once.

    ``parts`` are the caller's key parts (the plan); ``label`` names the kernel in
    ``attncc cache ls`` and in errors. Raises :class:`BuildError` if nvcc fails.
    """
    data = source.encode()
    nvcc = _nvcc()
    key = kernel_cache.make_key(
        KERNELS,
        {
            **parts,
            "source_sha256": hashlib.sha256(data).hexdigest(),
            "backend": "cutlass",
            "nvcc": nvcc_version(nvcc),
            "flags": list(FLAGS),
        },
    )

    def compile_into(folder: Path) -> None:
        (folder / SOURCE).write_bytes(data)
        with progress.step(f"nvcc: building {label} (a minute or two)"):
            run = subprocess.run(command(folder / SOURCE, folder / LIBRARY), capture_output=True, text=True)
        if run.returncode != 0:
            failed = kernel_cache.root() / "failed" / f"{key.digest}.cu"
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_bytes(data)
            report = (run.stderr or run.stdout)[-_TAIL:]
            raise BuildError(f"nvcc could not build {label} (source kept at {failed}):\n{report}")

    return kernel_cache.build_entry(key, compile_into, label).file(LIBRARY)


@cache
def load(path: Path) -> ctypes.CDLL:
    """The shared object at ``path``, loaded once per process."""
    return ctypes.CDLL(str(path))

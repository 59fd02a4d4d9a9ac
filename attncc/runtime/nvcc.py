"""Building CUDA sources with nvcc into cached shared objects.

A CUTLASS kernel is C++ that nvcc compiles for sm_90a against the headers of
the ``nvidia-cutlass`` wheel (``pip install "attncc[cutlass]"``). One build
takes about a minute of one core, so every shared object is a kernel entry of
:mod:`attncc.runtime.cache` (files ``kernel.cu`` and ``kernel.so``), keyed by the
source's hash, the nvcc version, the flags and the caller's parts: a second
process loads it without running nvcc. A source that does not compile is kept
at ``<cache root>/failed/<digest>.cu`` and named in the :class:`BuildError`,
so the report can be reproduced by hand.

Note [Loading checked bytes]: ``ctypes.CDLL`` of the entry's ``kernel.so`` would
read the file again after the cache checked it, and a file swapped in between
would run unchecked. :func:`load` reads the entry once, checks it (the manifest
against its key, every file against the manifest), writes the bytes it checked
into an anonymous in-memory file (``memfd_create``), seals it against writes and
loads that through ``/proc/self/fd``. The descriptor stays open for the life of
the process, as the library does (ctypes never unloads one): the dynamic loader
knows a loaded library by its path, so a closed descriptor's number reused by the
next load would be taken for the library already loaded.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Mapping
from functools import cache
from importlib.util import find_spec
from pathlib import Path

from attncc.errors import BuildError
from attncc.memo import memo
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


@cache  # unbounded: one entry per nvcc on the machine
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
        kernel_cache.write_atomic(folder / SOURCE, data)
        with progress.step(f"nvcc: building {label} (a minute or two)"):
            run = subprocess.run(command(folder / SOURCE, folder / LIBRARY), capture_output=True, text=True)
        if run.returncode != 0:
            failed = kernel_cache.root() / "failed" / f"{key.digest}.cu"
            try:
                failed.parent.mkdir(parents=True, exist_ok=True)
                kernel_cache.write_atomic(failed, data)
                kept = f"source kept at {failed}"
            except OSError as e:
                kept = f"the source could not be kept at {failed}: {e.strerror or e}"
            report = (run.stderr or run.stdout)[-_TAIL:]
            raise BuildError(f"nvcc could not build {label} ({kept}):\n{report}")

    try:
        entry = kernel_cache.build_entry(key, compile_into, label)
    except kernel_cache.Unwritable as e:  # Note [Cache faults] in attncc.runtime.cache
        kernel_cache.uncached(e)
        entry = kernel_cache.build_private(key, compile_into, label)
    return entry.file(LIBRARY)


_loaded: list[int] = []  # loaded libraries' in-memory files, open for good (Note [Loading checked bytes])


@memo
def load(path: Path) -> ctypes.CDLL:
    """The shared object at ``path`` (a ``kernel.so`` that :func:`build` returned), loaded once
    per process from the bytes its entry's check read (Note [Loading checked bytes])."""
    folder = path.parent
    try:
        _, contents = kernel_cache.read_entry(folder, folder.parent.name, folder.name)
        data = contents[path.name]
    except (OSError, KeyError, kernel_cache.Corrupt) as e:
        why = f"{type(e).__name__}: {e}" if isinstance(e, (OSError, KeyError)) else str(e)
        raise BuildError(
            f"the shared object {path} fails its check ({why}); only a kernel.so in a cache entry "
            "loads: run again, and a new process rebuilds a damaged entry (`attncc cache ls` lists it)"
        ) from None
    fd = os.memfd_create(f"attncc-{folder.name[:16]}.so", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        library = ctypes.CDLL(f"/proc/self/fd/{fd}")
    except OSError as e:
        os.close(fd)
        raise BuildError(f"the shared object {path} could not be loaded from memory: {e}") from None
    _loaded.append(fd)
    return library

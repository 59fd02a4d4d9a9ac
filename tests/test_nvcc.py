"""attncc.runtime.nvcc: building a CUDA source into a cached shared object, on a machine with nvcc and no GPU.

A tiny source with one host function is enough to check the build, the load,
the cache (a second build runs no nvcc) and the error on a source that does
not compile; the CUTLASS kernel itself is compiled in ``tests/test_cutlass.py``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from attncc.errors import BuildError
from attncc.runtime import cache, nvcc

needs_nvcc = pytest.mark.skipif(nvcc.nvcc_path() is None, reason="nvcc is not installed")
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) to build a host .so")

SOURCE = """
extern "C" int attncc_answer(int x) { return 6 * x; }
__global__ void unused(float* p) { p[threadIdx.x] = 0.f; }
"""


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_memo", {})
    monkeypatch.setattr(cache, "_warned", set())
    return tmp_path / "cache"


@needs_nvcc
def test_build_loads_and_calls(cache_dir):
    path = nvcc.build(SOURCE, "answer", {"test": "answer"})
    assert path.name == nvcc.LIBRARY and path.is_relative_to(cache_dir)
    assert (path.parent / nvcc.SOURCE).read_text() == SOURCE
    answer = nvcc.load(path).attncc_answer
    answer.argtypes, answer.restype = [ctypes.c_int], ctypes.c_int
    assert answer(7) == 42


@needs_nvcc
def test_second_build_is_a_cache_hit(cache_dir, monkeypatch):
    first = nvcc.build(SOURCE, "answer", {"test": "hit"})

    def no_compiler(*args, **kwargs):
        raise AssertionError("nvcc ran on a cache hit")

    monkeypatch.setattr(nvcc.subprocess, "run", no_compiler)
    assert nvcc.build(SOURCE, "answer", {"test": "hit"}) == first


@needs_nvcc
def test_another_source_is_another_entry(cache_dir):
    a = nvcc.build(SOURCE, "answer", {"test": "two"})
    b = nvcc.build(SOURCE.replace("6 * x", "7 * x"), "answer", {"test": "two"})
    assert a != b


@needs_nvcc
def test_broken_source_names_the_kept_file(cache_dir):
    broken = 'extern "C" int f() { return undeclared_name; }\n'
    with pytest.raises(BuildError, match="nvcc could not build broken") as info:
        nvcc.build(broken, "broken", {"test": "broken"})
    message = str(info.value)
    assert "undeclared_name" in message  # nvcc's own report is in the error
    kept = Path(message.split("source kept at ")[1].split(")")[0])
    assert kept.read_text() == broken and kept.parent == cache_dir / "failed"
    assert not list((cache_dir / nvcc.KERNELS).glob("[0-9a-f]*"))  # no entry was made


def test_command_targets_sm90a(tmp_path):
    cmd = nvcc.command(tmp_path / "k.cu", tmp_path / "k.so", includes=[tmp_path])
    assert "-gencode=arch=compute_90a,code=sm_90a" in cmd and "-shared" in cmd
    assert cmd[-1] == str(tmp_path / "k.cu") and cmd[cmd.index("-o") + 1] == str(tmp_path / "k.so")
    assert f"-I{tmp_path}" in cmd


@needs_nvcc
def test_missing_nvcc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(nvcc, "nvcc_path", lambda: None)
    with pytest.raises(BuildError, match="nvcc is not on PATH"):
        nvcc.build(SOURCE, "answer", {"test": "none"})


def test_missing_headers_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(nvcc, "cutlass_root", lambda: None)
    with pytest.raises(BuildError, match=r'pip install "attncc\[cutlass\]"'):
        nvcc.include_dirs()


@needs_nvcc
def test_machine_code_of_a_build_is_read_per_kernel_function(cache_dir):
    # attncc.machine.cutlass reads the CUTLASS forward this way (attncc inspect --cutlass).
    from attncc.machine.cutlass import read

    (function,) = read(nvcc.build(SOURCE, "answer", {"test": "machine code"}))
    assert function.name == "_Z6unusedPf"
    assert function.registers > 0 and function.local_bytes == function.stack_bytes == 0
    assert function.instructions > 0 and function.hgmma == function.tma == 0


def _host_library(folder: Path, factor: int) -> None:
    """A kernel entry's files as nvcc.build writes them, from a host-only C source built with cc."""
    source = f"int attncc_answer(int x) {{ return {factor} * x; }}\n"
    cache.write_atomic(folder / nvcc.SOURCE, source.encode())
    out, src = folder / nvcc.LIBRARY, folder / nvcc.SOURCE
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-x", "c", "-o", str(out), str(src)], check=True, capture_output=True
    )


def _host_entry(factor: int) -> Path:
    key = cache.make_key(nvcc.KERNELS, {"test": "host", "factor": factor})
    return cache.build_entry(key, lambda folder: _host_library(folder, factor)).file(nvcc.LIBRARY)


def _answer(library: ctypes.CDLL) -> int:
    answer = library.attncc_answer
    answer.argtypes, answer.restype = [ctypes.c_int], ctypes.c_int
    return answer(7)


@needs_cc
def test_load_runs_the_checked_bytes_not_a_file_swapped_during_the_load(cache_dir, monkeypatch):
    path, other = _host_entry(6), _host_entry(7)
    real = cache.read_entry

    def swap_after_the_check(*args, **kwargs):
        checked = real(*args, **kwargs)
        shutil.copyfile(other, path)  # swapped between the checksum and the load
        return checked

    monkeypatch.setattr(cache, "read_entry", swap_after_the_check)
    library = nvcc.load(path)
    assert _answer(library) == 42
    assert library._name.startswith("/proc/self/fd/")  # a sealed in-memory copy, not the entry's file


@needs_cc
def test_load_refuses_a_library_swapped_after_the_build_checked_it(cache_dir):
    path, other = _host_entry(6), _host_entry(7)
    shutil.copyfile(other, path)
    with pytest.raises(BuildError, match=rf"{path} fails its check \(file kernel.so fails its sha256"):
        nvcc.load(path)


@needs_cc
def test_load_refuses_a_file_outside_a_cache_entry(tmp_path):
    _host_library(tmp_path, 6)
    with pytest.raises(BuildError, match=rf"{tmp_path / nvcc.LIBRARY} fails its check"):
        nvcc.load(tmp_path / nvcc.LIBRARY)


@needs_nvcc
def test_build_into_an_unwritable_cache_builds_privately_with_one_warning(tmp_path, monkeypatch):
    plain = tmp_path / "not-a-folder"
    plain.write_text("user data")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(plain))
    monkeypatch.setattr(cache, "_memo", {})
    monkeypatch.setattr(cache, "_warned", set())
    with pytest.warns(UserWarning, match=rf"the cache cannot be written \({plain}"):
        path = nvcc.build(SOURCE, "answer", {"test": "private"})
    assert not path.is_relative_to(plain) and stat_mode(path.parents[2]) == 0o700
    assert _answer(nvcc.load(path)) == 42
    assert nvcc.build(SOURCE, "answer", {"test": "private"}) == path  # built once per process


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777

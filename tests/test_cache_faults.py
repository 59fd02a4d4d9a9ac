"""Faults of the kernel cache: attention still computes when the cache cannot be written, with
one warning that says why, and `attncc cache ls | info | clear` survive junk in the cache."""

import errno
import os
import re
import stat
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import attncc
from attncc.autotune.records import KIND as TUNING
from attncc.cli import cli
from attncc.errors import CacheError
from attncc.ir import Grid, causal, dense
from attncc.lower.render import KERNELS
from attncc.reference import attention as reference
from attncc.runtime import cache
from attncc.runtime.library import forget_kernels

UNWRITABLE = r"attncc: the cache cannot be written \("


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """An empty cache root of its own, nothing remembered, and no kernel built yet."""
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_memo", {})
    monkeypatch.setattr(cache, "_records", {})
    monkeypatch.setattr(cache, "_warned", set())
    forget_kernels()
    yield
    forget_kernels()


def _attend(pattern=None, n: int = 16) -> None:
    """One attention call, checked against the reference."""
    pattern = dense() if pattern is None else pattern
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    out = attncc.attention(q, k, v, pattern, grid=Grid((n,)))
    torch.testing.assert_close(out, reference(q, k, v, pattern, grid=Grid((n,))), atol=1e-5, rtol=1e-5)


def _computes_with_one_warning(names: str) -> str:
    """Two kernels compute without the cache; exactly one warning, naming ``names`` (a regex)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _attend()
        _attend(causal(), n=24)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert re.match(UNWRITABLE + names, messages[0]), messages[0]  # says why: the path and the OS error
    assert "computes without it" in messages[0] and "ATTNCC_CACHE_DIR" in messages[0]
    return messages[0]


def _enospc(*args, **kwargs):
    path = args[0]
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """The cache root exists and cannot be written: chmod 0o555, or, as root (whom chmod does not
    stop), every open-for-writing and mkdir under it fails with EACCES as chmod would make them."""
    root = tmp_path / "cache"
    root.mkdir()
    if not _is_root():
        root.chmod(0o555)
        yield root
        root.chmod(0o755)
        return
    real_open, real_mkdir = os.open, os.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def denied(path) -> OSError:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def guarded_open(path, flags, *args, **kwargs):
        if flags & writing and Path(path).is_relative_to(root):
            raise denied(path)
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if Path(path).is_relative_to(root):
            raise denied(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    yield root


def test_read_only_cache_computes_in_memory(read_only):
    _computes_with_one_warning(rf"{read_only}\S*: Permission denied\)")
    assert list(read_only.iterdir()) == []


@pytest.mark.parametrize("which", ["every write", "entry files"])
def test_full_disk_computes_in_memory_and_leaves_nothing_half_written(tmp_path, monkeypatch, which):
    real = cache.write_atomic

    def full(path, data):
        if which == "entry files" and path.name.endswith(".holder"):
            return real(path, data)
        return _enospc(path)

    monkeypatch.setattr(cache, "write_atomic", full)
    _computes_with_one_warning(r"\S+: No space left on device\)")
    kernels = tmp_path / "cache" / KERNELS
    assert not kernels.exists() or list(kernels.iterdir()) == []  # no entry, no temporary folder


def test_cache_dir_that_is_a_file_computes_in_memory(tmp_path, monkeypatch):
    plain = tmp_path / "not-a-folder"
    plain.write_text("user data")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(plain))
    _computes_with_one_warning(rf"{plain}\S*: (Not a directory|File exists)\)")
    assert plain.read_text() == "user data"


def test_cache_dir_in_a_symlink_loop_computes_in_memory(tmp_path, monkeypatch):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "a"))
    _computes_with_one_warning(rf"{tmp_path / 'a'}\S*: (Too many levels of symbolic links|File exists)\)")


@pytest.mark.parametrize("name", ["locks", KERNELS])
def test_a_file_where_a_cache_folder_belongs_computes_in_memory(tmp_path, name):
    root = tmp_path / "cache"
    root.mkdir()
    (root / name).write_text("junk")
    _computes_with_one_warning(rf"{root / name}\S*: (Not a directory|File exists)\)")
    [status] = cache.scan()
    assert status.path == root / name and status.problem.startswith("corrupt: ")
    assert cache.clear() == 1 and not (root / name).exists()
    _attend(dense(), n=32)  # writable again: this one is cached
    assert [s.kind for s in cache.scan()] == [KERNELS]


def test_tuning_record_that_cannot_be_written_warns_and_is_kept_for_the_process(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "write_atomic", _enospc)
    with pytest.warns(UserWarning, match=UNWRITABLE + r"\S+: No space left on device\)"):
        entry = cache.put_record(TUNING, {"grid": [16]}, {"block_m": 64})
    assert not entry.path.exists()
    assert cache.get_record(TUNING, {"grid": [16]}) == {"block_m": 64}


def test_a_bundle_import_into_an_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    cache.put_record(TUNING, {"grid": [8]}, {"block_m": 32})
    from attncc.runtime.cache_bundle import export_bundle, import_bundle

    bundle = tmp_path / "b.tar.gz"
    export_bundle(bundle)
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(bundle))  # a file
    monkeypatch.setattr(cache, "_memo", {})
    with pytest.raises(CacheError, match=rf"the cache cannot be written \({bundle}\S*: "):
        import_bundle(bundle)


def _run(*args: str):
    return CliRunner().invoke(cli, ["cache", *args])


def _entry(n: int) -> cache.Entry:
    return cache.build_entry(
        cache.make_key("test", {"n": n}), lambda f: cache.write_atomic(f / "a.txt", b"a")
    )


def _junk(root: Path) -> dict[str, Path]:
    """One intact entry and, beside it, each kind of junk a cache can hold."""
    good = _entry(1)
    kind = root / "test"
    junk = {
        "file entry": kind / ("1" * 64),
        "symlinked entry": kind / ("2" * 64),
        "looped entry": kind / ("3" * 64),
        "manifest folder": kind / ("4" * 64),
        "file kind": root / "tuning",
    }
    junk["file entry"].write_text("junk")
    junk["symlinked entry"].symlink_to(good.path)
    junk["looped entry"].symlink_to(junk["looped entry"])
    (junk["manifest folder"] / cache.MANIFEST).mkdir(parents=True)
    twin = _entry(2)
    (twin.path / "a.txt").unlink()
    (twin.path / "a.txt").symlink_to(good.path / "a.txt")  # the same bytes, through a link
    junk["symlinked file"] = twin.path
    junk["file kind"].write_text("junk")
    return {"good": good.path, **junk}


def test_ls_info_and_clear_survive_junk_and_report_it(tmp_path):
    root = tmp_path / "cache"
    paths = _junk(root)
    cache._memo.clear()
    problems = {s.path: s.problem for s in cache.scan()}
    assert set(problems) == set(paths.values())
    assert problems.pop(paths["good"]) == ""
    assert problems[paths["file entry"]] == "corrupt: it is a file, not a folder"
    assert problems[paths["symlinked entry"]].startswith("corrupt: it is a symbolic link")
    assert problems[paths["looped entry"]].startswith("corrupt: it is a symbolic link")
    assert problems[paths["manifest folder"]] == f"corrupt: {cache.MANIFEST} is not a plain file"
    assert problems[paths["symlinked file"]] == "corrupt: a.txt is not a plain file"
    assert problems[paths["file kind"]] == "corrupt: a file where a folder of tuning entries belongs"
    result = _run("ls")
    assert result.exit_code == 0, result.output
    assert result.output.count("corrupt: ") == 6 and result.output.count(" ok ") == 1
    result = _run("info", "1111")
    assert result.exit_code == 0 and "corrupt: it is a file, not a folder" in result.output
    result = _run("clear", "--stale")
    assert result.exit_code == 0 and result.output.startswith("removed 6 entries")
    assert sorted(p.name for p in root.iterdir()) == ["locks", "test"]
    assert [s.path for s in cache.scan()] == [paths["good"]]
    assert (paths["good"] / "a.txt").read_bytes() == b"a"  # the links pointed here: only links went


def test_an_unlistable_kind_folder_is_reported_and_ls_goes_on(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    _entry(1)
    locked = root / "tuning"
    locked.mkdir()
    real = os.scandir

    def scandir(path="."):
        if Path(path) == locked:  # what chmod 0o000 does to anyone but root
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    problems = {s.path: s.problem for s in cache.scan()}
    assert problems[locked] == "corrupt: it cannot be listed (Permission denied)"
    assert _run("ls").exit_code == 0


@pytest.mark.parametrize("junk", ["file", "loop"])
def test_ls_on_a_cache_dir_that_is_not_a_folder_says_so(tmp_path, monkeypatch, junk):
    where = tmp_path / "cache"
    if junk == "file":
        where.write_text("user data")
    else:
        where.symlink_to(where)
    result = _run("ls")
    assert isinstance(result.exception, CacheError), result.output
    assert str(result.exception).startswith(f"the cache directory {where} cannot be listed (")
    assert isinstance(_run("clear").exception, CacheError)
    assert where.is_symlink() or where.read_text() == "user data"  # nothing of the user's removed


def test_unreadable_entry_is_reported(tmp_path, monkeypatch):
    entry = _entry(3)
    cache._memo.clear()
    if _is_root():  # chmod does not stop root: make the read fail as chmod 0o000 would
        real = Path.read_bytes

        def read_bytes(self):
            if self.parent == entry.path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    else:
        entry.path.chmod(0)
    try:
        [status] = cache.scan()
        assert status.problem == "corrupt: it cannot be read (Permission denied)"
        assert "cannot be read" in _run("ls").output
    finally:
        entry.path.chmod(stat.S_IRWXU)

"""attncc.runtime.cache: keys, concurrency, corruption, versions, the in-process memo, and kernels through it."""

import builtins
import hashlib
import importlib.util
import inspect
import io
import json
import linecache
import marshal
import os
import stat
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

import attncc
from attncc.errors import CacheError
from attncc.ir import Grid, dense
from attncc.lower.render import KERNELS, MODULE
from attncc.reference import attention as reference
from attncc.runtime import cache
from attncc.runtime.library import forget_kernels


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test gets an empty cache root and an empty memo."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(root))
    monkeypatch.setattr(cache, "_memo", {})
    monkeypatch.setattr(cache, "_records", {})
    return root


def _builder(calls: list, text: str = "payload"):
    def build(folder):
        calls.append(folder)
        (folder / "data.txt").write_text(text)

    return build


def _forget(monkeypatch):
    """What a new process sees: no memo."""
    monkeypatch.setattr(cache, "_memo", {})
    monkeypatch.setattr(cache, "_records", {})


def test_key_is_canonical_and_covers_the_toolchain():
    a = cache.make_key("test", {"grid": (4, 4), "dtype": "float16", "nested": {"b": 1, "a": 2}})
    b = cache.make_key("test", {"nested": {"a": 2, "b": 1}, "dtype": "float16", "grid": [4, 4]})
    assert a.digest == b.digest and len(a.digest) == 64
    assert cache.make_key("test", {"grid": (4, 5)}).digest != cache.make_key("test", {"grid": (4, 4)}).digest
    assert cache.make_key("other", {"grid": (4, 4)}).digest != cache.make_key("test", {"grid": (4, 4)}).digest
    names = dict(a.versions)
    assert set(names) == {"attncc", "templates", "torch", "triton"}
    assert names["torch"] == torch.__version__ and names["attncc"] == attncc.__version__


@pytest.mark.parametrize(
    "kind,parts,message",
    [
        ("Bad Kind", {}, "kind = 'Bad Kind'"),
        ("locks", {}, "kind = 'locks'"),
        ("test", [1, 2], "key parts = [1, 2]"),
        ("test", {"x": object}, "key parts"),
        ("test", {"x": float("nan")}, "finite float"),
    ],
    ids=["kind-spaces", "kind-reserved", "parts-not-dict", "parts-not-json", "parts-nan"],
)
def test_bad_key_names_the_field(kind, parts, message):
    with pytest.raises(CacheError, match="out of range") as e:
        cache.make_key(kind, parts)
    assert message in str(e.value)


def test_build_once_then_found_on_disk_by_a_new_process(own_cache, monkeypatch):
    calls = []
    key = cache.make_key("test", {"n": 1})
    entry = cache.build_entry(key, _builder(calls), label="one")
    assert len(calls) == 1 and entry.path == own_cache / "test" / key.digest
    assert entry.file("data.txt").read_text() == "payload" and entry.label == "one"
    manifest = json.loads(entry.file(cache.MANIFEST).read_text())
    assert manifest["parts"] == {"n": 1} and manifest["files"]["data.txt"]["size"] == 7
    assert not list((own_cache / "test").glob(".build-*"))  # the temporary folder was renamed
    _forget(monkeypatch)
    again = cache.build_entry(cache.make_key("test", {"n": 1}), _builder(calls))
    assert len(calls) == 1 and again.path == entry.path and again.created == entry.created


def test_second_lookup_in_a_process_touches_no_file(monkeypatch):
    key = cache.make_key("test", {"n": 2})
    cache.build_entry(key, _builder([]))
    cache.put_record("test", {"n": 3}, {"best": [64, 64]})
    _forget(monkeypatch)
    first = cache.lookup(key)  # the first lookups read the disk and fill the memo
    assert first is not None and cache.get_record("test", {"n": 3}) == {"best": [64, 64]}
    touched = []

    def spy(name, real):
        def call(*args, **kwargs):
            touched.append(name)
            return real(*args, **kwargs)

        return call

    disk = [(builtins, "open"), (io, "open"), (os, "open"), (os, "stat"), (os, "scandir"), (os, "listdir")]
    with monkeypatch.context() as m:
        for module, name in disk:
            m.setattr(module, name, spy(name, getattr(module, name)))
        found = cache.build_entry(cache.make_key("test", {"n": 2}), _builder([]))
        record = cache.get_record("test", {"n": 3})
    assert touched == []
    assert found is first and record == {"best": [64, 64]}


def test_records_round_trip_and_replace(monkeypatch):
    assert cache.get_record("tuning", {"pattern": "dense()"}) is None
    cache.put_record("tuning", {"pattern": "dense()"}, {"config": {"block_m": 64}, "us": 12.5})
    cache.put_record("tuning", {"pattern": "dense()"}, {"config": {"block_m": 128}, "us": 9.0})
    _forget(monkeypatch)
    assert cache.get_record("tuning", {"pattern": "dense()"}) == {"config": {"block_m": 128}, "us": 9.0}
    assert len(cache.scan()) == 1
    with pytest.raises(CacheError, match="record = "):
        cache.put_record("tuning", {"pattern": "dense()"}, {"us": float("inf")})


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_corrupt_entry_warns_and_is_rebuilt(monkeypatch, damage):
    calls = []
    key = cache.make_key("test", {"n": 4})
    entry = cache.build_entry(key, _builder(calls, "x" * 100))
    path = entry.file("data.txt")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[10] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "delete":
        path.unlink()
    else:
        entry.file(cache.MANIFEST).write_text("{not json")
    _forget(monkeypatch)
    assert cache.scan()[0].problem.startswith("corrupt: ")
    with pytest.warns(UserWarning, match="is corrupt .*; rebuilding it"):
        rebuilt = cache.build_entry(key, _builder(calls, "x" * 100))
    assert len(calls) == 2 and rebuilt.file("data.txt").read_text() == "x" * 100
    assert [s.problem for s in cache.scan()] == [""]
    assert not [p for p in (rebuilt.path.parent).iterdir() if p.name.startswith(".")]


def test_corrupt_record_is_ignored_with_a_warning(monkeypatch):
    entry = cache.put_record("tuning", {"n": 5}, {"us": 1.0})
    entry.file(cache.RECORD).write_text('{"us": 0.1}')  # edited by hand: fails its checksum
    _forget(monkeypatch)
    with pytest.warns(UserWarning, match="is corrupt .*; ignoring it"):
        assert cache.get_record("tuning", {"n": 5}) is None


def test_a_record_that_is_not_json_text_is_ignored_with_a_warning(monkeypatch):
    """As a bundle can bring it: the manifest agrees with the bytes, which are not UTF-8."""
    entry = cache.put_record("tuning", {"n": 16}, {"us": 1.0})
    bad = b"\xff\xfe{}"
    entry.file(cache.RECORD).write_bytes(bad)
    manifest = json.loads(entry.file(cache.MANIFEST).read_text())
    manifest["files"][cache.RECORD] = {"size": len(bad), "sha256": hashlib.sha256(bad).hexdigest()}
    entry.file(cache.MANIFEST).write_text(json.dumps(manifest))
    _forget(monkeypatch)
    for _ in range(2):  # every call, not only the first
        with pytest.warns(UserWarning, match=r"is corrupt \(record.json is not JSON text: 'utf-8' codec"):
            assert cache.get_record("tuning", {"n": 16}) is None


def test_entry_of_another_version_is_never_used(monkeypatch):
    calls = []
    parts = {"n": 6}
    old = cache.build_entry(cache.make_key("test", parts), _builder(calls))
    newer = tuple((k, "9.9" if k == "torch" else v) for k, v in cache.versions())
    monkeypatch.setattr(cache, "versions", lambda: newer)
    _forget(monkeypatch)
    key = cache.make_key("test", parts)
    assert key.digest != old.digest and cache.lookup(key) is None
    new = cache.build_entry(key, _builder(calls))
    assert len(calls) == 2 and new.versions["torch"] == "9.9"
    problems = {s.digest: s.problem for s in cache.scan()}
    assert problems[new.digest] == "" and problems[old.digest] == f"stale: made by torch {torch.__version__}"
    assert cache.clear(stale_only=True) == 1
    assert [s.digest for s in cache.scan()] == [new.digest]


def test_manifest_claiming_another_version_under_this_key_is_refused(monkeypatch):
    calls = []
    key = cache.make_key("test", {"n": 7})
    entry = cache.build_entry(key, _builder(calls))
    manifest = json.loads(entry.file(cache.MANIFEST).read_text())
    manifest["versions"]["triton"] = "0.0"  # checksums still match; the key no longer does
    entry.file(cache.MANIFEST).write_text(json.dumps(manifest))
    _forget(monkeypatch)
    with pytest.warns(UserWarning, match="digest of the manifest's key parts"):
        cache.build_entry(key, _builder(calls))
    assert len(calls) == 2


def test_entry_copied_under_another_key_is_refused(own_cache, monkeypatch):
    a = cache.build_entry(cache.make_key("test", {"n": 8}), _builder([], "eight"))
    b_key = cache.make_key("test", {"n": 9})
    (own_cache / "test" / b_key.digest).mkdir()
    for p in a.path.iterdir():
        (own_cache / "test" / b_key.digest / p.name).write_bytes(p.read_bytes())
    _forget(monkeypatch)
    calls = []
    with pytest.warns(UserWarning, match="not where it lies"):
        b = cache.build_entry(b_key, _builder(calls, "nine"))
    assert len(calls) == 1 and b.file("data.txt").read_text() == "nine"


def test_key_that_binds_its_files_refuses_other_content(monkeypatch):
    code = b"KERNEL = 1\n"
    key = cache.make_key("test", {"sha256": {"k.py": hashlib.sha256(code).hexdigest()}})
    entry = cache.build_entry(key, lambda folder: (folder / "k.py").write_bytes(code))
    other = b"import os\n"  # swapped in with a manifest that matches it: checksums pass, the key does not
    entry.file("k.py").write_bytes(other)
    manifest = json.loads(entry.file(cache.MANIFEST).read_text())
    manifest["files"]["k.py"] = {"size": len(other), "sha256": hashlib.sha256(other).hexdigest()}
    entry.file(cache.MANIFEST).write_text(json.dumps(manifest))
    _forget(monkeypatch)
    with pytest.warns(UserWarning, match="not the ones its key parts name by sha256"):
        rebuilt = cache.build_entry(key, lambda folder: (folder / "k.py").write_bytes(code))
    assert rebuilt.file("k.py").read_bytes() == code
    wrong = cache.make_key("test", {"sha256": {"k.py": "0" * 64}})
    with pytest.raises(CacheError, match=r"built files = \['k\.py'\]"):
        cache.build_entry(wrong, lambda folder: (folder / "k.py").write_bytes(code))


def test_failed_build_leaves_nothing_and_raises(own_cache):
    key = cache.make_key("test", {"n": 10})

    def broken(folder):
        (folder / "half.txt").write_text("half")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        cache.build_entry(key, broken)
    assert cache.lookup(key) is None and list((own_cache / "test").iterdir()) == []
    with pytest.raises(CacheError, match="built file = 'sub'"):
        cache.build_entry(key, lambda folder: (folder / "sub").mkdir())


def test_find_and_clear(own_cache):
    a = cache.build_entry(cache.make_key("test", {"n": 11}), _builder([]))
    cache.put_record("tuning", {"n": 11}, {"us": 2.0})
    assert cache.find(a.digest[:8]).entry.path == a.path
    with pytest.raises(CacheError, match="KEY = 'zz'"):
        cache.find("zz")
    with pytest.raises(CacheError, match="no such entry"):
        cache.find("0000000")
    assert cache.clear() == 2 and cache.scan() == []
    assert cache.lookup(cache.make_key("test", {"n": 11})) is None  # the memo forgot it too


_RACE = """
import os, pathlib, sys, time
from attncc.runtime import cache

ready, go, log = (pathlib.Path(p) for p in sys.argv[1:4])
(ready / str(os.getpid())).touch()
while not go.exists():
    time.sleep(0.005)

def build(folder):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(0.5)  # a slow build: the others must wait for it, not build too
    (folder / "data.txt").write_text("built by " + str(os.getpid()))

entry = cache.build_entry(cache.make_key("race", {"n": 1}), build)
print(entry.digest, entry.file("data.txt").read_text())
"""


def test_processes_asking_at_once_build_once(tmp_path, own_cache):
    """Several real processes released together ask for one key: one build, one answer."""
    n = 4
    ready, go, log = tmp_path / "ready", tmp_path / "go", tmp_path / "builds.log"
    ready.mkdir()
    env = {**os.environ, "ATTNCC_CACHE_DIR": str(own_cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE, str(ready), str(go), str(log)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    deadline = time.monotonic() + 240
    while len(list(ready.iterdir())) < n and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert len(log.read_text().splitlines()) == 1
    assert len({out for out, _ in results}) == 1


@pytest.fixture
def fresh_kernels():
    """load() and the op memoise per process: start and end with them empty, so the kernel is built here."""
    forget_kernels()
    yield
    forget_kernels()


def _dense16():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g) for _ in range(3))
    out = attncc.attention(q, k, v, dense(), grid=Grid((16,)))
    torch.testing.assert_close(out, reference(q, k, v, dense(), grid=Grid((16,))), atol=1e-5, rtol=1e-5)


def test_attention_runs_through_the_kernel_cache(fresh_kernels, own_cache, monkeypatch):
    _dense16()
    [status] = cache.scan()
    assert status.kind == KERNELS and status.problem == "" and status.path.parent == own_cache / KERNELS
    assert set(status.entry.files) == {MODULE} and status.entry.parts["backend"] == "triton"
    assert status.entry.parts["sha256"] == {MODULE: status.entry.files[MODULE]["sha256"]}
    assert status.entry.parts["plan"]["dtype"] == "float32"
    assert (
        "float32" in status.entry.label and "grid 16 q " in status.entry.label
    )  # the user's rank, not the plan's 1x1x16
    # Damaged on disk, the kernel is rebuilt with a warning the next time a process loads it.
    status.entry.file(MODULE).write_text("raise SystemExit('corrupted kernel')\n")
    forget_kernels()
    _forget(monkeypatch)
    with pytest.warns(UserWarning, match="corrupt"):
        _dense16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.scan()[0].problem == ""


@pytest.mark.gpu
def test_kernel_entry_on_a_gpu_names_its_capability(fresh_kernels):
    """On a GPU the kernel's key holds the device capability, and the cached module runs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    out = attncc.attention(q, k, v, dense())
    expected = reference(q.float(), k.float(), v.float(), dense())
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    [status] = cache.scan()
    major, minor = torch.cuda.get_device_capability()
    assert status.entry.parts["device"] == f"sm_{major}{minor}" == cache.device_capability()
    assert "bfloat16" in status.entry.label and status.problem == ""


def _dense16_plan():
    from attncc.lower.lowering import LaunchConfig, lower

    return lower(dense(), Grid((16,)), 16, "float32", config=LaunchConfig.default("cpu", 16, "float32"))


def test_kernel_runs_the_bytes_it_checked_not_a_file_swapped_after(fresh_kernels, monkeypatch):
    real = cache.build_entry

    def swap_after_the_check(key, build, label=""):
        entry = real(key, build, label)
        if key.kind == KERNELS:  # swapped between the checksum and the import
            entry.file(MODULE).write_text("raise RuntimeError('unchecked code ran')\n")
        return entry

    monkeypatch.setattr(cache, "build_entry", swap_after_the_check)
    _dense16()


def test_triton_reads_the_checked_source_and_no_bytecode_is_written(fresh_kernels):
    from attncc.lower.render import load, render

    plan = _dense16_plan()
    module = load(plan)
    [status] = cache.scan()
    assert sorted(p.name for p in status.path.iterdir()) == [MODULE, cache.MANIFEST]  # no __pycache__
    assert module.__file__ == str(status.entry.file(MODULE))
    status.entry.file(MODULE).write_text("# swapped\n")
    linecache.checkcache()  # what inspect does before it reads a function's source
    assert "".join(linecache.getlines(module.__file__)) == render(plan)
    assert inspect.getsource(module.attention_fwd_kernel.fn) in render(plan)  # what Triton compiles


def test_kernels_still_run_after_another_process_clears_the_cache(fresh_kernels, own_cache):
    """The documented recipe: `attncc cache clear` (another process: this one's memo is stale)
    then ``forget_kernels()``; the kernel runs from the bytes it checked, not from the file."""
    _dense16()
    result = subprocess.run(
        [sys.executable, "-m", "attncc", "cache", "clear"],
        cwd=own_cache.parent,  # not the repository root: its ./attncc would shadow the install
        env={**os.environ, "ATTNCC_CACHE_DIR": str(own_cache)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.startswith("removed 1 entry"), result.stderr
    forget_kernels()
    _dense16()


def _plant_bytecode(source, text):
    """A .pyc of ``text`` where Python's import looks for ``source``'s, stamped to match its file."""
    stat = source.stat()
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little")
    header += (int(stat.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + stat.st_size.to_bytes(4, "little")
    pyc = source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc"
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(header + marshal.dumps(compile(text, str(source), "exec")))


def test_bytecode_planted_in_a_kernel_entry_never_runs(fresh_kernels, monkeypatch):
    _dense16()
    [status] = cache.scan()
    _plant_bytecode(status.entry.file(MODULE), "raise RuntimeError('planted bytecode ran')\n")
    forget_kernels()
    _forget(monkeypatch)
    [status] = cache.scan()
    assert status.problem == "corrupt: it holds __pycache__, which its manifest does not list"
    with pytest.warns(UserWarning, match="holds __pycache__.*; rebuilding it"):
        _dense16()
    [status] = cache.scan()
    assert status.problem == "" and not (status.path / "__pycache__").exists()


def test_a_file_the_manifest_does_not_list_makes_the_entry_corrupt(monkeypatch):
    calls = []
    key = cache.make_key("test", {"n": 12})
    entry = cache.build_entry(key, _builder(calls))
    (entry.path / "extra.txt").write_text("planted")
    _forget(monkeypatch)
    assert cache.scan()[0].problem == "corrupt: it holds extra.txt, which its manifest does not list"
    with pytest.warns(UserWarning, match=r"holds extra.txt, which its manifest does not list\); rebuilding"):
        rebuilt = cache.build_entry(key, _builder(calls))
    assert len(calls) == 2 and sorted(p.name for p in rebuilt.path.iterdir()) == ["data.txt", cache.MANIFEST]


def test_a_manifest_that_is_a_folder_is_corrupt_and_clear_removes_it(own_cache, monkeypatch):
    entry = cache.build_entry(cache.make_key("test", {"n": 15}), _builder([]))
    entry.file(cache.MANIFEST).unlink()
    entry.file(cache.MANIFEST).mkdir()
    _forget(monkeypatch)
    assert [s.problem for s in cache.scan()] == [f"corrupt: {cache.MANIFEST} is not a plain file"]
    assert cache.clear() == 1 and cache.scan() == [] and not entry.path.exists()


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_entries_follow_the_umask(umask_027):
    entry = cache.build_entry(cache.make_key("test", {"n": 13}), _builder([]))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [entry.path, *entry.path.iterdir()]}
    assert modes == {entry.path.name: 0o750, "data.txt": 0o640, cache.MANIFEST: 0o640}


_STOPPED_HOLDER = """
import os, signal
from attncc.runtime import cache

def build(folder):
    os.kill(os.getpid(), signal.SIGSTOP)  # stopped while it holds the key's lock

cache.build_entry(cache.make_key("test", {"n": "held"}), build)
"""


def test_a_stopped_lock_holder_makes_others_give_up_naming_it(own_cache, monkeypatch):
    env = {**os.environ, "ATTNCC_CACHE_DIR": str(own_cache)}
    holder = subprocess.Popen(
        [sys.executable, "-c", _STOPPED_HOLDER], cwd=own_cache.parent, env=env, stderr=subprocess.PIPE
    )  # not from the repository root, whose ./attncc would shadow the installed package
    try:
        _, status = os.waitpid(holder.pid, os.WUNTRACED)  # returns once it is stopped
        assert os.WIFSTOPPED(status), holder.stderr.read()
        monkeypatch.setenv("ATTNCC_LOCK_TIMEOUT", "0.5")
        key = cache.make_key("test", {"n": "held"})
        outcome = []

        def wait():
            try:
                cache.build_entry(key, _builder([]))
            except CacheError as e:
                outcome.append(e)

        waiter = threading.Thread(target=wait, daemon=True)
        start = time.monotonic()
        waiter.start()
        waiter.join(60)
        assert not waiter.is_alive(), "still waiting for the lock after 60 s"
        assert time.monotonic() - start < 30
        [error] = outcome
        message = str(error)
        lock = own_cache / "locks" / f"{key.digest}.lock"
        assert message.startswith(f"cache lock {lock} is still held after waiting 0.5 s")
        assert f"probably by process {holder.pid} on host " in message and "kill -CONT" in message
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_a_bad_lock_timeout_names_the_setting(monkeypatch, value):
    monkeypatch.setenv("ATTNCC_LOCK_TIMEOUT", value)
    with pytest.raises(CacheError, match=rf"ATTNCC_LOCK_TIMEOUT = '{value}' is out of range; allowed: a fin"):
        cache.build_entry(cache.make_key("test", {"n": 14}), _builder([]))

"""attncc.runtime.cache: a content-addressed, process-safe store for kernels and records.

Layout: ``<root>/<kind>/<digest>/`` holds an entry's files and ``manifest.json``
(kind, key parts, versions, each file's size and sha256, a label, the time it
was made); lock files live in ``<root>/locks/``. The root is
``ATTNCC_CACHE_DIR``, else the platform cache directory.

Note [Cache keys]: the digest is a sha256 over canonical JSON of the kind, the
caller's key parts (canonical pattern text or the kernel plan, grid, shapes,
dtypes, device, backend, ...) and the toolchain: the attncc, torch and triton
versions and a hash of the template files. An entry made by another toolchain
has another digest, so it is never found; a manifest is also checked against
its directory's digest, so an entry edited or copied to the wrong place is
never used either. A key may bind its files' contents with a part ``sha256``
(file name -> hash), as the kernel module's key does: then files that hash
otherwise make the entry corrupt, so no bundle can bring other code in under a
key that attncc looks up.

Note [Cache writes]: a builder writes into a fresh temporary directory beside
the entries, the manifest last, and the directory is then renamed into place:
a reader sees no entry or a whole one. A file lock per key makes concurrent
builders of one key (threads or processes) build it once: look, lock, look
again, build. An entry whose files fail their checksums is reported with a
warning and rebuilt under the lock.

Note [Cache memo]: a lookup that succeeds is remembered per (root, digest), so
a second lookup of a key in one process touches no file. The memo does not see
what other processes do later; ``clear`` forgets the root it clears.

Note [Only listed files]: an entry holds its manifest and the files the manifest
lists, nothing else. A file it does not list (a ``__pycache__`` that Python's
import machinery would prefer to ``kernel.py``, anything planted) makes the
entry corrupt: ``scan`` reports it and a lookup rebuilds the entry. Nothing
attncc runs comes from an unlisted file: kernel modules are compiled from the
bytes that were checked (Note [Verified code] in ``attncc.lower.render``).

Note [Cache locks]: a builder waits for a key's lock at most
``ATTNCC_LOCK_TIMEOUT`` seconds. The holder writes its pid, host and start
time beside the lock (``<digest>.holder``; the lock file itself is filelock's,
which may truncate it on open), so a waiter that gives up can say which
process may hold it: one that is stopped, hung, or on another host sharing
the directory.

Note [Cache faults]: the cache is an optimisation, never a condition of
computing. When it cannot be written (a read-only or full disk, a cache dir
that is a file or a symlink loop, a file where ``locks`` or a kind's folder
belongs) a build raises :class:`Unwritable`, a :class:`CacheError` naming the
path and the OS error, never a raw ``OSError``; the callers that compute
degrade instead: a Triton kernel runs from its rendered bytes in memory, a
CUTLASS build goes to a private temporary folder (:func:`build_private`), a
tuning record is kept for the process only. :func:`uncached` warns once per
process and cache root, saying why; ``attncc cache import`` fails with the
error. A lookup that cannot reach an entry (an ancestor is a file or a loop)
is a miss without a warning: the write that follows says why. ``scan`` reports
junk where entries or kind folders belong (files, symbolic links, folders it
cannot list) as corrupt rows that ``clear`` removes, and refuses, naming it, a
root that is not a folder; it never follows a link or touches other names.

Note [File modes]: every file attncc writes (entries, bundles, compiled
packages) goes to a temporary name and is renamed into place; the temporary
file is created with mode 0o666 (directories 0o777) and the kernel takes the
umask off, as for any file a program creates. ``tempfile`` would make them
0o600 (0o700), unreadable to the group a shared cache or package is for, and
reading the umask to chmod afterwards would mean setting it, which is not
thread-safe.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import importlib.resources
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import filelock

from attncc import settings
from attncc.errors import CacheError, field_error, form_error
from attncc.memo import Bounded
from attncc.runtime.progress import log

MANIFEST = "manifest.json"
RECORD = "record.json"
FORMAT = 1
_KIND = re.compile(r"[a-z][a-z0-9_-]{0,39}\Z")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}\Z")
_DIGEST = re.compile(r"[0-9a-f]{64}\Z")
_NOT_KINDS = ("locks", "failed")  # the lock files, and the sources nvcc rejected
_STALE_TEMP_S = 3600.0  # a hidden build or trash folder this old was left by a crashed process


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write that replaces ``path`` whole when the block ends without an error.

    Its mode is 0o666 less the umask (Note [File modes]); on an error nothing is left behind.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as f:
        f.write(data)


def root() -> Path:
    """``ATTNCC_CACHE_DIR``, else the platform cache directory (read on every call, so tests can move it)."""
    chosen = settings.cache_dir()
    if chosen is not None:
        return chosen
    import platformdirs  # only when needed: the lent GPU machines lack it

    return Path(platformdirs.user_cache_dir("attncc"))


@functools.cache  # one value per process (unbounded memo of no arguments)
def template_version() -> str:
    """A hash of every template file's name and text: a template edit changes every key."""
    h = hashlib.sha256()
    for name, data in sorted(_templates(importlib.resources.files("attncc.templates"), "")):
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()[:16]


def _templates(folder, prefix: str) -> Iterator[tuple[str, bytes]]:
    for item in folder.iterdir():
        if item.is_dir():
            yield from _templates(item, f"{prefix}{item.name}/")
        elif item.name.endswith(".j2"):
            yield prefix + item.name, item.read_bytes()


@functools.cache  # one value per process (unbounded memo of no arguments)
def versions() -> tuple[tuple[str, str], ...]:
    """The toolchain every key includes: attncc, templates, torch, triton."""
    import torch
    import triton

    from attncc import __version__

    return (
        ("attncc", __version__),
        ("templates", template_version()),
        ("torch", torch.__version__),
        ("triton", triton.__version__),
    )


def device_capability() -> str:
    """``sm_90`` style for the current CUDA device, ``cpu`` when there is none."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def _canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def digest_of(kind: str, parts: object, versions: Mapping[str, str]) -> str:
    """The digest of a key given as plain JSON data (Note [Cache keys])."""
    text = _canonical({"kind": kind, "parts": parts, "versions": dict(versions)})
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Key:
    """A cache key: ``kind`` names the entry's folder; ``parts`` is the caller's canonical JSON."""

    kind: str
    parts: str
    versions: tuple[tuple[str, str], ...]
    digest: str


def make_key(kind: str, parts: Mapping[str, object]) -> Key:
    """The key of ``parts`` (JSON values) under the current toolchain."""
    if not isinstance(kind, str) or not _KIND.match(kind) or kind in _NOT_KINDS:
        allowed = "1-40 of a-z, 0-9, '_', '-', starting with a letter; not 'locks' or 'failed'"
        raise field_error(CacheError, "kind", kind, allowed)
    if not isinstance(parts, Mapping):
        raise field_error(CacheError, "key parts", parts, "a dict of JSON values")
    try:
        text = _canonical(parts)
    except (TypeError, ValueError) as e:
        allowed = "a dict of JSON values (str, int, finite float, bool, None, lists, dicts)"
        raise field_error(CacheError, "key parts", parts, allowed, str(e)) from None
    toolchain = versions()
    return Key(kind, text, toolchain, digest_of(kind, json.loads(text), dict(toolchain)))


@dataclass(frozen=True, eq=False)
class Entry:
    """A verified entry: its folder and what its manifest says."""

    path: Path
    kind: str
    digest: str
    parts: dict
    versions: dict[str, str]
    files: dict[str, dict]  # name -> {"size": int, "sha256": str}
    label: str
    created: float

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())


class Corrupt(Exception):
    """An entry fails a check; the message says which."""


class Unwritable(CacheError):
    """The cache cannot be written (Note [Cache faults]): ``path`` and the OS error say why."""

    def __init__(self, error: OSError) -> None:
        self.root = root()
        where = error.filename if error.filename is not None else self.root
        super().__init__(
            f"the cache cannot be written ({where}: {error.strerror or error}); attncc computes without it. "
            f"To cache kernels, make {self.root} a writable folder or set ATTNCC_CACHE_DIR to one"
        )


_warned: set[str] = set()


def uncached(error: Unwritable) -> None:
    """Warn, once per process and cache root, that ``error`` keeps this process from caching."""
    if str(error.root) not in _warned:
        _warned.add(str(error.root))
        warnings.warn(f"attncc: {error}", stacklevel=3)


def check_entry(
    kind: str,
    digest: str,
    manifest: bytes,
    read: Callable[[str], bytes],
    present: Collection[str] | None = None,
) -> tuple[dict, dict[str, bytes]]:
    """Check an entry's manifest against its place and its files against the manifest.

    ``read(name)`` returns a file's bytes (``FileNotFoundError`` if missing);
    ``present``, if given, names everything in the entry's folder, which may
    hold only the manifest and the files it lists (Note [Only listed files]).
    Returns the manifest and the files' contents; raises :class:`Corrupt`.
    Shared by lookups and by bundle import, so both trust exactly the same things.
    """
    try:
        m = json.loads(manifest)
        if m["format"] != FORMAT:
            raise Corrupt(f"manifest format {m['format']!r}, this attncc reads {FORMAT}")
        if m["kind"] != kind or m["digest"] != digest:
            raise Corrupt(f"manifest names {m['kind']}/{m['digest'][:16]}, not where it lies")
        if digest_of(m["kind"], m["parts"], m["versions"]) != digest:
            raise Corrupt("the digest of the manifest's key parts and versions is not the entry's key")
        files = m["files"]
        unlisted = sorted(set(present or ()) - set(files) - {MANIFEST})
        if unlisted:
            raise Corrupt(f"it holds {', '.join(unlisted)}, which its manifest does not list")
        contents = {}
        for name, meta in files.items():
            if not _NAME.match(name) or name == MANIFEST:
                raise Corrupt(f"file name {name!r} is not allowed")
            try:
                data = read(name)
            except FileNotFoundError:
                raise Corrupt(f"file {name} is missing") from None
            except OSError as e:
                raise Corrupt(f"file {name} is unreadable ({e})") from None
            if len(data) != meta["size"]:
                raise Corrupt(f"file {name} is {len(data)} bytes, its manifest says {meta['size']}")
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise Corrupt(f"file {name} fails its sha256 checksum")
            contents[name] = data
        if _bound(m["parts"]) not in (None, {name: meta["sha256"] for name, meta in files.items()}):
            raise Corrupt("its files are not the ones its key parts name by sha256")
        if not isinstance(m["created"], (int, float)) or not isinstance(m["label"], str):
            raise Corrupt("manifest has a bad created time or label")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise Corrupt(f"malformed manifest ({type(e).__name__}: {e})") from None
    return m, contents


def _bound(parts: object) -> object:
    """The file hashes a key binds, if any (Note [Cache keys])."""
    return parts.get("sha256") if isinstance(parts, dict) else None


def read_entry(path: Path, kind: str, digest: str) -> tuple[Entry, dict[str, bytes]]:
    """Read and check the entry at ``path``: the entry and the bytes checked, manifest included.

    Raises ``OSError`` if nothing is there (``FileNotFoundError``: no entry, or no manifest in
    its folder; another: a folder above it is a file or a loop), :class:`Corrupt` if a check
    fails or it cannot be read: a symbolic link, a file, anything in it but plain files.
    """
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        raise Corrupt(f"it is a symbolic link (to {os.readlink(path)}), which the cache never makes")
    if not stat.S_ISDIR(mode):
        raise Corrupt("it is a file, not a folder")
    try:
        with os.scandir(path) as items:
            plain = {item.name: item.is_file(follow_symlinks=False) for item in items}
        if MANIFEST in plain and not plain[MANIFEST]:
            raise Corrupt(f"{MANIFEST} is not a plain file")
        manifest = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise Corrupt(f"it cannot be read ({e.strerror or e})") from None

    def read(name: str) -> bytes:
        if name in plain and not plain[name]:
            raise Corrupt(f"{name} is not a plain file")
        return (path / name).read_bytes()

    m, contents = check_entry(kind, digest, manifest, read, plain)
    entry = Entry(path, kind, digest, m["parts"], m["versions"], m["files"], m["label"], m["created"])
    return entry, {**contents, MANIFEST: manifest}


_memo: Bounded = Bounded()  # (root, digest) -> Entry (Note [Cache memo])
_records: Bounded = Bounded()  # (root, digest) -> a record's text


def _find(key: Key, on_corrupt: str) -> tuple[Entry, dict[str, bytes]] | None:
    """The checked entry of ``key`` on disk, or None; a corrupt one is warned about, saying ``on_corrupt``."""
    path = root() / key.kind / key.digest
    try:
        return read_entry(path, key.kind, key.digest)
    except OSError:  # no entry, or none reachable: the write that follows says why (Note [Cache faults])
        return None
    except Corrupt as e:
        if on_corrupt:
            warnings.warn(f"attncc: cache entry {path} is corrupt ({e}); {on_corrupt}", stacklevel=3)
        return None


def lookup(key: Key, on_corrupt: str = "ignoring it") -> Entry | None:
    """The entry of ``key`` if one is stored and intact (Note [Cache memo]).

    A corrupt one is warned about; ``on_corrupt`` says what the caller does next.
    """
    memo = (str(root()), key.digest)
    if memo in _memo:
        return _memo[memo]
    found = _find(key, on_corrupt)
    if found is None:
        log.debug("cache miss: %s %s", key.kind, key.digest[:16])
        return None
    log.debug("cache hit: %s %s (%s)", key.kind, key.digest[:16], found[0].label)
    _memo[memo] = found[0]
    return found[0]


def forget(base: Path | None = None) -> None:
    """Drop what this process remembers of ``base`` (default: every root); the disk is untouched."""
    for memo in [m for m in _memo if base is None or m[0] == str(base)]:
        _memo.pop(memo)
        _records.pop(memo, None)


@contextlib.contextmanager
def _locked(key: Key) -> Iterator[None]:
    """Hold ``key``'s lock, waiting at most ``ATTNCC_LOCK_TIMEOUT`` seconds (Note [Cache locks])."""
    locks = root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    path, holder = locks / f"{key.digest}.lock", locks / f"{key.digest}.holder"
    timeout = settings.lock_timeout()
    lock = filelock.FileLock(path, timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise CacheError(
            f"cache lock {path} is still held after waiting {timeout:g} s, {_holder(holder)}; "
            "if that process is stopped (kill -CONT it) or hung (end it), the next try goes on; "
            "ATTNCC_LOCK_TIMEOUT sets how long to wait for a build that is just slow"
        ) from None
    try:
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        write_atomic(holder, f"{os.getpid()} {socket.gethostname()} {when}".encode())
        yield
    finally:
        lock.release()


def _holder(path: Path) -> str:
    """Who wrote ``path`` when taking the lock beside it, as words."""
    try:
        pid, host, when = path.read_text().split(" ", 2)
    except (OSError, UnicodeDecodeError, ValueError):
        return "by a process that left no note of itself"
    return f"probably by process {pid} on host {host} (it took the lock at {when})"


def build_entry(key: Key, build: Callable[[Path], None], label: str = "") -> Entry:
    """The entry of ``key``; if missing or corrupt, ``build(folder)`` writes its files into ``folder``.

    Processes that ask for one key at once build it once (Note [Cache writes]). Raises
    :class:`Unwritable` if the cache cannot be written (Note [Cache faults]).
    """
    entry = lookup(key, on_corrupt="rebuilding it")
    if entry is not None:
        return entry
    try:
        with _locked(key):
            found = _find(key, on_corrupt="")  # built by another process while we waited?
            if found:
                log.info("cache: %s %s (%s) was built by another process", key.kind, key.digest[:16], label)
                entry = found[0]
            else:
                start = time.perf_counter()
                entry = _install(key, build, label, time.time(), root())
                took = time.perf_counter() - start
                log.info("cache: built %s %s (%s) in %.2f s", key.kind, key.digest[:16], label, took)
    except OSError as e:
        raise Unwritable(e) from None
    _memo[(str(root()), key.digest)] = entry
    return entry


_private: dict[str, Entry] = {}


def build_private(key: Key, build: Callable[[Path], None], label: str = "") -> Entry:
    """The entry of ``key`` built once per process into a private temporary folder (mode 0o700,
    removed at exit): for builders that need a folder when the cache cannot be written
    (Note [Cache faults]). Raises :class:`CacheError` if that cannot be written either."""
    if key.digest not in _private:
        try:
            base = Path(tempfile.mkdtemp(prefix="attncc-uncached-"))
            atexit.register(shutil.rmtree, base, ignore_errors=True)
            _private[key.digest] = _install(key, build, label, time.time(), base)
        except OSError as e:
            where = e.filename if e.filename is not None else tempfile.gettempdir()
            raise CacheError(
                f"{label or key.kind} cannot be built in a private temporary folder either "
                f"({where}: {e.strerror or e}): free space there or set TMPDIR to a writable folder"
            ) from None
    return _private[key.digest]


def install(key: Key, build: Callable[[Path], None], label: str, created: float) -> Entry:
    """Write the entry of ``key`` whether or not one is stored (an import, a new record), under its
    lock. Raises :class:`Unwritable` if the cache cannot be written."""
    try:
        with _locked(key):
            entry = _install(key, build, label, created, root())
    except OSError as e:
        raise Unwritable(e) from None
    _memo[(str(root()), key.digest)] = entry
    return entry


def _install(key: Key, build: Callable[[Path], None], label: str, created: float, base: Path) -> Entry:
    """Build into a temporary folder, write the manifest last, rename into ``base``. Hold the key's lock."""
    kind_dir = base / key.kind
    kind_dir.mkdir(parents=True, exist_ok=True)
    tmp = kind_dir / f".build-{key.digest[:16]}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # mode 0o777 less the umask (Note [File modes])
    try:
        build(tmp)
        files = {}
        for p in sorted(tmp.iterdir()):
            if not p.is_file() or not _NAME.match(p.name) or p.name == MANIFEST:
                allowed = "plain files named with A-Z, a-z, 0-9, '_', '.', '-' (not manifest.json)"
                raise field_error(CacheError, "built file", p.name, allowed)
            data = p.read_bytes()
            files[p.name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        bound = _bound(json.loads(key.parts))
        if bound not in (None, {name: meta["sha256"] for name, meta in files.items()}):
            raise field_error(CacheError, "built files", sorted(files), "the files its key binds by sha256")
        manifest = {
            "format": FORMAT,
            "kind": key.kind,
            "digest": key.digest,
            "parts": json.loads(key.parts),
            "versions": dict(key.versions),
            "files": files,
            "label": label,
            "created": created,
        }
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        final = kind_dir / key.digest
        _remove(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Entry(final, key.kind, key.digest, manifest["parts"], dict(key.versions), files, label, created)


def _remove(path: Path) -> None:
    """Rename aside, then delete: readers see the whole entry or none, never half of one."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:  # junk: a file or a link (never followed)
        trash.unlink()


def put_record(kind: str, parts: Mapping[str, object], obj: object, label: str = "") -> Entry:
    """Store ``obj`` (JSON data) as the record of ``parts``, replacing an older one.

    If the cache cannot be written, warns (once) and keeps the record for this process only:
    the entry returned names where it would be (Note [Cache faults]).
    """
    key = make_key(kind, parts)
    try:
        text = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        allowed = "JSON values (str, int, finite float, bool, None, lists, dicts)"
        raise field_error(CacheError, "record", obj, allowed, str(e)) from None
    try:
        entry = install(key, lambda folder: write_atomic(folder / RECORD, text.encode()), label, time.time())
    except Unwritable as e:
        uncached(e)
        files = {RECORD: {"size": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()}}
        path, parts = root() / kind / key.digest, json.loads(key.parts)
        entry = Entry(path, kind, key.digest, parts, dict(key.versions), files, label, time.time())
        _memo[(str(root()), key.digest)] = entry
    _records[(str(root()), key.digest)] = text
    return entry


def get_record(kind: str, parts: Mapping[str, object]) -> object | None:
    """The record of ``parts`` stored by :func:`put_record` under this toolchain, or None."""
    key = make_key(kind, parts)
    memo = (str(root()), key.digest)
    if memo not in _records:
        found = _find(key, on_corrupt="ignoring it")
        if found is None or RECORD not in found[1]:
            return None
        try:  # checksums hold for what a bundle brought, so the text is checked too
            text = found[1][RECORD].decode()
            json.loads(text)
        except ValueError as e:  # not UTF-8, or not JSON
            where, why = found[0].path, f"{RECORD} is not JSON text: {e}"
            warnings.warn(f"attncc: cache entry {where} is corrupt ({why}); ignoring it", stacklevel=2)
            return None
        _memo[memo], _records[memo] = found[0], text
    return json.loads(_records[memo])


@dataclass(frozen=True)
class Status:
    """An entry folder as ``scan`` found it: ``problem`` is empty, ``stale: ...`` or ``corrupt: ...``."""

    path: Path
    kind: str
    digest: str
    entry: Entry | None
    problem: str


def scan() -> list[Status]:
    """Every entry folder under the root, checked, in kind then creation order; junk where an entry
    or a kind's folder belongs is a corrupt row (Note [Cache faults]). Raises :class:`CacheError`
    if the root is there but is not a folder that can be listed."""
    base = root()
    try:
        kinds = _listing(base)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CacheError(
            f"the cache directory {base} cannot be listed ({e.strerror or e}): "
            "set ATTNCC_CACHE_DIR to a folder, or move what is there aside"
        ) from None
    current = dict(versions())
    found = []
    for name, mode in kinds:
        kind_dir = base / name
        if not _KIND.match(name):
            continue
        what = {"locks": "lock files", "failed": "failed sources"}.get(name, f"{name} entries")
        junk = _junk(kind_dir, mode, f"a folder of {what}")
        if junk:
            found.append(Status(kind_dir, name, "", None, junk))
        if junk or name in _NOT_KINDS:
            continue
        try:
            paths = [kind_dir / child for child, _ in _listing(kind_dir)]
        except OSError as e:
            unlisted = f"corrupt: it cannot be listed ({e.strerror or e})"
            found.append(Status(kind_dir, name, "", None, unlisted))
            continue
        for path in paths:
            if not _DIGEST.match(path.name):
                continue
            entry, problem = None, ""
            try:
                entry = read_entry(path, name, path.name)[0]
            except FileNotFoundError:
                problem = "corrupt: no manifest"
            except OSError as e:
                problem = f"corrupt: it cannot be read ({e.strerror or e})"
            except Corrupt as e:
                problem = f"corrupt: {e}"
            if entry is not None and entry.versions != current:
                changed = [f"{k} {v}" for k, v in sorted(entry.versions.items()) if current.get(k) != v]
                problem = "stale: made by " + ", ".join(changed)
            found.append(Status(path, name, path.name, entry, problem))
    return sorted(found, key=lambda s: (s.kind, s.entry.created if s.entry else 0.0, s.digest))


def _listing(folder: Path) -> list[tuple[str, int]]:
    """The names in ``folder`` and their modes (links not followed), sorted by name."""
    with os.scandir(folder) as items:
        return sorted((item.name, item.stat(follow_symlinks=False).st_mode) for item in items)


def _junk(path: Path, mode: int, belongs: str) -> str:
    """Why ``path`` (of ``mode``, links not followed) is not ``belongs``, or ''."""
    if stat.S_ISLNK(mode):
        return f"corrupt: a symbolic link where {belongs} belongs, which the cache never makes"
    return "" if stat.S_ISDIR(mode) else f"corrupt: a file where {belongs} belongs"


def find(prefix: str) -> Status:
    """The one entry whose digest starts with ``prefix`` (at least 4 hex digits)."""
    expected = "a key (or a unique prefix of 4+ hex digits) that `attncc cache ls` lists"
    if not re.fullmatch(r"[0-9a-f]{4,64}", prefix):
        raise form_error(CacheError, "KEY", prefix, expected)
    matches = [s for s in scan() if s.digest.startswith(prefix)]
    if len(matches) != 1:
        why = "no such entry" if not matches else f"{len(matches)} entries match"
        raise form_error(CacheError, "KEY", prefix, expected, why)
    return matches[0]


def clear(stale_only: bool = False) -> int:
    """Remove every entry (or only stale and corrupt ones); returns how many. Forgets the root's memo."""
    removed = 0
    for status in scan():
        if stale_only and not status.problem:
            continue
        _remove(status.path)
        removed += 1
    base = root()
    forget(base)
    if not stale_only:
        for leftover in [*base.glob("*/.build-*"), *base.glob("*/.trash-*")]:
            with contextlib.suppress(OSError):  # gone already, or unreadable: left for the next clear
                if time.time() - leftover.lstat().st_mtime > _STALE_TEMP_S:
                    shutil.rmtree(leftover, ignore_errors=True)
    return removed

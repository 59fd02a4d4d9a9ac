"""Cache bundles: export entries as one file; import one only after checking every entry.

A bundle is a gzip'd tar holding ``bundle.json`` (format, the exporting
toolchain, the entries) and each entry as ``<kind>/<digest>/<file>`` with its
manifest, so a machine with no tuning budget or no network can use kernels and
tuning records made elsewhere. Import reads members into memory rather than
extracting, so no name in a bundle can reach outside the cache; it checks each
entry as a lookup would (:func:`attncc.runtime.cache.check_entry`: manifest in place,
key recomputed from its parts and versions, file checksums, bound contents),
refuses entries of another toolchain (they would never be used), and installs
nothing unless every entry passes. Checks catch damage and careless edits; a
record whose manifest was rewritten to match is accepted, so import bundles
from sources you trust.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from pathlib import Path

from attncc.errors import CacheError, field_error
from attncc.runtime import cache

BUNDLE = "bundle.json"
FORMAT = 1
MAX_BYTES = 1 << 30  # a bundle's unpacked size; kernels and records are far smaller
_MEMBER = re.compile(r"([a-z][a-z0-9_-]{0,39})/([0-9a-f]{64})/([A-Za-z0-9_][A-Za-z0-9_.-]{0,99})\Z")


def export_bundle(dest: str | Path, kinds: tuple[str, ...] = ()) -> list[cache.Entry]:
    """Write every intact entry of this toolchain (of ``kinds``, if given) to ``dest``; returns them."""
    chosen = [s for s in cache.scan() if not s.problem and (not kinds or s.kind in kinds)]
    if not chosen:
        which = f" of kind {', '.join(kinds)}" if kinds else ""
        raise field_error(CacheError, "entries to export", 0, "at least 1", f"no intact entry{which}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with cache.atomic_file(dest) as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        header = {
            "format": FORMAT,
            "versions": dict(cache.versions()),
            "created": time.time(),
            "entries": [f"{s.kind}/{s.digest}" for s in chosen],
        }
        _add(tar, BUNDLE, json.dumps(header, indent=1).encode(), header["created"])
        for s in chosen:
            # The bytes just checked, not a second read that could differ.
            entry, contents = cache.read_entry(s.path, s.kind, s.digest)
            for name, data in sorted(contents.items()):
                _add(tar, f"{s.kind}/{s.digest}/{name}", data, entry.created)
    return [s.entry for s in chosen if s.entry is not None]


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tar.addfile(info, io.BytesIO(data))


def import_bundle(src: str | Path) -> tuple[int, int]:
    """Check every entry of the bundle at ``src``, then install them; returns (installed, already here)."""
    src = Path(src)
    members = _read(src)
    entries = _check(src, members)
    installed = 0
    for kind, digest, manifest, contents in entries:
        key = cache.make_key(kind, manifest["parts"])
        assert key.digest == digest  # checked: same parts, same versions
        if cache.lookup(key, on_corrupt="replacing it with the bundle's") is not None:
            continue

        def write(folder: Path, contents: dict[str, bytes] = contents) -> None:
            for name, data in contents.items():
                (folder / name).write_bytes(data)

        cache.install(key, write, manifest["label"], manifest["created"])
        installed += 1
    return installed, len(entries) - installed


def _refuse(src: Path, field: str, value: object, allowed: str, why: str = "") -> CacheError:
    reason = f"{why}; nothing was imported" if why else "nothing was imported"
    return field_error(CacheError, f"bundle {src.name}: {field}", value, allowed, reason)


def _read(src: Path) -> dict[str, bytes]:
    """Every regular file of the bundle by name; anything else in it is refused."""
    members: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(src, mode="r:gz") as tar:
            for info in tar:
                if not info.isfile() or (info.name != BUNDLE and not _MEMBER.match(info.name)):
                    allowed = f"{BUNDLE} and plain files named <kind>/<64 hex digest>/<file>"
                    raise _refuse(src, "member", info.name, allowed)
                total += info.size
                if total > MAX_BYTES or info.name in members:
                    raise _refuse(src, "member", info.name, f"each once, {MAX_BYTES >> 20} MiB in all")
                f = tar.extractfile(info)
                assert f is not None  # a regular file
                members[info.name] = f.read()
    except (OSError, tarfile.TarError, EOFError) as e:
        raise _refuse(src, "file", str(src), "a bundle written by `attncc cache export`") from e
    return members


def _check(src: Path, members: dict[str, bytes]) -> list[tuple[str, str, dict, dict[str, bytes]]]:
    """The bundle's entries as (kind, digest, manifest, files), each checked; raises on the first problem."""
    try:
        header = json.loads(members[BUNDLE])
        listed, fmt = header["entries"], header["format"]
    except (KeyError, ValueError, TypeError) as e:
        raise _refuse(src, BUNDLE, repr(e), "present, with format and entries") from None
    if fmt != FORMAT:
        raise _refuse(src, "format", fmt, str(FORMAT))
    folders: dict[str, dict[str, bytes]] = {}
    for name, data in members.items():
        if name != BUNDLE:
            folder, _, file = name.rpartition("/")
            folders.setdefault(folder, {})[file] = data
    if not isinstance(listed, list) or sorted(listed) != sorted(folders):
        raise _refuse(src, "entries", sorted(folders), f"the entries {BUNDLE} lists")
    current = dict(cache.versions())
    checked = []
    for folder, files in sorted(folders.items()):
        kind, digest = folder.split("/")
        if cache.MANIFEST not in files:
            raise _refuse(src, f"entry {folder}", sorted(files), f"files with a {cache.MANIFEST}")
        manifest_bytes = files.pop(cache.MANIFEST)

        def read(name: str, files: dict[str, bytes] = files) -> bytes:
            if name not in files:
                raise FileNotFoundError(name)
            return files[name]

        try:
            manifest, contents = cache.check_entry(kind, digest, manifest_bytes, read)
        except cache.Corrupt as e:
            raise CacheError(
                f"bundle {src.name}: entry {kind}/{digest[:16]}: {e}; "
                "the bundle is tampered or damaged, nothing was imported"
            ) from None
        if set(contents) != set(files):
            raise _refuse(src, f"entry {folder} files", sorted(files), "the files its manifest lists")
        if manifest["versions"] != current:
            made = ", ".join(f"{k} {v}" for k, v in sorted(manifest["versions"].items()))
            now = ", ".join(f"{k} {v}" for k, v in sorted(current.items()))
            why = "made by another toolchain, it would never be used here"
            raise _refuse(src, f"entry {folder} versions", made, f"this machine's: {now}", why)
        checked.append((kind, digest, manifest, contents))
    return checked

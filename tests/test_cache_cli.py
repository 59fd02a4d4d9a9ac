"""`attncc cache ls | info | clear | export | import`, and bundles that must be refused."""

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile

import pytest
from click.testing import CliRunner

from attncc.cli import cli
from attncc.errors import CacheError
from attncc.runtime import cache
from attncc.runtime.cache_bundle import BUNDLE, export_bundle, import_bundle

CODE = b"KERNEL = 'tuned'\n"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Each test starts on an empty cache root of its own, with an empty memo."""
    root = tmp_path / "home"
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(root))
    monkeypatch.setattr(cache, "_memo", {})
    monkeypatch.setattr(cache, "_records", {})
    return root


def _move_to(monkeypatch, root):
    """Another machine: another root, nothing remembered."""
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(root))
    monkeypatch.setattr(cache, "_memo", {})
    monkeypatch.setattr(cache, "_records", {})


def _fill():
    """A kernel-like entry that binds its file, and a tuning record."""
    key = cache.make_key("kernels", {"plan": "p1", "sha256": {"kernel.py": hashlib.sha256(CODE).hexdigest()}})
    kernel = cache.build_entry(
        key, lambda folder: (folder / "kernel.py").write_bytes(CODE), label="na2d bf16"
    )
    record = cache.put_record(
        "tuning", {"pattern": "dense()", "grid": [16]}, {"block_m": 64}, label="dense 16"
    )
    return kernel, record


def _run(*args):
    result = CliRunner().invoke(cli, ["cache", *args])
    return result


def test_ls_info_clear(home):
    assert "no entries in" in _run("ls").output
    kernel, record = _fill()
    out = _run("ls").output
    assert kernel.digest[:16] in out and record.digest[:16] in out
    assert "na2d bf16" in out and "dense 16" in out and out.count(" ok ") == 2
    out = _run("ls", "--kind", "tuning").output
    assert record.digest[:16] in out and kernel.digest[:16] not in out
    out = _run("info", record.digest[:10]).output
    assert record.digest in out and '"pattern": "dense()"' in out and "file record.json" in out
    assert "version torch" in out
    result = _run("info", "ffffffffff")
    assert isinstance(result.exception, CacheError) and "no such entry" in str(result.exception)
    message = str(_run("info", "zzz").exception)  # not a hex prefix: no range to be out of
    assert (
        message.startswith("KEY = 'zzz' is not a key (or a unique prefix") and "out of range" not in message
    )
    assert _run("clear", "--stale").output.startswith("removed 0 entries")
    assert _run("clear").output.startswith("removed 2 entries")
    assert cache.scan() == []


def test_export_import_round_trip(tmp_path, monkeypatch):
    kernel, _ = _fill()
    bundle = tmp_path / "out" / "tuned.tar.gz"
    result = _run("export", str(bundle))
    assert result.exit_code == 0 and "exported 2 entries" in result.output
    _move_to(monkeypatch, tmp_path / "elsewhere")
    result = _run("import", str(bundle))
    assert result.exit_code == 0 and "imported 2 entries (0 already present)" in result.output
    assert cache.get_record("tuning", {"grid": [16], "pattern": "dense()"}) == {"block_m": 64}
    [here] = [s for s in cache.scan() if s.kind == "kernels"]
    assert here.digest == kernel.digest and here.entry.file("kernel.py").read_bytes() == CODE
    assert here.entry.label == kernel.label and here.entry.created == kernel.created
    assert "imported 0 entries (2 already present)" in _run("import", str(bundle)).output
    assert import_bundle(bundle) == (0, 2)


def test_import_replaces_a_corrupt_local_entry(tmp_path, monkeypatch):
    kernel, _ = _fill()
    bundle = tmp_path / "tuned.tar.gz"
    export_bundle(bundle)
    kernel.file("kernel.py").write_bytes(b"damaged")
    cache.forget()
    with pytest.warns(UserWarning, match="is corrupt .*; replacing it with the bundle's"):
        assert import_bundle(bundle) == (1, 1)
    assert [s.problem for s in cache.scan()] == ["", ""]
    assert kernel.file("kernel.py").read_bytes() == CODE


def test_export_by_kind_and_nothing_to_export(tmp_path):
    with pytest.raises(CacheError, match="entries to export = 0"):
        export_bundle(tmp_path / "empty.tar.gz")
    _fill()
    assert [e.kind for e in export_bundle(tmp_path / "k.tar.gz", ("kernels",))] == ["kernels"]


def _rewrite(src, dest, change=lambda name, data: data, extra=()):
    """Copy a bundle, passing each member through ``change`` (None drops it), then add ``extra`` members."""
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dest, "w:gz") as tout:
        members = [(i.name, tin.extractfile(i).read()) for i in tin]
        for name, data in [*members, *extra]:
            data = change(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))


def _edit_manifest(kind, edit):
    def change(name, data):
        if name.startswith(f"{kind}/") and name.endswith("/manifest.json"):
            m = json.loads(data)
            edit(m)
            return json.dumps(m).encode()
        return data

    return change


def _swap_kernel(name, data):
    """Replace the kernel and make its manifest agree: checksums pass, the key's binding does not."""
    evil = b"import os\n"
    if name.endswith("/kernel.py"):
        return evil
    if name.startswith("kernels/") and name.endswith("/manifest.json"):
        m = json.loads(data)
        m["files"]["kernel.py"] = {"size": len(evil), "sha256": hashlib.sha256(evil).hexdigest()}
        return json.dumps(m).encode()
    return data


def _other_torch(m):
    m["versions"]["torch"] = "1.0"


TAMPER = [
    (
        "flipped-byte",
        dict(change=lambda n, d: d.replace(b"tuned", b"tunex") if n.endswith("kernel.py") else d),
        "kernel.py fails its sha256 checksum",
    ),
    (
        "truncated-record",
        dict(change=lambda n, d: d[:3] if n.endswith("record.json") else d),
        "record.json is 3 bytes, its manifest says",
    ),
    (
        "edited-parts",
        dict(change=_edit_manifest("tuning", lambda m: m["parts"].update(grid=[32]))),
        "digest of the manifest's key parts",
    ),
    ("swapped-kernel", dict(change=_swap_kernel), "not the ones its key parts name by sha256"),
    (
        "other-version",
        dict(change=_edit_manifest("tuning", _other_torch)),
        "digest of the manifest's key parts",
    ),
    (
        "missing-file",
        dict(change=lambda n, d: None if n.endswith("kernel.py") else d),
        "kernel.py is missing",
    ),
    (
        "extra-file",
        dict(change=lambda n, d: d, extra=[("tuning/" + "a" * 64 + "/x.py", b"")]),
        "the entries bundle.json lists",
    ),
    ("path-escape", dict(extra=[("../evil.py", b"import os\n")]), "member = '../evil.py'"),
    ("no-header", dict(change=lambda n, d: None if n == BUNDLE else d), "bundle.json = "),
]


@pytest.mark.parametrize("how,message", [(c[1], c[2]) for c in TAMPER], ids=[c[0] for c in TAMPER])
def test_tampered_bundle_is_refused_and_nothing_installed(tmp_path, monkeypatch, how, message):
    _fill()
    good, bad = tmp_path / "good.tar.gz", tmp_path / "bad.tar.gz"
    export_bundle(good)
    _rewrite(good, bad, **how)
    _move_to(monkeypatch, tmp_path / "elsewhere")
    with pytest.raises(CacheError, match="nothing was imported") as e:
        import_bundle(bad)
    assert message in str(e.value)
    assert cache.scan() == []


def test_file_smuggled_into_an_entry_is_refused(tmp_path, monkeypatch):
    kernel, _ = _fill()
    good, bad = tmp_path / "good.tar.gz", tmp_path / "bad.tar.gz"
    export_bundle(good)
    _rewrite(good, bad, extra=[(f"kernels/{kernel.digest}/extra.py", b"import os\n")])
    _move_to(monkeypatch, tmp_path / "elsewhere")
    with pytest.raises(
        CacheError, match=r"files = \['extra.py', 'kernel.py'\] .*the files its manifest lists"
    ):
        import_bundle(bad)
    assert cache.scan() == []


def test_bundle_of_another_version_is_refused(tmp_path, monkeypatch):
    """Consistent, but made by another torch: it would never be used, so it is not installed."""
    _fill()
    bundle = tmp_path / "old.tar.gz"
    older = tuple((k, "1.0" if k == "torch" else v) for k, v in cache.versions())
    with monkeypatch.context() as m:
        m.setattr(cache, "versions", lambda: older)
        cache.put_record("tuning", {"pattern": "causal()"}, {"block_m": 32})
        export_bundle(bundle, ("tuning",))
    _move_to(monkeypatch, tmp_path / "elsewhere")
    with pytest.raises(
        CacheError,
        match=r"versions = 'attncc .*torch 1\.0.*never be used here; nothing was imported.*this machine's: ",
    ):
        import_bundle(bundle)
    assert cache.scan() == []


def test_not_a_bundle(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar at all")
    with pytest.raises(CacheError, match="a bundle written by `attncc cache export`"):
        import_bundle(junk)


def test_installed_cli_has_the_cache_group(tmp_path, home):
    """The real entry point: registered command, and one error line with status 2 for a bad bundle."""
    _fill()
    env_run = dict(capture_output=True, text=True, timeout=120, cwd=tmp_path)
    ok = subprocess.run([sys.executable, "-m", "attncc", "cache", "ls"], **env_run)
    assert ok.returncode == 0 and "na2d bf16" in ok.stdout, ok.stderr
    (tmp_path / "junk.tar.gz").write_bytes(b"junk")
    bad = subprocess.run([sys.executable, "-m", "attncc", "cache", "import", "junk.tar.gz"], **env_run)
    assert bad.returncode == 2 and bad.stderr.startswith("attncc: error: bundle junk.tar.gz: file")


def test_ls_reports_a_file_the_manifest_does_not_list(home):
    kernel, _ = _fill()
    planted = kernel.path / "__pycache__"
    planted.mkdir()
    (planted / f"kernel.{sys.implementation.cache_tag}.pyc").write_bytes(b"planted")
    out = _run("ls").output
    assert out.count(" ok ") == 1 and "corrupt: it holds __pycache__" in out
    out = _run("info", kernel.digest[:10]).output
    assert "corrupt: it holds __pycache__, which its manifest does not list" in out


def test_export_follows_the_umask(tmp_path):
    _fill()
    bundle = tmp_path / "shared.tar.gz"
    old = os.umask(0o027)
    try:
        export_bundle(bundle)
    finally:
        os.umask(old)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name != "home"] == [bundle.name]  # no temporary left

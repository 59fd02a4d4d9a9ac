"""Bad input is bounded and refused, never a hang or an overwrite (issue 21): spec files with YAML
aliases, analyses too large to run, `attncc tune` with a huge head count, `attncc compile -o` into
a directory that holds files or under a name that shadows a module, and the modes of what it writes."""

import contextlib
import os
import re
import signal
import stat
import time

import pytest
from click.testing import CliRunner

from attncc.cli import cli
from attncc.errors import PatternError, SpecError, TuneError
from attncc.ir import Grid, analyze, causal, load_spec, neighborhood, parse


@contextlib.contextmanager
def _within_seconds(seconds: float):
    """Fail instead of hanging: the alarm interrupts a call that runs past ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- spec files -------------------------------------------------------------------------

_ALIASES = {
    "grid-as-name": ("grid: &g [8]\npattern: causal()\nname: *g\n", 1, "&g"),
    "pattern": ("grid: [8]\npattern:\n  union: [&p {causal: {}}, *p]\n", 3, "&p"),
    "bomb": (
        "grid: [8]\npattern: causal()\ndescription:\n"
        "  - &a [x, x, x, x, x, x, x, x, x]\n"
        "  - &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "  - &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
        "name: *c\n",
        4,
        "&a",
    ),
}


@pytest.mark.parametrize("text,line,what", list(_ALIASES.values()), ids=list(_ALIASES))
def test_spec_with_a_yaml_alias_is_refused_naming_the_line(tmp_path, text, line, what):
    path = tmp_path / "aliased.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value) == (
        f"spec file {str(path)!r}, line {line}: YAML anchors and aliases ({what}) are not allowed "
        "in a spec file (an alias can stand for an enormous value); write the value out"
    )


def test_spec_without_aliases_still_loads(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text("grid: [8]\npattern:\n  union: [{causal: {}}, {causal: {}}]\nname: '&not an anchor'\n")
    spec = load_spec(path)
    assert spec.grid == Grid((8,)) and spec.name == "&not an anchor"


_BAD_FILES = {
    "grid-null": (
        b"pattern: causal()\ngrid: null\n",
        r"\S+: grid = None is out of range; allowed: a list of 1 to 3",
    ),
    "not-utf8": (
        b"pattern: causal()\ngrid: [8]\nname: \xff\n",
        r"spec file '\S+' is not UTF-8 text \(byte 34: ",
    ),
    "int-of-5000-digits": (
        b"pattern: causal()\ngrid: [" + b"9" * 5000 + b"]\n",
        r"spec file '\S+' is not valid yaml: Exceeds the limit \(4300 digits\)",
    ),
}


@pytest.mark.parametrize("data,message", list(_BAD_FILES.values()), ids=list(_BAD_FILES))
def test_a_malformed_spec_file_is_a_spec_error(tmp_path, data, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert re.match(message, str(e.value)), str(e.value)


# --- analysis limits ----------------------------------------------------------------------

_TOO_LARGE = {
    # A flat tiling of 10^10 tokens: 78 million tiles a side, cut into boxes one by one.
    "grid-1e5x1e5": (neighborhood((31, 31)), (100_000, 100_000), 128, "Q tiles = 78125000"),
    # 10^9 tokens: a tile map of 6 * 10^13 entries (444 TiB).
    "grid-1e9": (causal(), (1_000_000_000,), 128, "Q tiles = 7812500"),
    # Ten tiles a side, but 10^12 coordinates to count keys for.
    "axis-1e12": (causal(), (10**12,), 10**11, "key counts to evaluate on one axis = 11000000000000"),
    # No per-axis closed form: 10^10 query-key pairs, one by one.
    "rows-1e5": (
        parse("(sliding_window(left=1023) | global_tokens(indices=[0, 1, 2, 3])) & causal()"),
        (100_000,),
        4096,
        "query-key pairs to evaluate = 10000000000",
    ),
}


@pytest.mark.parametrize("pattern,grid,tile,what", list(_TOO_LARGE.values()), ids=list(_TOO_LARGE))
def test_analysis_too_large_is_refused_at_once_naming_the_limit(pattern, grid, tile, what):
    start = time.perf_counter()
    with _within_seconds(30), pytest.raises(PatternError) as e:
        analyze(pattern, Grid(grid), tile, tile)
    assert time.perf_counter() - start < 2.0
    assert re.fullmatch(rf"{what} is out of range \(.+\); allowed: at most [\d,]+", str(e.value)), str(
        e.value
    )


def test_cli_analyze_of_a_huge_grid_is_one_error(tmp_path):
    spec = tmp_path / "huge.yaml"
    spec.write_text("pattern: neighborhood(window=(31, 31))\ngrid: [100000, 100000]\n")
    with _within_seconds(60):
        result = CliRunner().invoke(cli, ["analyze", str(spec)])
    assert isinstance(result.exception, PatternError)
    assert str(result.exception).startswith("Q tiles = 78125000 is out of range (grid 100000x100000 in tiles")


# --- attncc tune ----------------------------------------------------------------------------


def test_tune_with_a_huge_head_count_is_refused_at_once(tmp_path):
    spec = tmp_path / "t16.yaml"
    spec.write_text("pattern: causal()\ngrid: [16]\nhead_dim: 16\ndtype: float32\n")
    with _within_seconds(60):
        result = CliRunner().invoke(cli, ["tune", str(spec), "--shape", "1,100000000,16", "--no-save"])
    assert isinstance(result.exception, TuneError), result.output
    assert re.fullmatch(
        r"tuning inputs = '[\d,.]+ GiB' is out of range \(2 sets of q, k, v, out and lse for "
        r"B x H x N x D = 1 x 100000000 x 16 x 16 in float32\); allowed: at most [\d,.]+ GiB "
        r"\(half the memory of (cpu|cuda)\)",
        str(result.exception),
    ), str(result.exception)


# --- attncc compile -o --------------------------------------------------------------------

_SPEC = "pattern: neighborhood(window=3)\ngrid: [8]\nhead_dim: 16\ndtype: float32\n"


def _compile(tmp_path, out, *extra):
    spec = tmp_path / "small.yaml"
    spec.write_text(_SPEC)
    return CliRunner().invoke(cli, ["compile", str(spec), "-o", str(out), "--device", "cpu", *extra])


def test_compile_writes_over_a_directory_that_holds_files_only_with_force(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "__init__.py").write_text("KEEP = 1\n")
    result = _compile(tmp_path, out)
    assert isinstance(result.exception, SpecError)
    assert str(result.exception) == (
        f"-o = '{out}' is out of range (it holds __init__.py); "
        "allowed: a new or empty directory, or --force to write over what it holds"
    )
    assert sorted(p.name for p in out.iterdir()) == ["__init__.py"]
    assert (out / "__init__.py").read_text() == "KEEP = 1\n"
    result = _compile(tmp_path, out, "--force")
    assert result.exit_code == 0, result.output
    assert "def forward" in (out / "__init__.py").read_text()
    assert _compile(tmp_path, out).exit_code != 0  # its own package too: written over only with --force


_SHADOWING = {
    "torch": "it would shadow the module torch",
    "math": "it would shadow the module math",
    "triton": "it would shadow the module triton",
    "attncc": "it would shadow the module attncc",
    "json": "it would shadow the module json",  # any stdlib module
    "numpy": "numpy is importable already, from ",  # any importable one
    "ﬁle": "Python would import it as 'file'",  # NFKC folds the ligature
    "café": "",  # an identifier, but not ASCII
    "class": "",  # a keyword
}


@pytest.mark.parametrize("name,why", list(_SHADOWING.items()), ids=[ascii(n) for n in _SHADOWING])
def test_compile_refuses_a_name_that_shadows_a_module_or_is_not_ascii(tmp_path, name, why):
    out = tmp_path / name
    result = _compile(tmp_path, out)
    assert isinstance(result.exception, SpecError), result.output
    reason = rf" \({re.escape(why)}.*\)" if why else ""
    allowed = "a directory named as an ASCII Python identifier that no importable module has"
    assert re.fullmatch(
        rf"-o = '{re.escape(str(out))}' is out of range{reason}; allowed: {allowed}", str(result.exception)
    )
    assert not out.exists()


def test_compiled_files_follow_the_umask(tmp_path):
    out = tmp_path / "shared_pkg"
    old = os.umask(0o027)
    try:
        result = _compile(tmp_path, out)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes.pop("shared_pkg") == 0o750
    assert set(modes) >= {"__init__.py", "_tables.py", "_kernel0.py"} and set(modes.values()) == {0o640}

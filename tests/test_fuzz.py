"""The standing fuzz suite (issue 21): random valid and random bad input through
``attncc.attention``, ``SparseAttention``, ``parse``, spec loading and ``attncc analyze``.

Every call either returns what the reference computes (float32, atol 1e-5) or raises an
:class:`AttnccError`, and within :data:`SECONDS` (the Triton interpreter compiles each new
pattern). The ``fuzz`` profile keeps CI small and reproducible: a few dozen examples in all,
derandomized, no example database; ``--hypothesis-seed`` or a larger ``max_examples`` in a
local profile explores further.
"""

import json
import math
import time

import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import patterns

import attncc
from attncc import AttnccError, PatternError
from attncc.cli import cli
from attncc.ir import Grid, format_pattern, parse
from attncc.ir.nodes import PRIMITIVES, Pattern
from attncc.ir.spec import spec_from_data
from attncc.nn import SparseAttention
from attncc.reference import attention as reference

SECONDS = 20.0  # per call, under the interpreter
settings.register_profile(
    "fuzz",
    derandomize=True,
    database=None,
    deadline=None,  # timed by _bounded instead: a first kernel compile is slow, not a hang
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("fuzz")


def _bounded(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or the AttnccError it raised (anything else fails the test);
    either way within SECONDS."""
    start = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    except AttnccError as e:
        result = e
    took = time.perf_counter() - start
    assert took < SECONDS, f"{fn.__name__} took {took:.1f} s"
    return result


@st.composite
def small_grids(draw):
    """Grids of at most 32 tokens, of rank 1 to 3."""
    rank = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, {1: 32, 2: 6, 3: 3}[rank])) for _ in range(rank)]
    while math.prod(shape) > 32:
        shape[shape.index(max(shape))] -= 1
    return Grid(tuple(shape))


_JUNK_PATTERNS = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=12),
    st.just(attncc.ir.causal),
    st.lists(st.integers(), max_size=2),
)
_BAD_SCALES = st.sampled_from([0.0, -1.0, math.nan, math.inf, "0.5", True, 2**2000])


@settings(FUZZ, max_examples=12)
@given(data=st.data())
def test_attention_answers_like_the_reference_or_refuses(data):
    bad = data.draw(st.sampled_from([None, None, None, "kv_heads", "head_dim", "pattern", "scale"]), "bad")
    grid = data.draw(small_grids(), "grid")
    heads = data.draw(st.sampled_from([1, 2]), "heads")
    kv_heads = 0 if bad == "kv_heads" else data.draw(st.sampled_from([1, heads]), "kv_heads")
    head_dim = 0 if bad == "head_dim" else 16
    pattern = data.draw(_JUNK_PATTERNS if bad == "pattern" else patterns(grid, heads, depth=1), "pattern")
    scale = data.draw(_BAD_SCALES if bad == "scale" else st.one_of(st.none(), st.floats(0.05, 2.0)), "scale")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, grid.size, head_dim, generator=g)
    k, v = (torch.randn(1, kv_heads, grid.size, head_dim, generator=g) for _ in "kv")
    got = _bounded(attncc.attention, q, k, v, pattern, scale=scale, grid=grid, layout="sdpa")
    if not isinstance(got, AttnccError):
        want = reference(q, k, v, pattern, scale=scale, grid=grid, layout="sdpa")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    else:
        assert bad is not None or isinstance(got, PatternError), got  # a valid call may not fit only


@settings(FUZZ, max_examples=6)
@given(data=st.data())
def test_sparse_attention_answers_like_the_reference_or_refuses(data):
    grid = data.draw(small_grids(), "grid")
    heads = data.draw(st.sampled_from([1, 2, 0, 3]), "heads")
    pattern = data.draw(st.one_of(patterns(grid, max(heads, 1), depth=1), _JUNK_PATTERNS), "pattern")
    module = _bounded(SparseAttention, 32, heads, pattern, grid.shape)
    if isinstance(module, AttnccError):
        return
    x = torch.randn(2, *grid.shape, 32, generator=torch.Generator().manual_seed(1))
    got = _bounded(module, x)
    assert not isinstance(got, AttnccError), got  # a module that was built runs
    with torch.no_grad():
        q = module.q(x).unflatten(-1, (heads, module.head_dim))
        k, v = module.kv(x).unflatten(-1, (2, heads, module.head_dim)).unbind(-3)
        out = reference(q, k, v, pattern, grid=grid, layout="spatial")
        want = module.proj(out.flatten(-2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


_WORDS = [*PRIMITIVES, "per_head", "union", "intersection", "(", ")", "[", "]", ",", "=", "|", "&",
          "-", "1", "0", "7", "2**31", "None", "true", "1.5", "'x'", "window", "axis", "lo", "hi", " "]  # fmt: skip


@settings(FUZZ, max_examples=40)
@given(words=st.lists(st.sampled_from(_WORDS), max_size=16), grid=small_grids(), data=st.data())
def test_parse_returns_a_pattern_or_refuses(words, grid, data):
    for text in ("".join(words), format_pattern(data.draw(patterns(grid, 2, depth=2), "pattern"))):
        got = _bounded(parse, text)
        if not isinstance(got, AttnccError):
            assert isinstance(got, Pattern)
            assert parse(format_pattern(got)) == got


_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def spec_data(draw):
    """A spec mapping: a valid one, one with a field replaced by junk, or junk."""
    grid = draw(small_grids())
    data = {"grid": list(grid.shape), "pattern": format_pattern(draw(patterns(grid, 1, depth=1)))}
    choice = draw(st.integers(0, 2))
    if choice == 1:
        data[draw(st.sampled_from(["grid", "pattern", "heads", "head_dim", "dtype", "name", "extra"]))] = (
            draw(_VALUES)
        )
    return draw(_VALUES) if choice == 2 else data


@settings(FUZZ, max_examples=25)
@given(data=spec_data())
def test_spec_loading_returns_a_spec_or_refuses(data):
    _bounded(spec_from_data, data)


_TILES = st.sampled_from(["4", "2x2", "0", "99999999999999999999", "x", "2x2x2x2", "²", "1"])


@settings(FUZZ, max_examples=5)
@given(data=spec_data(), q_tile=_TILES)
def test_cli_analyze_prints_or_says_one_error(tmp_path_factory, data, q_tile):
    path = tmp_path_factory.mktemp("fuzz") / "spec.json"
    path.write_text(json.dumps(data, default=str))
    result = _bounded(CliRunner().invoke, cli, ["analyze", str(path), "--q-tile", q_tile])
    usage = isinstance(result.exception, SystemExit) and result.exit_code == 2  # click's own usage errors
    assert result.exception is None or usage or isinstance(result.exception, AttnccError), result.exception

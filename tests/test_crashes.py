"""Valid or plausible input that used to crash (issue 21): each case runs or is refused with an
attncc error naming the field, the value and what is allowed."""

import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import attncc
from attncc import AttnccError, PatternError
from attncc.cli import cli
from attncc.ir import (
    Grid,
    band,
    block_sparse,
    canonicalize,
    causal,
    congruent,
    format_pattern,
    parse,
    sliding_window,
    strided,
    union,
)
from attncc.ir.nodes import MAX_DEPTH, Strided
from attncc.nn import SparseAttention
from attncc.reference import attention as reference


def _qkv(shape=(1, 2, 16, 16), h_kv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = (shape[0], shape[1] if h_kv is None else h_kv, *shape[2:])
    return torch.randn(shape, generator=g), torch.randn(kv, generator=g), torch.randn(kv, generator=g)


def _agrees(pattern, grid=None, shape=(1, 2, 16, 16)):
    q, k, v = _qkv(shape)
    want = reference(q, k, v, pattern, grid=grid)
    torch.testing.assert_close(attncc.attention(q, k, v, pattern, grid=grid), want, atol=1e-5, rtol=0)


# --- block_sparse layouts -------------------------------------------------------------------


def test_a_numpy_layout_is_named_with_its_shape():
    with pytest.raises(PatternError, match=r"block_sparse.layout = '<ndarray\[2, 2\]>' is not nested lists"):
        block_sparse(np.ones((2, 2), dtype=np.int64), 8)


def test_numpy_integer_entries_are_taken_as_ints():
    layout = [[np.int64(1), np.int64(0)], [np.int32(1), np.int64(1)]]
    p = block_sparse(layout, 8)
    assert p == block_sparse([[1, 0], [1, 1]], 8)
    assert all(type(v) is int for row in p.layout for v in row)
    assert parse(format_pattern(p)) == p
    _agrees(p)


def test_a_float_layout_is_refused_naming_the_entry_and_does_not_poison_the_memo():
    with pytest.raises(
        PatternError, match=r"block_sparse.layout\[0\]\[1\] = 0.0 .*allowed: 0 or 1 \(an integer\)"
    ):
        block_sparse([[1, 0.0], [1, 1]], 8)
    with pytest.raises(PatternError, match=r"block_sparse.layout\[1\]\[0\]\[0\] = 1.0 "):
        block_sparse([[[1, 0], [1, 1]], [[1.0, 0], [1, 1]]], 8)
    # 1.0 == 1 is one dict key: a float layout that got as far as the text memo used to make
    # the equal int layout fail for the rest of the process.
    _agrees(block_sparse([[1, 0], [1, 1]], 8))


# --- wide and deep patterns -----------------------------------------------------------------


def test_a_union_of_a_thousand_terms_round_trips_and_runs():
    wide = union(*(band(0, i, i) for i in range(-500, 500)))
    text = format_pattern(wide)
    assert text.startswith("union(band(axis=0, lo=-500, hi=-500), ")  # Note [Wide combinators]
    assert parse(text) == wide
    assert parse(format_pattern(wide & causal())) == wide & causal()
    assert parse(" | ".join(format_pattern(op) for op in wide.operands)) == wide  # infix, as typed
    _agrees(wide & causal())


def test_nesting_past_the_limit_is_refused_naming_it():
    p, levels = causal(), 0
    with pytest.raises(
        PatternError, match=rf"nesting depth = {MAX_DEPTH + 1} is out of range; allowed: at most {MAX_DEPTH}"
    ):
        for levels in range(330):
            p = (p & sliding_window(levels + 1)) if levels % 2 else (p | band(0, levels, levels))
    assert levels == MAX_DEPTH and p.depth == MAX_DEPTH
    assert parse(format_pattern(p)) == p  # the deepest pattern allowed still round-trips
    _agrees(p)


# --- huge moduli ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern,grid",
    [
        (strided(2**31), (4, 4)),
        (strided(2**31, 2**31 - 3), (4, 4)),
        (strided(2**40, 5), (2, 2, 4)),
        (congruent(1, 2**31, 3), (4, 4)),
        (congruent(2, 2**31, 2**31 - 1), (2, 2, 4)),
    ],
    ids=["strided-2d", "strided-2d-offset", "strided-3d", "congruent-2d", "congruent-3d"],
)
def test_a_modulus_of_2_to_the_31_never_reaches_the_kernels(pattern, grid):
    _agrees(pattern, grid=grid)


def test_a_flat_stride_past_every_offset_keeps_one_offset():
    # On 16 tokens k - q takes 31 values: strided(2**31, 2**31 - 3) keeps k - q = 3 only.
    assert canonicalize(strided(2**31, 2**31 - 3), Grid((4, 4))) == Strided(31, 28)
    assert canonicalize(strided(31, 28), Grid((4, 4))) == Strided(31, 28)


# --- scalars and shapes -----------------------------------------------------------------------


@pytest.mark.parametrize("name,value", [("scale", "0.5"), ("scale", True), ("sigmoid_bias", "0")])
def test_a_scalar_that_is_not_a_real_number_is_refused(name, value):
    q, k, v = _qkv()
    kwargs = {name: value, "score": "sigmoid" if name == "sigmoid_bias" else "softmax"}
    with pytest.raises(AttnccError, match=rf"{name} = {value!r} is not a real number"):
        attncc.attention(q, k, v, causal(), **kwargs)


def test_a_sigmoid_bias_that_is_not_finite_is_refused():
    q, k, v = _qkv()
    with pytest.raises(AttnccError, match=r"sigmoid_bias = nan is out of range; allowed: a finite number"):
        attncc.attention(q, k, v, causal(), score="sigmoid", sigmoid_bias=math.nan)


@pytest.mark.parametrize(
    "shape,h_kv,name",
    [((1, 2, 16, 0), None, "D"), ((1, 0, 16, 16), None, "H"), ((1, 2, 16, 16), 0, "H_kv")],
    ids=["D0", "H0", "Hkv0"],
)
@pytest.mark.parametrize("fn", [attncc.attention, reference], ids=["attention", "reference"])
def test_an_empty_head_dim_or_head_count_is_refused(fn, shape, h_kv, name):
    q, k, v = _qkv(shape, h_kv)
    with pytest.raises(AttnccError, match=rf"^{name} \(of q/k/v \[B, H, N, D\]\) = 0 is out of range"):
        fn(q, k, v, causal())


@pytest.mark.parametrize(
    "value,shown,hint",
    [
        ("causal()", "'causal()'", "attncc.ir.parse"),
        (None, "None", "build one"),
        (causal, "'<function>'", "jit"),
    ],
    ids=["text", "none", "function"],
)
def test_a_pattern_that_is_not_a_pattern_is_refused(value, shown, hint):
    q, k, v = _qkv()
    match = rf"pattern = {re.escape(shown)} is not an attncc pattern \(.*{hint}"
    with pytest.raises(PatternError, match=match):
        attncc.attention(q, k, v, value)
    with pytest.raises(PatternError, match=match):
        SparseAttention(32, 2, value, (4, 4))


# --- the reference --------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_a_non_finite_value_reaches_only_the_rows_that_keep_its_key(score):
    q, k, v = _qkv()
    bad = v.clone()
    bad[0, 0, 5, 0], bad[0, 0, 7, 1], bad[0, 0, 9, 2], bad[0, 0, 10, 2] = (
        math.inf,
        math.nan,
        math.inf,
        -math.inf,
    )
    out = reference(q, k, bad, causal(), score=score)[0, 0]
    clean = v.clone()
    clean[0, 0, [5, 7, 9, 10], [0, 1, 2, 2]] = 0.0
    want = reference(q, k, clean, causal(), score=score)[0, 0]
    finite = torch.ones_like(out, dtype=torch.bool)
    finite[5:, 0] = finite[7:, 1] = finite[9:, 2] = False
    torch.testing.assert_close(out[finite], want[finite], atol=0, rtol=0)
    assert (out[5:, 0] == math.inf).all() and out[7:, 1].isnan().all()
    assert (out[9, 2] == math.inf) and out[10:, 2].isnan().all()  # inf and -inf together: NaN


# --- the CLI --------------------------------------------------------------------------------


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text('name: "$\\\\frac{a}$ (a $ sign)"\ngrid: [8, 8]\npattern: causal()\n')
    return path


@pytest.mark.parametrize(
    "args,message",
    [
        (["--q-tile", "99999999999999999999"], "--q-tile = '99999999999999999999' is out of range"),
        (["--q-tile", "²"], "--q-tile = '²' is out of range"),
        (
            ["--png", "{tmp}/missing/a.png"],
            "--png = '{tmp}/missing/a.png' is not a file in an existing directory",
        ),
    ],
    ids=["huge-tile", "superscript-tile", "png-missing-dir"],
)
def test_cli_analyze_bad_option_is_one_error(spec, tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(cli, ["analyze", str(spec), *args])
    assert isinstance(result.exception, AttnccError), result.exception
    assert str(result.exception).startswith(message.format(tmp=tmp_path))


def test_cli_analyze_draws_a_mathtext_name_literally(spec, tmp_path):
    png = tmp_path / "mask.png"
    result = CliRunner().invoke(cli, ["analyze", str(spec), "--png", str(png)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert png.stat().st_size > 0

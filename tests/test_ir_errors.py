"""Bad input: an attncc error naming the field, the value and the allowed range."""

import pytest
import torch

from attncc import AttnccError, ParseError, PatternError, SpecError
from attncc.ir import (
    Grid,
    analyze,
    band,
    block_diagonal,
    block_sparse,
    causal,
    congruent,
    document,
    global_tokens,
    key_range,
    neighborhood,
    parse,
    per_head,
    strided,
    validate,
)
from attncc.ir.mask import mask
from attncc.ir.spec import spec_from_data

G = Grid((16, 20))


@pytest.mark.parametrize(
    "pattern,grid,match",
    [
        (neighborhood(17), G, r"neighborhood.window\[0\] = 17 .*1..16"),
        (neighborhood(5, dilation=4), G, r"neighborhood.dilation\[0\] = 4 .*1..3"),
        (neighborhood(3, stride=4), G, r"neighborhood.stride\[0\] = 4 .*1..3"),
        (neighborhood((3, 3, 3)), G, r"neighborhood.window = \(3, 3, 3\).*tuple of 2"),
        (block_sparse([[1, 0], [0, 1]], 64), G, r"block_sparse.layout shape = \(2, 2\).*\(5, 5\)"),
        (global_tokens([320]), G, r"global_tokens.indices\[0\] = 320 .*0..319"),
        (document([0, 1]), G, r"document.ids length = 2 .*320"),
        (band(2, hi=0), G, r"band.axis = 2 .*0..1 \(grid rank\)"),
        (congruent(2, 3), G, r"congruent.axis = 2 .*0..1"),
    ],
    ids=[
        "window",
        "dilation-x-window",
        "stride",
        "rank",
        "layout-shape",
        "global-index",
        "document-length",
        "band-axis",
        "congruent-axis",
    ],
)
def test_grid_checks(pattern, grid, match):
    with pytest.raises(PatternError, match=match):
        validate(pattern, grid)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: neighborhood(0), r"neighborhood.window = 0 .*>= 1"),
        (lambda: neighborhood(3, dilation=-1), r"neighborhood.dilation = -1"),
        (lambda: neighborhood(3, stride=0), r"neighborhood.stride = 0"),
        (lambda: neighborhood(3, causal=1), r"neighborhood.causal = 1 .*true/false"),
        (lambda: strided(4, 4), r"strided.offset = 4 .*0..3"),
        (lambda: block_sparse([[1, 0], [1]], 8), r"block_sparse.layout.*2 columns"),
        (lambda: block_sparse([[1, 2], [1, 0]], 8), r"block_sparse.layout\[0\]\[1\] = 2 .*0 or 1"),
        (lambda: block_sparse([1, 0], 8), r"block_sparse.layout.*2-D"),
        (
            lambda: block_sparse(torch.ones(2, 2), 8),
            r"block_sparse.layout = '<Tensor\[2, 2\]>' is not nested lists of 0/1 \(for a static layout "
            r"pass layout.tolist\(\)",
        ),
        (lambda: global_tokens([]), r"global_tokens.indices = \(\).*at least one"),
        (lambda: band(0, 3, 1), r"band.hi = 1 .*>= band.lo = 3"),
        (lambda: band(0), r"band.lo/hi = \(None, None\) .*at least one bound"),
        (lambda: band(3, hi=0), r"band.axis = 3 .*axis index 0-2"),
        (lambda: band(0, lo=1.5), r"band.lo = 1.5 .*integer or None"),
        (lambda: block_diagonal(0, 0), r"block_diagonal.block = 0 .*>= 1"),
        (lambda: congruent(1, 4, 4), r"congruent.offset = 4 .*0..3"),
        (lambda: Grid((2, 3, 4, 5)), r"grid = \(2, 3, 4, 5\).*1 to 3 axes"),
        (lambda: Grid((0, 3)), r"grid\[0\] = 0 .*>= 1"),
    ],
    ids=["zero-window", "negative-dilation", "zero-stride", "causal-int", "offset", "ragged-layout",
         "layout-value", "layout-1d", "layout-tensor", "no-globals", "band-order", "band-open", "band-axis", "band-float",
         "block-zero", "congruent-offset", "rank-4", "zero-size"],
)  # fmt: skip
def test_parameter_checks(build, match):
    with pytest.raises(PatternError, match=match):
        build()


def test_per_head_count_must_match_heads():
    with pytest.raises(PatternError, match=r"heads = 3 .*2 \(the pattern gives 2 per-head entries\)"):
        validate(per_head([neighborhood(3), neighborhood(5)]), G, heads=3)


@pytest.mark.parametrize(
    "text,match",
    [
        ("neighborhood(window=3", r"pattern text .*column"),
        ("neighbourhood(window=3)", r"unknown primitive 'neighbourhood'.*neighborhood"),
        ("neighborhood(size=3)", r"unknown argument neighborhood.size.*window, dilation, stride, causal"),
        ("neighborhood()", r"neighborhood\(\) is missing window"),
        ("neighborhood(window=x)", r"unexpected value 'x'"),
        ("causal() + dense()", r"unexpected 'causal\(\) \+ dense\(\)'"),
        ("", r"pattern text = '' is empty"),
    ],
    ids=[
        "syntax",
        "unknown-primitive",
        "unknown-argument",
        "missing-argument",
        "non-literal",
        "operator",
        "empty",
    ],
)
def test_malformed_text(text, match):
    with pytest.raises(ParseError, match=match):
        parse(text)


@pytest.mark.parametrize(
    "data,match",
    [
        ({"pattern": "causal()", "grid": [8], "windw": 3}, r"spec field = 'windw' .*unknown field"),
        ({"pattern": {"nope": {}}, "grid": [8]}, r"pattern name = 'nope' .*unknown primitive"),
        (
            {"pattern": {"neighborhood": {"size": 3}}, "grid": [8]},
            r"pattern.neighborhood arguments = \['size'\]",
        ),
        ({"grid": [8]}, r"spec field 'pattern' is missing"),
        ({"pattern": "causal()", "grid": [8], "dtype": "float8"}, r"dtype = 'float8' .*float16"),
    ],
    ids=["unknown-field", "unknown-name", "bad-arguments", "missing", "dtype"],
)
def test_bad_specs(data, match):
    with pytest.raises(SpecError, match=match):
        spec_from_data(data)


def test_bad_tiles():
    with pytest.raises(PatternError, match=r"q_tile = \(8, 8, 8\).*one size .* or 2 sizes"):
        analyze(neighborhood(3), G, q_tile=(8, 8, 8))
    with pytest.raises(PatternError, match=r"kv_tile\[0\] = 0"):
        analyze(neighborhood(3), G, kv_tile=0)


def test_every_error_is_an_attncc_error():
    assert all(issubclass(cls, AttnccError) for cls in (ParseError, PatternError, SpecError))
    assert issubclass(AttnccError, ValueError)


@pytest.mark.parametrize(
    "pattern,other",
    [
        (per_head([block_sparse([[[1]], [[0]], [[0]]], 8), causal()]), 3),  # a 3-head layout in 2 heads
        (per_head([causal(), block_sparse([[[1]]], 8)]), 1),  # a 1-head layout in 2 heads
    ],
    ids=["3-head-layout-in-2-heads", "1-head-layout-in-2-heads"],
)
@pytest.mark.parametrize("entry", ["validate", "mask", "analyze"])
def test_per_head_entry_with_another_head_count(entry, pattern, other):
    # One head count for the whole pattern: an entry of per_head may vary by head only with
    # the per_head's count. (Before the fix these were accepted, dropped heads, or crashed.)
    grid = Grid((8,))
    call = {
        "validate": lambda: validate(pattern, grid),
        "mask": lambda: mask(pattern, grid),
        "analyze": lambda: analyze(pattern, grid, 4, 4),
    }[entry]
    with pytest.raises(
        PatternError, match=rf"per-head pattern inside per_head = '{other} heads'.*allowed: 2 heads"
    ):
        call()


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: key_range(0), r"key_range.lo/hi = \(None, None\) .*at least one bound"),
        (lambda: key_range(0, 5, 2), r"key_range.hi = 2 .*>= key_range.lo = 5"),
        (lambda: key_range(3, hi=0), r"key_range.axis = 3 .*axis index 0-2"),
        (lambda: key_range(0, lo=True), r"key_range.lo = True .*integer or None"),
        (lambda: validate(key_range(2, hi=4), G), r"key_range.axis = 2 .*0..1 \(grid rank\)"),
    ],
    ids=["open", "order", "axis", "bool-bound", "axis-past-rank"],
)
def test_key_range_checks(build, match):
    with pytest.raises(PatternError, match=match):
        build()

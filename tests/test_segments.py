"""Token spaces of segments (issue 16 part 4): the IR and its checks, the text form, the oracle
mask and reference attention, the analysis over the whole space, spec files and ``attncc
analyze`` (Note [Segment spaces] in attncc.ir.segments, Note [Segment tile maps] in
attncc.ir.analysis).

The oracle's mask is compared with one written out here from the definitions (NATTEN's clamped
window per axis, causal by position in the segment, key ranges by the key's index in its
segment); the analysis's tile counts with the mask summed per tile; the reference with masked
softmax in float64 written out here.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import attncc
from attncc.cli import cli
from attncc.errors import ParseError, PatternError, SpecError
from attncc.ir import (
    alibi,
    analyze,
    analyze_segments,
    by_segments,
    causal,
    dense,
    format_pattern,
    key_lengths,
    key_range,
    neighborhood,
    parse,
    per_head,
    segments,
    sliding_window,
)
from attncc.ir.grid import Grid
from attncc.ir.mask import mask
from attncc.ir.segments import BySegments, Segments
from attncc.ir.spec import spec_from_data
from attncc.reference import attention as reference

# A class token and 4 registers, then a 7x9 image (the ViT-with-registers case, at odd sizes).
VIT = segments(cls=1, reg=4, img=(7, 9))
VIT_PAIRS = {
    ("cls", "*"): dense(),
    ("reg", "*"): dense(),
    ("img", "img"): neighborhood((3, 5)),
    ("img", "cls"): dense(),
}
# 5 text tokens then a 3x4x5 video: text sees everything, video its neighbourhood and the text
# up to its 3rd token; the text attends causally to itself (the pair names one entry only).
TEXT_VIDEO = segments(text=5, video=(3, 4, 5))
TV_PAIRS = {
    ("text", "text"): causal(),
    ("text", "video"): dense(),
    ("video", "video"): neighborhood((3, 3, 3)),
    ("video", "text"): key_range(0, 0, 2),
}


def window_keys(i: int, length: int, window: int) -> range:
    """NATTEN's clamped window on one axis: ``window`` keys, centred on ``i`` where they fit."""
    start = min(max(i - window // 2, 0), length - window)
    return range(start, start + window)


def keep_by_definition(space: Segments, pairs: dict, n_heads: int = 1) -> torch.Tensor:
    """``[H, N, N]``: each pair of tokens of ``space`` kept or not, from the definitions of the
    patterns the tests use, read on the two tokens' segments."""
    n = space.size
    out = torch.zeros(n_heads, n, n, dtype=torch.bool)
    places = []  # (segment, coordinates, flat index in the segment) of every token
    for s, shape in enumerate(space.shapes):
        for flat, coords in enumerate(itertools.product(*(range(x) for x in shape))):
            places.append((s, coords, flat))

    def rule(pattern, h):
        if isinstance(pattern, type(per_head([dense(), dense()]))):
            return rule(pattern.patterns[h], h)
        return pattern

    for h in range(n_heads):
        for qi, (qs, qc, qf) in enumerate(places):
            for ki, (ks, kc, kf) in enumerate(places):
                q_name, k_name = space.names[qs], space.names[ks]
                entry = [p for (a, b), p in pairs.items() if a in (q_name, "*") and b in (k_name, "*")]
                if not entry:
                    continue
                p = rule(entry[0], h)
                name = p.NAME
                if name == "dense":
                    kept = True
                elif name == "causal":
                    kept = kf <= qf
                elif name == "key_range":
                    kept = (p.lo or 0) <= kc[p.axis] <= (math.inf if p.hi is None else p.hi)
                elif name == "neighborhood":
                    window = p.window if isinstance(p.window, tuple) else (p.window,) * len(qc)
                    shape = space.shapes[qs]
                    kept = all(k in window_keys(q, L, w) for q, k, L, w in zip(qc, kc, shape, window))
                else:
                    raise AssertionError(f"no definition here for {name}")
                out[h, qi, ki] = kept
    return out


# --- the IR and its checks ----------------------------------------------------------


def test_space_offsets_sizes_and_text():
    assert VIT.sizes == (1, 4, 63) and VIT.offsets == (0, 1, 5) and VIT.size == 68
    assert str(TEXT_VIDEO) == "segments(text=5, video=(3, 4, 5))"
    assert VIT.grids[2] == Grid((7, 9))


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: segments(), r"segments = 0 .*one or more named segments"),
        (lambda: segments(text=0), r"segments\.text = \(0,\)"),
        (lambda: segments(video=(2, 2, 2, 2)), r"segments\.video = \(2, 2, 2, 2\)"),
        (lambda: Segments(("a", "a"), ((1,), (2,))), r"segments\.names .*distinct names"),
        (lambda: Segments(("a b",), ((1,),)), r"segments\.names\[0\] = 'a b'"),
    ],
    ids=["empty", "zero-tokens", "rank-4", "same-name", "not-identifier"],
)
def test_bad_space_names_the_field(build, match):
    with pytest.raises(PatternError, match=match):
        build()


@pytest.mark.parametrize(
    "pairs,match",
    [
        (
            {("text", "nope"): dense()},
            r"by_segments\.pairs\[\('text', 'nope'\)\] = 'nope'.*text, video or '\*'",
        ),
        (
            {("text", "*"): dense(), ("text", "video"): dense()},
            r"\('text', 'video'\) is named by \('text', '\*'\) too",
        ),
        ({("video", "text"): neighborhood(3)}, r"by_segments\.pairs\[\('video', 'text'\)\]: .*neighborhood"),
        (
            {("text", "video"): key_range(0, 3)},
            r"by_segments\.pairs\[\('text', 'video'\)\]: .*key_range takes a 1-D k",
        ),
        (
            {("text", "text"): neighborhood(7)},
            r"by_segments\.pairs\[\('text', 'text'\)\]: neighborhood\.window\[0\] = 7",
        ),
        (
            {("text", "*"): key_lengths()},
            r"by_segments\.pairs\[\('text', '\*'\)\] = 'key_lengths\(\)'.*static patterns",
        ),
        ({}, r"by_segments\.pairs = \(\) .*at least one"),
    ],
    ids=[
        "unknown-segment",
        "named-twice",
        "neighborhood-across",
        "key-range-on-grid",
        "window-too-large",
        "runtime-data",
        "no-pairs",
    ],
)
def test_bad_pairs_name_the_pair(pairs, match):
    with pytest.raises(PatternError, match=match):
        by_segments(TEXT_VIDEO, pairs)


def test_by_segments_is_a_whole_pattern_only():
    p = by_segments(VIT, VIT_PAIRS)
    with pytest.raises(PatternError, match=r"union operand = 'by_segments'.*patterns on one grid"):
        p | dense()
    with pytest.raises(PatternError, match=r"per_head\.patterns\[1\] = 'by_segments'"):
        per_head([dense(), p])
    with pytest.raises(
        PatternError, match=r"by_segments\.pairs\[\('cls', 'cls'\)\] = .*no nested by_segments"
    ):
        by_segments(VIT, {("cls", "cls"): p})


def test_pairs_listed_in_segment_order_and_unlisted_pairs_see_nothing():
    p = by_segments(VIT, VIT_PAIRS)
    listed = [(VIT.names[i], VIT.names[j]) for i, j, _ in p.listed()]
    assert listed == [("cls", "cls"), ("cls", "reg"), ("cls", "img"), ("reg", "cls"), ("reg", "reg"),
                      ("reg", "img"), ("img", "cls"), ("img", "img")]  # fmt: skip
    assert p.pattern_of("img", "reg") is None


def test_text_form_round_trips():
    for p in (by_segments(VIT, VIT_PAIRS), by_segments(TEXT_VIDEO, TV_PAIRS)):
        text = format_pattern(p)
        assert text.startswith("by_segments(segments(")
        assert parse(text) == p


@pytest.mark.parametrize(
    "text,match",
    [
        ("by_segments(segments(a=3))", r"by_segments takes a space and a dict of pairs"),
        ("by_segments(grid(a=3), {('a', 'a'): dense()})", r"unexpected space"),
        ("by_segments(segments(a=3), {'a': dense()})", r"unexpected pair"),
        ("by_segments(segments(a=3), {('a', 'b'): dense()})", r"by_segments\.pairs\[\('a', 'b'\)\] = 'b'"),
    ],
    ids=["one-argument", "not-segments", "pair-not-tuple", "unknown-segment"],
)
def test_bad_text_is_refused(text, match):
    with pytest.raises((ParseError, PatternError), match=match):
        parse(text)


# --- the oracle: mask and reference attention ---------------------------------------


@pytest.mark.parametrize(
    "space,pairs,heads",
    [
        (VIT, VIT_PAIRS, 1),
        (TEXT_VIDEO, TV_PAIRS, 1),
        (segments(one=1, two=(1, 1), three=(2, 1, 3)), {("*", "*"): dense()}, 1),
        (
            segments(one=1, img=(4, 3)),
            {("one", "one"): dense(), ("img", "*"): per_head([dense(), key_range(0, 0, 0)])},
            2,
        ),
    ],
    ids=["vit-registers", "text-video", "one-token-segments", "per-head-across"],
)
def test_mask_matches_the_definitions(space, pairs, heads):
    p = by_segments(space, pairs)
    got = mask(p, space, heads=heads)
    want = keep_by_definition(space, pairs, heads)
    assert got.shape[-1] == space.size
    assert torch.equal(got.expand(heads, -1, -1), want)


def test_mask_takes_the_pattern_space_only():
    p = by_segments(VIT, VIT_PAIRS)
    with pytest.raises(PatternError, match=r"grid = '68' .*the pattern's space"):
        mask(p, Grid((68,)))
    with pytest.raises(PatternError, match=r"grid = 'segments\(a=68\)'"):
        mask(p, segments(a=68))


def _masked_softmax(q, k, v, keep):
    """float64 attention of ``[B, H, N, D]`` q over k, v (GQA by repetition), rows with no key zero."""
    h, h_kv = q.shape[1], k.shape[1]
    k, v = (t.repeat_interleave(h // h_kv, 1) for t in (k, v))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~keep, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("space,pairs", [(VIT, VIT_PAIRS), (TEXT_VIDEO, TV_PAIRS)], ids=["vit", "text-video"])
def test_reference_is_masked_softmax_over_the_whole_space(space, pairs):
    torch.manual_seed(0)
    p = by_segments(space, pairs)
    q = torch.randn(2, 4, space.size, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, space.size, 8, dtype=torch.float64) for _ in range(2))
    out, lse = reference(q, k, v, p, return_lse=True)
    keep = keep_by_definition(space, pairs)[None]
    torch.testing.assert_close(out, _masked_softmax(q, k, v, keep), rtol=1e-12, atol=1e-12)
    assert lse.shape == (2, 4, space.size)


def test_reference_gradients_flow_through_autograd():
    torch.manual_seed(1)
    p = by_segments(TEXT_VIDEO, TV_PAIRS)
    n = TEXT_VIDEO.size
    q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: reference(q, k, v, p), (q, k, v))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"grid": Grid((68,))}, r"grid = .*allowed: None"),
        ({"q_grid": (2,)}, r"q_grid = \(2,\)"),
        ({"layout": "spatial"}, r"layout = 'spatial'"),
        ({"score": alibi([0.5, 0.25])}, r"score = 'alibi'.*terms that read no positions"),
    ],
    ids=["grid", "q-grid", "layout", "alibi"],
)
def test_reference_refuses_what_a_space_does_not_take(kwargs, match):
    p = by_segments(VIT, VIT_PAIRS)
    q = torch.randn(1, 2, VIT.size, 8)
    with pytest.raises(PatternError, match=match):
        reference(q, q, q, p, **kwargs)


def test_reference_refuses_a_q_shorter_than_the_space():
    p = by_segments(VIT, VIT_PAIRS)
    k = torch.randn(1, 2, VIT.size, 8)
    with pytest.raises(PatternError, match=r"q shape = \(1, 2, 60, 8\).*\[B, H, 68, D\]"):
        reference(k[:, :, :60], k, k, p)


# --- analysis over the whole space ----------------------------------------------------


def _counts_from_mask(p: BySegments, a) -> np.ndarray:
    keep = mask(p, p.space, heads=a.heads).numpy().astype(np.int64)
    qt, kt = a.q_tiling.tile_of_token(), a.kv_tiling.tile_of_token()
    n_q, n_k = a.tile_counts.shape[1:]
    counts = np.zeros((keep.shape[0], n_q, n_k), np.int64)
    for h in range(keep.shape[0]):
        np.add.at(counts[h], (qt[:, None], kt[None, :]), keep[h])
    return counts


@pytest.mark.parametrize(
    "space,pairs,heads,q_tile,kv_tile",
    [
        (VIT, VIT_PAIRS, 3, 8, 8),
        (VIT, VIT_PAIRS, 1, (1, 2, (4, 4)), (2, 3, 5)),
        (TEXT_VIDEO, TV_PAIRS, 2, (4, (2, 2, 4)), (3, (1, 4, 2))),
        (TEXT_VIDEO, TV_PAIRS, 1, 16, 16),
        (
            segments(one=1, img=(4, 3)),
            {("one", "one"): dense(), ("img", "*"): per_head([dense(), key_range(0, 0, 0)])},
            2,
            2,
            2,
        ),
        (segments(t=6), {("t", "t"): sliding_window(1, 2) & causal()}, 1, 4, 4),
    ],
    ids=["vit-flat", "vit-per-segment", "text-video-boxes", "text-video-flat", "per-head", "one-segment"],
)
def test_analysis_counts_every_tile_of_the_space_exactly(space, pairs, heads, q_tile, kv_tile):
    p = by_segments(space, pairs)
    a = analyze_segments(p, q_tile, kv_tile, heads=heads, head_dim=16)
    counts = _counts_from_mask(p, a)
    assert np.array_equal(a.tile_counts, counts)
    kept = int(counts.sum()) * (heads if counts.shape[0] == 1 else 1)
    assert a.kept_pairs == kept and a.total_pairs == heads * space.size**2
    assert a.density == kept / (heads * space.size**2)
    capacity = np.outer(a.q_tiling.sizes(), a.kv_tiling.sizes())
    visited = (counts > 0).sum()
    assert a.full_tiles == (counts == capacity).sum() and a.empty_tiles == (counts == 0).sum()
    assert a.tile_bound == counts.size / visited
    assert a.flops_kept == 4 * 16 * kept


def test_analysis_of_one_segment_is_that_of_its_grid():
    p = by_segments(segments(img=(7, 9)), {("img", "img"): neighborhood((3, 5))})
    a = analyze_segments(p, [(4, 4)], [(4, 4)])
    b = analyze(neighborhood((3, 5)), Grid((7, 9)), (4, 4), (4, 4))
    assert np.array_equal(a.tile_classes, b.tile_classes) and a.kept_pairs == b.kept_pairs


def test_box_tiles_in_the_grid_beat_flat_tiles():
    """The point of tiling each segment on its own grid: a neighbourhood in a video needs fewer
    tile pairs in boxes than in flat runs of as many tokens."""
    space = segments(text=26, video=(2, 32, 32))
    p = by_segments(
        space,
        {("text", "*"): dense(), ("video", "video"): neighborhood((1, 15, 15)), ("video", "text"): dense()},
    )
    boxes = analyze_segments(p, (32, (1, 4, 8)), (32, (1, 4, 8)))
    flat = analyze_segments(p, 32, 32)
    assert boxes.tile_bound > flat.tile_bound > 1


@pytest.mark.parametrize(
    "q_tile,match",
    [
        ((8, 8), r"q_tile = \(8, 8\) .*one size, or 3 tiles \(one per segment: cls, reg, img\)"),
        ((1, 2, (2, 2, 2)), r"q_tile\[img\] = \(2, 2, 2\) .*one size \(flat tokens\) or 2 sizes"),
        ((1, 0, 8), r"q_tile\[reg\]\[0\] = 0"),
    ],
    ids=["two-tiles-for-three", "box-of-wrong-rank", "zero"],
)
def test_analysis_tiles_name_the_segment(q_tile, match):
    with pytest.raises(PatternError, match=match):
        analyze_segments(by_segments(VIT, VIT_PAIRS), q_tile)


def test_analysis_takes_only_by_segments_and_a_pattern_on_a_grid_refuses_it():
    with pytest.raises(PatternError, match=r"pattern = 'dense\(\)' .*by_segments"):
        analyze_segments(dense())  # type: ignore[arg-type]
    with pytest.raises(PatternError, match=r"pattern = 'by_segments' .*a pattern on one grid"):
        analyze(by_segments(VIT, VIT_PAIRS), Grid((68,)))


# --- spec files and the CLI -------------------------------------------------------------

SPEC = """\
name: vit_registers
segments: {cls: 1, reg: 4, img: [7, 9]}
pattern:
  "cls -> *": dense()
  "reg -> *": dense()
  "img -> img": neighborhood(window=(3, 5))
  "img -> cls": dense()
heads: 2
head_dim: 32
"""


def test_spec_with_segments_reads_a_pattern_per_pair(tmp_path):
    spec = spec_from_data({"segments": {"cls": 1, "reg": 4, "img": [7, 9]}, "pattern": {
        "cls -> *": "dense()", "reg -> *": "dense()", "img -> img": {"neighborhood": {"window": [3, 5]}},
        "img -> cls": "dense()"}, "heads": 2})  # fmt: skip
    assert spec.space == VIT and spec.pattern == by_segments(
        VIT, {**VIT_PAIRS, ("img", "img"): neighborhood([3, 5])}
    )
    assert spec.grid == Grid((68,)) and spec.heads == 2
    text = spec_from_data(
        {"segments": {"cls": 1, "reg": 4, "img": [7, 9]}, "pattern": format_pattern(spec.pattern)}
    )
    assert text.pattern == spec.pattern


@pytest.mark.parametrize(
    "data,match",
    [
        (
            {"segments": {"a": 3}, "grid": [3], "pattern": {"a -> a": "dense()"}},
            r"grid = \[3\] .*no grid, queries or q_grid field",
        ),
        (
            {"segments": {"a": 3}, "q_grid": [2], "pattern": {"a -> a": "dense()"}},
            r"q_grid = \[2\] .*no grid, queries or q_grid field",
        ),
        (
            {"segments": [3], "pattern": {"a -> a": "dense()"}},
            r"segments = \[3\] .*a mapping of segment names",
        ),
        ({"segments": {"a": "x"}, "pattern": {"a -> a": "dense()"}}, r"segments\.a = 'x'"),
        ({"segments": {"a": 3}, "pattern": {"a, a": "dense()"}}, r"pattern key = 'a, a' .*'q -> k'"),
        ({"segments": {"a": 3}, "pattern": "dense()"}, r"pattern = 'dense\(\)' .*not by_segments"),
        (
            {"segments": {"a": 3}, "pattern": "by_segments(segments(b=3), {('b', 'b'): dense()})"},
            r"another space",
        ),
        (
            {"segments": {"a": 3, "b": [2, 2]}, "pattern": {"a -> b": "causal()"}},
            r"by_segments\.pairs\[\('a', 'b'\)\]: .*causal",
        ),
        ({"segments": {"a": 3}, "pattern": {"a -> a": "dense()"}, "score": "alibi(0.5)"}, r"score = 'alibi'"),
    ],
    ids=[
        "grid-too",
        "q-grid-too",
        "not-mapping",
        "bad-shape",
        "bad-key",
        "not-by-segments",
        "other-space",
        "causal-across",
        "alibi",
    ],
)
def test_bad_segments_spec_names_the_field(data, match):
    with pytest.raises((SpecError, PatternError), match=match):
        spec_from_data(data)


def test_analyze_a_segments_spec_prints_the_whole_space_and_draws_it(tmp_path):
    path = tmp_path / "vit.yaml"
    path.write_text(SPEC)
    png = tmp_path / "vit.png"
    result = CliRunner().invoke(cli, ["analyze", str(path), "--png", str(png)])
    assert result.exit_code == 0, result.output
    p = by_segments(VIT, VIT_PAIRS)
    kept = int(mask(p, VIT).sum())
    assert f"{kept / VIT.size**2:.4%}" in result.output and f"{2 * kept:,} of" in result.output
    assert "segments(cls=1, reg=4, img=(7, 9)) (68 tokens)" in result.output
    assert "cls 128, reg 128, img 8x16" in result.output and "cls 64, reg 64, img 64 flat" in result.output
    assert "img -> cls (grid 1, the same keys for every query): dense()" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_takes_one_tile_per_segment(tmp_path):
    path = tmp_path / "vit.yaml"
    path.write_text(SPEC)
    result = CliRunner().invoke(cli, ["analyze", str(path), "--q-tile", "1,4,4x4", "--kv-tile", "8"])
    assert result.exit_code == 0, result.output
    assert "cls 1, reg 4, img 4x4" in result.output and "cls 8, reg 8, img 8 flat" in result.output


@pytest.mark.parametrize("command", ["compile", "tune", "bench"])
def test_other_commands_refuse_a_segments_spec_naming_the_field(tmp_path, command):
    path = tmp_path / "vit.yaml"
    path.write_text(SPEC)
    args = [command, str(path)] + (["-o", str(tmp_path / "pkg")] if command == "compile" else [])
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, SpecError), result.output
    assert f"segments (for attncc {command}) = 'segments(cls=1, reg=4, img=(7, 9))'" in str(result.exception)


def test_jit_refuses_a_space_of_segments_naming_the_field():
    from attncc.errors import TraceError

    with pytest.raises(TraceError, match=r"jit grid = 'segments\(a=3\)' .*write by_segments"):
        attncc.jit(lambda q, k: True, grid=segments(a=3))
    jitted = attncc.jit(lambda q, k: True, grid=("n",))
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(TraceError, match=r"grid = 'segments\(a=3\)' .*one grid"):
        jitted(q, q, q, grid=segments(a=3))

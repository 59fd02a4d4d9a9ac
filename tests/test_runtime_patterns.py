"""Primitives whose data are given at call time (issue 18, part 1): block_mask, topk_blocks,
documents, key_lengths. Their text form and validation, the data checker's errors and normal
forms (attncc.runtime.data), the oracle against a Python double loop over the user's data, the
reference against static patterns with the same data, the analysis's bounds, ``attncc analyze``,
and torch.compile. No kernel runs here: those are issue 18's lowering."""

import math

import numpy as np
import pytest
import torch
import torch._dynamo.testing
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import primitives

from attncc import AttnccError, PatternError
from attncc.cli import cli
from attncc.ir import (
    BlockMask,
    Documents,
    Grid,
    Intersection,
    KeyLengths,
    TopkBlocks,
    Union,
    analyze,
    block_diagonal,
    block_mask,
    block_sparse,
    canonicalize,
    causal,
    dense,
    document,
    documents,
    format_pattern,
    key_lengths,
    key_range,
    neighborhood,
    parse,
    per_head,
    sliding_window,
    topk_blocks,
)
from attncc.ir.analysis import EMPTY, FULL
from attncc.ir.mask import mask
from attncc.ir.spec import pattern_from_data
from attncc.ir.symbolic import Runtime, rules
from attncc.reference import attention as reference
from attncc.runtime import dynamo
from attncc.runtime.data import checked
from attncc.runtime.library import _text

CPU = torch.device("cpu")
FEW = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- text, validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "block_mask(block=64)",
        "block_mask(block=(4, 4, 4))",
        "topk_blocks(block=64)",
        "topk_blocks(block=(2, 8))",
        "documents()",
        "key_lengths()",
        "sliding_window(left=8) | block_mask(block=16)",
        "neighborhood(window=(3, 5)) & documents()",
        "causal() & key_lengths()",
        "(block_mask(block=4) | topk_blocks(block=8)) & documents() & key_lengths()",
        "per_head([causal(), sliding_window(left=2)]) & key_lengths()",
    ],
)
def test_text_round_trips(text):
    p = parse(text)
    assert format_pattern(p) == text
    assert parse(format_pattern(p)) == p
    assert hash(p) == hash(parse(text))


def test_builders_and_spec_mappings_make_the_same_nodes():
    assert block_mask((4, 4, 4)) == BlockMask((4, 4, 4)) == parse("block_mask(block=[4, 4, 4])")
    assert pattern_from_data({"block_mask": {"block": [4, 4, 4]}}) == block_mask((4, 4, 4))
    assert pattern_from_data({"documents": None}) == documents() == Documents()
    assert pattern_from_data({"union": [{"key_lengths": {}}, "causal()"]}) == key_lengths() | causal()
    assert topk_blocks(8) != block_mask(8)  # two kinds: two data keys
    assert isinstance(key_lengths(), KeyLengths) and isinstance(topk_blocks(8), TopkBlocks)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: block_mask(0), r"block_mask.block = 0 .*allowed: an integer >= 1 \(flat blocks\)"),
        (lambda: block_mask(True), r"block_mask.block = True"),
        (lambda: topk_blocks((2, 0)), r"topk_blocks.block\[1\] = 0 .*>= 1"),
        (lambda: topk_blocks((1, 2, 3, 4)), r"topk_blocks.block = \(1, 2, 3, 4\) .*1-3 integers"),
        (lambda: parse("block_mask()"), r"block_mask\(\) is missing block"),
        (lambda: parse("documents(ids=3)"), r"unknown argument documents.ids"),
        (
            lambda: block_mask(16) | (causal() & block_mask(32)),
            r"second block_mask leaf = 'block_mask\(block=32\)' .*the first is block_mask\(block=16\).*"
            r"one block_mask leaf per pattern",
        ),
        (
            lambda: per_head([causal(), documents() & causal()]),
            r"per_head.patterns\[1\] = 'documents\(\) & causal",
        ),
    ],
)
def test_bad_runtime_primitives_are_refused_naming_the_field(build, match):
    with pytest.raises(AttnccError, match=match):  # a PatternError, or a ParseError for text
        build()


def test_one_leaf_of_each_kind_and_kinds_mix():
    d = documents()
    with pytest.raises(PatternError, match=r"second documents leaf = 'documents\(\)' .*factor it out"):
        (d & causal()) | (d & sliding_window(2))  # even the same leaf: its data are read once
    with pytest.raises(PatternError, match=r"second key_lengths leaf"):
        parse("key_lengths() | key_lengths()")
    both = block_mask(4) | topk_blocks(4) | (key_lengths() & causal())
    assert [leaf.NAME for leaf in both.runtime_leaves] == ["block_mask", "topk_blocks", "key_lengths"]
    assert documents() & (causal() | sliding_window(2)) == parse(
        str(documents() & (causal() | sliding_window(2)))
    )


def test_a_box_block_names_every_axis_of_the_grid():
    with pytest.raises(PatternError, match=r"block_mask.block = \(4, 4\) .*a tuple of 3 sizes"):
        canonicalize(causal() | block_mask((4, 4)), Grid((4, 8, 8)))
    canonicalize(block_mask(4), Grid((4, 8, 8)))  # an int is flat blocks on any grid


def test_block_sparse_given_a_tensor_points_at_block_mask():
    with pytest.raises(PatternError, match=r"block_mask\(block\) and attncc.attention\(\.\.\., data="):
        block_sparse(torch.ones(2, 2), 8)


@pytest.mark.parametrize(
    "p,grid,canonical",
    [
        (block_mask((4,)), (16,), "block_mask(block=4)"),
        (block_mask(100), (16,), "block_mask(block=16)"),
        (topk_blocks((2, 8)), (6, 8), "topk_blocks(block=16)"),  # whole rows: flat blocks
        (block_mask((1, 4)), (6, 8), "block_mask(block=4)"),  # 4 divides the row
        (block_mask((1, 3)), (6, 8), "block_mask(block=(1, 3))"),  # 3 does not
        (block_mask((9, 9)), (6, 8), "block_mask(block=48)"),
        (dense() | (documents() & causal()), (8,), "dense() | documents()"),
        (
            block_diagonal(0, 2) & key_range(0, lo=9) & key_lengths(),
            (8,),
            "band(axis=0, lo=8) & key_lengths()",
        ),
        (
            sliding_window(3) & key_lengths() & sliding_window(1),
            (8,),
            "key_lengths() & sliding_window(left=1)",
        ),
    ],
)
def test_canonical_forms_simplify_the_static_part_and_keep_every_runtime_leaf(p, grid, canonical):
    assert format_pattern(canonicalize(p, Grid(grid))) == canonical


def test_rules_name_the_runtime_leaf_for_the_lowering():
    r = rules(canonicalize(causal() & topk_blocks(4), Grid((16,))), Grid((16,)))
    assert Runtime(topk_blocks(4)) in r.rules


# --- the checker ---------------------------------------------------------------------------

P = (block_mask(4) | topk_blocks((2, 2))) & documents() & key_lengths()  # on a 4x4 grid: 4 blocks each
G = Grid((4, 4))


def _good(**changes):
    data = {
        "block_mask": torch.ones(2, 1, 4, 4, dtype=torch.bool),
        "topk_blocks": torch.zeros(1, 3, 4, 2, dtype=torch.int32),
        "documents": torch.zeros(2, 16, dtype=torch.int64),
        "key_lengths": torch.full((2,), 16),
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.parametrize(
    "data,match",
    [
        ([1], r"data = '<list>' is not a dict of tensors keyed by block_mask, topk_blocks"),
        (
            _good(masks=torch.ones(1)),
            r"data key = 'masks' is out of range \(unknown key\); allowed: block_mask,",
        ),
        (
            _good(key_lengths=None),
            r"data\['key_lengths'\] is missing \(key_lengths\(\) reads it at call time\)",
        ),
        (_good(documents=None), r"data\['documents'\] is missing .*or data\['cu_seqlens'\]: integer offsets"),
        (_good(cu_seqlens=torch.tensor([0, 4])), r"data keys = \('documents', 'cu_seqlens'\) .*one of them"),
        (_good(block_mask=[[1]]), r"data\['block_mask'\] = '<list>' is not a tensor"),
        (_good(block_mask=torch.ones(1, 1, 4, 4)), r"block_mask dtype = torch.float32 .*bool or an integer"),
        (
            _good(block_mask=torch.ones(3, 1, 4, 4, dtype=torch.bool)),
            r"block_mask shape = \(3, 1, 4, 4\) .*\(2 or 1, 3",
        ),
        (
            _good(block_mask=torch.ones(1, 1, 4, 5, dtype=torch.bool)),
            r"block_mask shape .*4, 4\): \[B, H, QB, KB\]",
        ),
        (_good(block_mask=torch.ones(4, 4, dtype=torch.bool)), r"block_mask shape = \(4, 4\)"),
        (
            _good(block_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool, device="meta")),
            r"block_mask device = .*meta",
        ),
        (
            _good(topk_blocks=torch.zeros(1, 3, 4, 2, dtype=torch.bool)),
            r"topk_blocks dtype = torch.bool .*integer",
        ),
        (
            _good(topk_blocks=torch.zeros(1, 3, 8, 2, dtype=torch.int64)),
            r"topk_blocks shape = \(1, 3, 8, 2\)",
        ),
        (
            _good(documents=torch.zeros(2, 15, dtype=torch.int64)),
            r"documents shape = \(2, 15\) .*\(2 or 1, 16\)",
        ),
        (_good(documents=torch.zeros(2, 16)), r"documents dtype = torch.float32"),
        (
            _good(documents=None, cu_seqlens=torch.tensor([[0, 4]])),
            r"cu_seqlens shape = \(1, 2\) .*\(S \+ 1,\)",
        ),
        (
            _good(key_lengths=torch.full((1,), 16)),
            r"key_lengths shape = \(1,\) .*\(2,\): one length per batch",
        ),
        (_good(key_lengths=torch.full((2,), 16.0)), r"key_lengths dtype = torch.float32"),
    ],
)
def test_the_checker_names_each_bad_field(data, match):
    with pytest.raises(AttnccError, match=match):
        checked(P, G, 2, 3, data, CPU)


def test_data_for_a_primitive_the_pattern_lacks_is_refused():
    with pytest.raises(
        AttnccError, match=r"data\['cu_seqlens'\] = '<Tensor\[3\]>' .*the pattern has no documents"
    ):
        checked(causal() & key_lengths(), Grid((8,)), 1, 1, {"key_lengths": torch.tensor([3]), "cu_seqlens": torch.tensor([0, 2, 8])}, CPU)  # fmt: skip
    with pytest.raises(AttnccError, match=r"data\['key_lengths'\] is missing"):
        checked(causal() & key_lengths(), Grid((8,)), 1, 1, None, CPU)
    assert checked(causal(), Grid((8,)), 1, 1, None, CPU) == {}
    with pytest.raises(PatternError, match=r"pattern = None is not an attncc pattern"):
        checked(None, Grid((8,)), 1, 1, None, CPU)


def _scatter(topk: torch.Tensor, blocks: int) -> torch.Tensor:
    """The layout top-k indices select, element by element."""
    out = torch.zeros(*topk.shape[:3], blocks, dtype=torch.int8)
    for b, h, i in np.ndindex(*topk.shape[:3]):
        for j in topk[b, h, i].tolist():
            if 0 <= j < blocks:
                out[b, h, i, j] = 1
    return out


def test_topk_blocks_become_the_layout_they_select():
    topk = torch.randint(-3, 7, (2, 3, 5, 4), generator=_gen(0))  # 5 blocks: -3, -2, 5, 6 select none
    got = checked(topk_blocks(3), Grid((15,)), 2, 3, {"topk_blocks": topk}, CPU)["topk_blocks"]
    assert got.dtype == torch.int8 and got.is_contiguous()
    assert torch.equal(got, _scatter(topk, 5))
    none = checked(
        topk_blocks(3), Grid((15,)), 1, 1, {"topk_blocks": torch.zeros(1, 1, 5, 0, dtype=torch.int64)}, CPU
    )
    assert not none["topk_blocks"].any()


def test_cu_seqlens_become_document_ids():
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)  # an empty sequence, and tokens 10..15 past the end
    ids = checked(documents(), Grid((16,)), 4, 2, {"cu_seqlens": cu}, CPU)["documents"]
    assert ids.dtype == torch.int32 and ids.shape == (1, 16)
    assert ids[0].tolist() == [0] * 3 + [2] * 7 + [3] * 6
    late = checked(
        documents(), Grid((6,)), 1, 1, {"cu_seqlens": torch.tensor([2, 4], dtype=torch.uint8)}, CPU
    )
    assert late["documents"][0].tolist() == [-1, -1, 0, 0, 1, 1]  # tokens before cu[0] are one more document


def test_normal_forms_keep_broadcast_dimensions_and_convert_only_the_dtype():
    layout = torch.rand(1, 3, 4, 4, generator=_gen(1)) > 0.5
    got = checked(block_mask(4), G, 2, 3, {"block_mask": layout}, CPU)["block_mask"]
    assert got.shape == (1, 3, 4, 4) and got.dtype == torch.int8
    assert got.data_ptr() == layout.data_ptr()  # a bool layout is read as int8, not copied
    expanded = checked(block_mask(4), G, 2, 3, {"block_mask": layout[:, :1].expand(2, 3, 4, 4)}, CPU)
    assert expanded["block_mask"].shape == (1, 1, 4, 4)  # stride-0 dimensions are taken as broadcast
    wide = torch.tensor([0, 1, 256, -512], dtype=torch.int32).reshape(1, 1, 2, 2)  # int8 would wrap 256 to 0
    assert checked(block_mask(8), G, 1, 1, {"block_mask": wide}, CPU)["block_mask"].flatten().tolist() == [
        0,
        1,
        1,
        1,
    ]
    ids = checked(documents(), G, 2, 3, {"documents": torch.arange(16)[None]}, CPU)["documents"]
    assert ids.shape == (1, 16) and ids.dtype == torch.int32
    lengths = torch.tensor([-4, 3, 99], dtype=torch.int64)
    got = checked(key_lengths(), G, 3, 1, {"key_lengths": lengths}, CPU)["key_lengths"]
    assert got.tolist() == [0, 3, 16] and got.dtype == torch.int32


# --- the oracle ------------------------------------------------------------------------------


def _block_of(grid: Grid, block, token: int) -> int:
    coords = np.unravel_index(token, grid.shape)
    if not isinstance(block, tuple):
        return token // block
    per_axis = [c // b for c, b in zip(coords, block)]
    return int(np.ravel_multi_index(per_axis, [math.ceil(s / b) for s, b in zip(grid.shape, block)]))


def _loop(p, grid: Grid, batch: int, heads: int, data: dict) -> torch.Tensor:
    """``[batch, heads, N, N]``: keep(b, h, q, k) pair by pair from the user's data, as the
    primitives' docstrings define them (static sub-patterns read the static oracle)."""
    n = grid.size
    raw = {key: value.tolist() for key, value in data.items()}
    static: dict = {}

    def pick(values, b, h=None):
        row = values[b if len(values) > 1 else 0]
        return row if h is None else row[h if len(row) > 1 else 0]

    def keep(node, b, h, q, k) -> bool:
        if isinstance(node, Union):
            return any(keep(op, b, h, q, k) for op in node.operands)
        if isinstance(node, Intersection):
            return all(keep(op, b, h, q, k) for op in node.operands)
        if isinstance(node, BlockMask):
            return (
                pick(raw["block_mask"], b, h)[_block_of(grid, node.block, q)][_block_of(grid, node.block, k)]
                != 0
            )
        if isinstance(node, TopkBlocks):
            return (
                _block_of(grid, node.block, k)
                in pick(raw["topk_blocks"], b, h)[_block_of(grid, node.block, q)]
            )
        if isinstance(node, Documents):
            if "cu_seqlens" in raw:
                return sum(c <= q for c in raw["cu_seqlens"]) == sum(c <= k for c in raw["cu_seqlens"])
            ids = pick(raw["documents"], b)
            return ids[q] == ids[k]
        if isinstance(node, KeyLengths):
            return k < raw["key_lengths"][b]
        if node not in static:
            static[node] = mask(node, grid, heads)
        m = static[node]
        return bool(m[h if m.shape[0] > 1 else 0, q, k])

    out = torch.zeros(batch, heads, n, n, dtype=torch.bool)
    for b, h, q, k in np.ndindex(batch, heads, n, n):
        out[b, h, q, k] = keep(p, b, h, q, k)
    return out


def _oracle(p, grid: Grid, batch: int, heads: int, data: dict) -> torch.Tensor:
    got = mask(p, grid, heads, data=checked(p, grid, batch, heads, data, CPU))
    assert got.dim() == 4 and got.shape[0] in (1, batch) and got.shape[1] in (1, heads)
    return got.expand(batch, heads, -1, -1)


def _random_data(p, grid: Grid, batch: int, heads: int, seed: int) -> dict:
    g = _gen(seed)
    n, data = grid.size, {}
    for leaf in p.runtime_leaves:
        if isinstance(leaf, (BlockMask, TopkBlocks)):
            nb = math.prod(math.ceil(s / b) for s, b in zip(grid.shape, leaf.block)) if isinstance(leaf.block, tuple) else math.ceil(n / leaf.block)  # fmt: skip
            if isinstance(leaf, BlockMask):
                data["block_mask"] = torch.rand(batch, heads, nb, nb, generator=g) < 0.4
            else:
                data["topk_blocks"] = torch.randint(-1, nb, (batch, heads, nb, 2), generator=g)
        elif isinstance(leaf, Documents):
            data["documents"] = torch.randint(0, 3, (batch, n), generator=g)
        else:
            data["key_lengths"] = torch.randint(0, n + 1, (batch,), generator=g)
    return data


CASES = {
    "sliding_window(8) | block_mask(16)": (sliding_window(8) | block_mask(16), (48,)),
    "neighborhood((3,5)) & documents()": (neighborhood((3, 5)) & documents(), (6, 8)),
    "causal() & key_lengths()": (causal() & key_lengths(), (20,)),
    "box blocks, ragged": (topk_blocks((2, 4)) | block_mask((3, 2)), (5, 7)),
    "box blocks 3-D": (block_mask((1, 2, 2)) & documents(), (2, 3, 4)),
    "per_head and key padding": (per_head([causal(), sliding_window(1)]) & key_lengths(), (12,)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_oracle_matches_a_double_loop_per_batch_and_head(name):
    p, shape = CASES[name]
    grid = Grid(shape)
    data = _random_data(p, grid, 2, 2, seed=len(name))
    assert torch.equal(_oracle(p, grid, 2, 2, data), _loop(p, grid, 2, 2, data))


def test_broadcast_data_and_cu_seqlens_in_the_oracle():
    grid = Grid((4, 6))
    p = (block_mask((2, 3)) | causal()) & documents()
    data = {
        "block_mask": torch.rand(1, 2, 4, 4, generator=_gen(2)) < 0.5,
        "cu_seqlens": torch.tensor([0, 5, 17]),
    }
    got = mask(p, grid, 2, data=checked(p, grid, 3, 2, data, CPU))
    assert got.shape == (1, 2, 24, 24)  # nothing varies with the batch
    assert torch.equal(got.expand(3, 2, -1, -1), _loop(p, grid, 3, 2, data))


def test_empty_rows_and_all_empty_layouts():
    grid = Grid((16,))
    p = block_mask(4) & causal()
    layout = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    layout[1, 0, 3, 1] = True  # batch element 1: only the last block of queries sees keys
    keep = _oracle(p, grid, 2, 1, {"block_mask": layout})
    assert not keep[0].any() and keep[1, 0, :12].sum() == 0 and keep[1, 0, 12:, 4:8].all()
    q, k, v = (torch.randn(2, 1, 16, 8, generator=_gen(3)) for _ in "qkv")
    out, lse = reference(q, k, v, p, return_lse=True, data={"block_mask": layout})
    assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[1, 0, :12]).all()
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(out).all()
    padded = reference(q, k, v, key_lengths(), data={"key_lengths": torch.tensor([0, 16])})
    assert not padded[0].any()
    torch.testing.assert_close(padded[1], reference(q, k, v, dense())[1])


def test_the_oracle_needs_the_data_of_each_runtime_leaf():
    with pytest.raises(PatternError, match=r"data\['documents'\] = None"):
        mask(causal() & documents(), Grid((8,)))
    assert mask(causal(), Grid((8,)), data={}).shape == (1, 1, 8, 8)


@st.composite
def runtime_patterns(draw):
    """A static primitive and one or two runtime leaves, joined by union and intersection."""
    grid = draw(st.sampled_from([Grid((12,)), Grid((3, 5)), Grid((2, 2, 3))]))
    heads, batch = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kinds = draw(st.lists(st.sampled_from(["block_mask", "topk_blocks", "documents", "key_lengths"]), min_size=1, max_size=2, unique=True))  # fmt: skip
    leaves = []
    for kind in kinds:
        if kind in ("block_mask", "topk_blocks"):
            flat = st.integers(1, grid.size + 1)
            box = st.tuples(*(st.integers(1, s + 1) for s in grid.shape))
            leaves.append((block_mask if kind == "block_mask" else topk_blocks)(draw(flat | box)))
        else:
            leaves.append(documents() if kind == "documents" else key_lengths())
    ops = [draw(primitives(grid, heads)), *leaves]
    ops = draw(st.permutations(ops))
    split = draw(st.integers(1, len(ops) - 1))
    outer, inner = draw(st.sampled_from([(Union, Intersection), (Intersection, Union)]))
    inner_ops = ops[:split]
    left = inner_ops[0] if len(inner_ops) == 1 else inner(tuple(inner_ops))
    return outer((left, *ops[split:])), grid, heads, batch, draw(st.integers(0, 2**16))


@FEW
@given(case=runtime_patterns())
def test_random_layouts_match_the_loop_the_canonical_form_and_the_analysis_bounds(case):
    p, grid, heads, batch, seed = case
    data = _random_data(p, grid, batch, heads, seed)
    keep = _oracle(p, grid, batch, heads, data)
    assert torch.equal(keep, _loop(p, grid, batch, heads, data))
    canon = canonicalize(p, grid)
    assert {leaf.NAME for leaf in canon.runtime_leaves} == {leaf.NAME for leaf in p.runtime_leaves}
    assert torch.equal(_oracle(canon, grid, batch, heads, data), keep)
    a = analyze(p, grid, 4, 4, heads=heads)
    assert a.data_dependent and a.min_kept_pairs <= a.kept_pairs
    for b in range(batch):
        assert a.min_kept_pairs <= int(keep[b].sum()) <= a.kept_pairs
    tile = torch.as_tensor(a.q_tiling.tile_of_token(grid))
    pairs = (tile[:, None] * a.tile_classes.shape[-1] + tile[None, :]).flatten()
    for h in range(heads):
        classes = torch.as_tensor(a.tile_classes[h if a.tile_classes.shape[0] > 1 else 0]).flatten()[pairs]
        kept = keep[:, h].flatten(1)
        assert not kept[:, classes == EMPTY].any() and kept[:, classes == FULL].all()


def test_the_analysis_bounds_are_reached_by_the_extreme_layouts():
    grid = Grid((16,))
    p = sliding_window(2) | (block_mask(4) & causal())
    a = analyze(p, grid, 4, 4)
    assert a.runtime == ("block_mask",) and a.data_dependent
    for fill, pairs in ((True, a.kept_pairs), (False, a.min_kept_pairs)):
        layout = torch.full((1, 1, 4, 4), fill)
        assert int(mask(p, grid, data=checked(p, grid, 1, 1, {"block_mask": layout}, CPU)).sum()) == pairs
    assert a.min_kept_pairs == int(mask(sliding_window(2), grid).sum())
    static = analyze(sliding_window(2), grid, 4, 4)
    assert not static.data_dependent and static.min_kept_pairs == static.kept_pairs


# --- the reference against static patterns with the same data --------------------------------


def test_the_reference_with_data_matches_static_patterns_per_batch_element_and_head():
    grid, batch, heads = Grid((16,)), 2, 2
    p = (sliding_window(1) | block_mask(4)) & documents() & key_lengths()
    g = _gen(4)
    data = {
        "block_mask": torch.rand(batch, heads, 4, 4, generator=g) < 0.5,
        "documents": torch.randint(0, 2, (batch, 16), generator=g),
        "key_lengths": torch.tensor([11, 16]),
    }
    q, k, v = (torch.randn(batch, heads, 16, 8, generator=g, dtype=torch.float64) for _ in "qkv")
    out, lse = reference(q, k, v, p, return_lse=True, grid=grid, data=data)
    for b, h in np.ndindex(batch, heads):
        static = (
            (sliding_window(1) | block_sparse(data["block_mask"][b, h].int().tolist(), 4))
            & document(data["documents"][b].tolist())
            & key_range(0, hi=int(data["key_lengths"][b]) - 1)
        )
        one = (slice(b, b + 1), slice(h, h + 1))
        want, want_lse = reference(q[one], k[one], v[one], static, return_lse=True, grid=grid)
        torch.testing.assert_close(out[one], want, rtol=0, atol=0)
        torch.testing.assert_close(lse[one], want_lse, rtol=0, atol=0)


def test_the_reference_checks_its_data():
    q = k = v = torch.randn(1, 1, 8, 4)
    with pytest.raises(AttnccError, match=r"data\['documents'\] is missing"):
        reference(q, k, v, documents())
    with pytest.raises(AttnccError, match=r"data key = 'ids' is out of range"):
        reference(q, k, v, causal(), data={"ids": torch.zeros(1, 8)})


# --- analysis and the command line -----------------------------------------------------------


def test_attncc_analyze_says_the_density_is_data_dependent(tmp_path):
    spec = tmp_path / "topk.yaml"
    spec.write_text("pattern: sliding_window(8) | topk_blocks(block=16)\ngrid: [64]\nheads: 2\n")
    result = CliRunner().invoke(cli, ["analyze", str(spec), "--q-tile", "16"])
    assert result.exit_code == 0, result.output
    assert "density                data-dependent (topk_blocks given at call time)" in result.output
    assert "keep if the call's data say so: topk_blocks(block=16)" in result.output
    assert "runtime iteration, boxes" in result.output and "cost model: not shown" in result.output
    box = tmp_path / "box.json"
    box.write_text(
        '{"pattern": {"intersection": ["neighborhood(window=(3, 5))", {"documents": null}]}, "grid": [6, 8]}'
    )
    result = CliRunner().invoke(cli, ["analyze", str(box), "--png", str(tmp_path / "x.png")])
    assert isinstance(result.exception, PatternError) and "--png" in str(result.exception)
    assert not (tmp_path / "x.png").exists()


# --- torch.compile ---------------------------------------------------------------------------


@pytest.mark.skipif(not dynamo.PATTERNS_IN_COMPILE, reason="this torch has no value-type opaque objects")
def test_a_runtime_pattern_built_and_checked_inside_torch_compile_with_no_graph_break():
    def step(layout, topk, cu, lengths):
        p = ((sliding_window(2) | block_mask(4)) & documents() & key_lengths()) | topk_blocks((2, 2))
        data = {"block_mask": layout, "topk_blocks": topk, "cu_seqlens": cu, "key_lengths": lengths}
        return checked(p, Grid((4, 4)), 2, 3, data, layout.device), _text(p, (4, 4), 3)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    g = _gen(5)
    for _ in range(3):  # new values, one trace
        args = (
            torch.rand(2, 1, 4, 4, generator=g) < 0.5,
            torch.randint(-1, 4, (1, 3, 4, 2), generator=g),
            torch.cat(
                [torch.zeros(1, dtype=torch.int64), torch.randint(0, 17, (2,), generator=g).sort().values]
            ),
            torch.randint(0, 17, (2,), generator=g),
        )
        (got, text), (want, want_text) = compiled(*args), step(*args)
        assert text == want_text == "(sliding_window(left=2) | block_mask(block=4)) & documents() & key_lengths() | topk_blocks(block=(2, 2))"  # fmt: skip
        assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)
    assert counter.frame_count == 1
    with pytest.raises(Exception, match=r"block_mask dtype = torch.float32"):
        compiled(args[0].float(), *args[1:])

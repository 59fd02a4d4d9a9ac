"""``@attncc.jit``: traced predicates against the predicate itself, evaluated on integers.

The independent check is the predicate run directly on numpy int64 scalars
(ints whose comparisons give numpy bools, so ``~`` negates) for every (query,
key) pair of a small grid; the traced pattern's brute-force mask must equal it.
Kernels run under the Triton interpreter on the CPU (fp32, tiny shapes).
"""

import itertools
import math
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc
from attncc import TraceError
from attncc.cli import cli
from attncc.ir import (
    Grid,
    analyze,
    band,
    block_diagonal,
    canonicalize,
    causal,
    congruent,
    format_pattern,
    key_range,
    neighborhood,
    parse,
    sliding_window,
)
from attncc.ir.mask import mask
from attncc.lower.lowering import LaunchConfig, lower
from attncc.lower.visits import visited_tiles
from attncc.reference import attention as reference
from attncc.runtime.library import _launches, attention

AXES = ("T", "H", "W")


class _Point:
    """A token's coordinates as numpy int64 scalars (or, for predicates written with torch,
    0-d int64 tensors): what the predicate sees when run directly."""

    def __init__(self, coord, index, names, scalar):
        for name, value in zip(names, coord):
            setattr(self, name, scalar(value))
        self.index = scalar(index)


def direct_mask(fn, grid: Grid, names, scalar=np.int64) -> np.ndarray:
    points = [
        _Point(c, i, [n.lower() for n in names], scalar)
        for i, c in enumerate(itertools.product(*(range(s) for s in grid.shape)))
    ]
    return np.array([[bool(fn(q, k)) for k in points] for q in points])


def local_video(q, k):
    return (abs(q.t - k.t) <= 2) & (abs(q.h - k.h) <= 7) & (abs(q.w - k.w) <= 7)


@pytest.mark.parametrize("shape", [(4, 9, 10), (6, 3, 17), (1, 16, 2)], ids=["4x9x10", "6x3x17", "1x16x2"])
def test_issue_example_matches_the_predicate_on_every_pair(shape):
    grid = Grid(shape)
    traced = attncc.jit(grid=AXES)(local_video)
    pattern = traced.pattern(grid)
    assert torch.equal(mask(pattern, grid)[0], torch.from_numpy(direct_mask(local_video, grid, AXES)))
    if shape == (4, 9, 10):
        assert pattern == band(0, -2, 2) & band(1, -7, 7) & band(2, -7, 7)


def test_issue_example_is_a_range_plan_visiting_exactly_the_non_empty_tiles():
    grid = Grid((6, 20, 24))
    pattern = attncc.jit(grid=AXES)(local_video).pattern(grid)
    plan = lower(pattern, grid, 64, "float16", config=LaunchConfig(64, 32))
    a = analyze(pattern, grid, plan.q_tile, plan.kv_tile)
    assert plan.iteration == "range" and plan.split_full
    assert visited_tiles(plan)[0] == a.partial_tiles + a.full_tiles


PREDICATES = [
    ("per-axis-causal", lambda q, k: k.t <= q.t, band(0, hi=0)),
    ("previous-frames", lambda q, k: (k.t < q.t) & (abs(k.h - q.h) <= 1), band(0, hi=-1) & band(1, -1, 1)),
    ("blocks-and-lattice", lambda q, k: (q.h // 4 == k.h // 4) & (q.w % 3 == k.w % 3), None),
    ("difference-mod", lambda q, k: (k.w - q.w) % 4 <= 1, congruent(2, 4) | congruent(2, 4, 3)),
    ("min-max", lambda q, k: max(q.t, k.t) - min(q.t, k.t) <= 1, band(0, -1, 1)),
    ("negation", lambda q, k: ~(abs(q.w - k.w) > 2), band(2, -2, 2)),
    ("not-equal", lambda q, k: abs(q.t - k.t) != 1, band(0, hi=-2) | band(0, 0, 0) | band(0, lo=2)),
    ("difference-floordiv", lambda q, k: (k.h - q.h + 1) // 3 == 0, band(1, -1, 1)),
    ("unequal-residues", lambda q, k: q.w % 3 != k.w % 3, congruent(2, 3, 1) | congruent(2, 3, 2)),
    ("flat-causal", lambda q, k: k.index <= q.index, causal()),
    ("flat-band", lambda q, k: abs(k.index - q.index) <= 5, sliding_window(5, 5)),
    ("flat-blocks", lambda q, k: q.index // 7 == k.index // 7, None),
    ("flat-residues", lambda q, k: (q.index - k.index) % 5 == 2, None),
    ("constant-true", lambda q, k: True, None),
    ("or-with-constant", lambda q, k: (q.t == k.t) | False, band(0, 0, 0)),
    ("block-causal", lambda q, k: k.t // 2 <= q.t // 2, band(0, hi=0) | block_diagonal(0, 2)),
    ("block-anticausal", lambda q, k: q.h // 2 <= k.h // 2 + 0, band(1, lo=0) | block_diagonal(1, 2)),
    ("flat-block-causal", lambda q, k: k.index // 4 <= q.index // 4, None),
    ("key-range", lambda q, k: k.t < 2, key_range(0, hi=1)),
    ("key-blocks", lambda q, k: k.h // 2 == 1, key_range(1, 2, 3)),
    ("key-not-equal", lambda q, k: k.w != 3, key_range(2, hi=2) | key_range(2, lo=4)),
    ("flat-key-range", lambda q, k: (k.index >= 5) & (k.index < 50), None),
    ("flat-prefix-lm", lambda q, k: (k.index < 16) | (k.index <= q.index), None),
    ("query-condition-always-true", lambda q, k: (q.t >= 0) & (k.t == q.t), band(0, 0, 0)),
    ("huge-modulus", lambda q, k: (k.w - q.w) % 2**40 <= 1, band(2, 0, 1)),
]


@pytest.mark.parametrize("name,fn,expected", PREDICATES, ids=[p[0] for p in PREDICATES])
def test_predicates_match_their_direct_evaluation(name, fn, expected):
    grid = Grid((4, 5, 7))
    pattern = attncc.jit(fn, grid=AXES).pattern(grid)
    assert torch.equal(mask(pattern, grid)[0], torch.from_numpy(direct_mask(fn, grid, AXES)))
    if expected is not None:
        assert pattern == canonicalize(expected, grid)
    assert parse(format_pattern(pattern)) == pattern


SEGMENTS = torch.tensor([0, 0, 1, 1, 1, 2, 2])
DOCUMENTS = torch.tensor([3, 3, 3, 1, 1, 0, 0, 0, 0, 2] * 4)
SHORT = torch.tensor([0, 1])

# The cases of issue 20, on a 1-D grid, and predicates written with torch: run directly on
# 0-d int64 tensors, as torch evaluates them.
TORCH_PREDICATES = [
    ("block-causal", lambda q, k: k.n // 4 <= q.n // 4, causal() | block_diagonal(0, 4), "N", (40,)),
    ("block-causal-index", lambda q, k: k.index // 4 <= q.index // 4, causal() | block_diagonal(0, 4), "N", (40,)),
    ("prefix-lm", lambda q, k: (k.index < 16) | (k.index <= q.index), causal() | key_range(0, hi=15), "N", (40,)),
    ("torch-abs", lambda q, k: torch.abs(q.index - k.index) <= 3, sliding_window(3, 3), "N", (40,)),
    ("abs", lambda q, k: abs(q.index - k.index) <= 3, sliding_window(3, 3), "N", (40,)),
    ("tensor-methods", lambda q, k: (q.t - k.t).abs().le(1) & torch.logical_not(k.w > q.w), band(0, -1, 1) & band(1, hi=0), ("T", "W"), (4, 7)),
    ("torch-min-max", lambda q, k: torch.maximum(q.w, k.w) - torch.minimum(q.w, k.w) <= 1, band(1, -1, 1), ("T", "W"), (4, 7)),
    ("floor-div", lambda q, k: torch.div(k.w - q.w, 3, rounding_mode="floor") == 0, band(1, 0, 2), ("T", "W"), (4, 7)),
    ("lookup-per-axis", lambda q, k: SEGMENTS[q.w] == SEGMENTS[k.w], None, ("T", "W"), (4, 7)),
    ("lookup-flat", lambda q, k: (DOCUMENTS[k.index] == DOCUMENTS[q.index]) & (k.index <= q.index), None, "N", (40,)),
]  # fmt: skip


@pytest.mark.parametrize(
    "name,fn,expected,names,shape", TORCH_PREDICATES, ids=[p[0] for p in TORCH_PREDICATES]
)
def test_torch_predicates_match_their_direct_evaluation(name, fn, expected, names, shape):
    grid = Grid(shape)
    pattern = attncc.jit(fn, grid=names).pattern(grid)
    names = (names,) if isinstance(names, str) else names
    direct = direct_mask(fn, grid, names, scalar=lambda v: torch.tensor(v))
    assert torch.equal(mask(pattern, grid)[0], torch.from_numpy(direct))
    if expected is not None:
        assert pattern == canonicalize(expected, grid)


def test_messages_name_coordinates_as_written():
    with pytest.raises(
        TraceError,
        match=r"cannot express k.index // 4 < q.index // 4 \(as \(k.index // 4\) - \(q.index // 4\) \+ 1 <= 0\): "
        r"only equal blocks \(q.index // 4 == k.index // 4\)",
    ):
        attncc.jit(lambda q, k: k.index // 4 < q.index // 4, grid="N").pattern((32,))
    with pytest.raises(
        TraceError, match=r"\(as \(k.n // 4\) - \(q.n // 4\) \+ 1 <= 0\): only equal blocks \(q.n // 4"
    ):
        attncc.jit(lambda q, k: k.n // 4 < q.n // 4, grid="N").pattern((32,))
    with pytest.raises(
        TraceError, match=r"cannot express q.index \+ k.n <= 3 \(as k.n \+ q.index - 3 <= 0\)"
    ):
        attncc.jit(lambda q, k: q.index + k.n <= 3, grid="N").pattern((32,))


def test_huge_divisors_are_solved_in_closed_form():
    start = time.perf_counter()
    assert attncc.jit(lambda q, k: (k.n - q.n) % 10**8 <= 5, grid="N").pattern((32,)) == sliding_window(0, 5)
    assert attncc.jit(lambda q, k: (k.n - q.n) % 2**40 == 0, grid="N").pattern((32,)) == sliding_window(0, 0)
    assert attncc.jit(lambda q, k: k.n // 2**40 <= q.n // 2**40, grid="N").pattern((32,)) == attncc.ir.dense()
    with pytest.raises(TraceError, match=r"keeps 549755813889 residues mod 1099511627776; at most 8"):
        attncc.jit(lambda q, k: (k.n - q.n) % 2**40 <= 2**39, grid="N").pattern((32,))
    with pytest.raises(TraceError, match=r"keeps 1099511627775 residues mod 1099511627776; at most 8"):
        attncc.jit(lambda q, k: q.n % 2**40 != k.n % 2**40, grid="N").pattern((32,))
    assert time.perf_counter() - start < 1.0  # a loop over range(divisor) takes hours


def test_one_dimensional_index_is_the_axis():
    traced = attncc.jit(lambda q, k: (k.index < q.index) & (q.n - k.n <= 3), grid="N")
    assert traced.pattern((30,)) == band(0, -3, -1)


# --- random predicates from the grammar ---------------------------------------------


def _coordinate(draw, side, rank, index):
    names = ["t", "h", "w"][:rank]
    return f"{side}.{draw(st.sampled_from([*names, 'index'] if index else names))}"


@st.composite
def integer_exprs(draw, names, depth=2):
    """Any expression of the grammar over coordinates ``names``: constants, + - abs min max // %."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        if draw(st.booleans()):
            return str(draw(st.integers(-3, 3)))
        return f"{draw(st.sampled_from('qk'))}.{draw(st.sampled_from(names))}"
    a, b = draw(integer_exprs(names, depth - 1)), draw(integer_exprs(names, depth - 1))
    form = draw(st.sampled_from(["{a} + {b}", "{a} - {b}", "-({a})", "abs({a})", "min({a}, {b})",
                                 "max({a}, {b})", "({a}) // {c}", "({a}) % {c}"]))  # fmt: skip
    return form.format(a=a, b=b, c=draw(st.integers(1, 4)))


@st.composite
def structured_comparisons(draw, rank, index):
    """Comparisons of the shapes that have a pattern, with random constants."""
    x = _coordinate(draw, "q", rank, index).split(".")[1]
    c, m = draw(st.integers(-4, 4)), draw(st.integers(1, 4))
    op = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
    diff = draw(st.sampled_from([f"k.{x} - q.{x}", f"q.{x} - k.{x}", f"k.{x} + {c} - q.{x}"]))
    form = draw(
        st.sampled_from(
            [
                f"{diff} {op} {c}",
                f"abs({diff}) {op} {c}",
                f"{c} {op} {diff}",
                f"min({diff}, {c}) {op} {c}",
                f"max(k.{x}, q.{x}) - min(k.{x}, q.{x}) {op} {abs(c)}",
                f"({diff}) // {m} {op} {c}",
                f"({diff}) % {m} {op} {c}",
                f"q.{x} // {m} == k.{x} // {m}",
                f"q.{x} % {m} {draw(st.sampled_from(['==', '!=']))} k.{x} % {m}",
            ]
        )
    )
    return f"({form})"


@st.composite
def conditions(draw, atoms, depth=2):
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(atoms)
    a, b = draw(conditions(atoms, depth - 1)), draw(conditions(atoms, depth - 1))
    return draw(st.sampled_from([f"({a}) & ({b})", f"({a}) | ({b})", f"~({a})"]))


def _predicate(source: str, direct: bool = False):
    """The predicate with body ``source``; ``direct``: for plain evaluation, where ``min``/``max``
    return int64 scalars too (a Python int would turn ``~(c <= 0)`` into ``~True == -2``)."""
    namespace: dict = {"min": _int64(min), "max": _int64(max)} if direct else {}
    exec(f"def predicate(q, k):\n    return {source}\n", namespace)
    return namespace["predicate"]


def _int64(extreme):
    return lambda *args: np.int64(extreme(*args))


@st.composite
def small_grids(draw):
    rank = draw(st.integers(1, 3))
    caps = {1: 36, 2: 7, 3: 4}[rank]
    return Grid(tuple(draw(st.integers(1, caps)) for _ in range(rank)))


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(data=st.data())
def test_structured_predicates_are_traced_exactly(data):
    grid = data.draw(small_grids())
    index = data.draw(st.booleans())
    source = data.draw(conditions(structured_comparisons(grid.rank, index)))
    fn = _predicate(source)
    names = AXES[: grid.rank]
    expected = direct_mask(_predicate(source, direct=True), grid, names)
    try:
        pattern = attncc.jit(fn, grid=names).pattern(grid)
    except TraceError as e:
        # Only three refusals are possible here: a predicate that keeps nothing, a flat band
        # that leaves the diagonal of a 2-D/3-D grid (e.g. a negated flat band), and unequal
        # blocks (a negated block_diagonal).
        if "keeps no" in str(e):
            assert not expected.any()
        elif "leaves the diagonal" in str(e):
            assert index and grid.rank > 1
        else:
            assert "only equal blocks" in str(e) and "~" in source
        return
    assert torch.equal(mask(pattern, grid)[0], torch.from_numpy(expected)), source


@SETTINGS
@given(data=st.data())
def test_any_predicate_of_the_grammar_is_exact_or_refused(data):
    grid = data.draw(small_grids())
    names = AXES[: grid.rank]
    # Each comparison draws from one axis (and sometimes the index), so that many have a pattern.
    leaves = st.sampled_from([n.lower() for n in names]).map(lambda x: [x]) | st.just(["index", "t"])
    atom = leaves.flatmap(
        lambda used: st.builds(
            lambda a, op, b: f"({a}) {op} ({b})",
            integer_exprs(used),
            st.sampled_from(["<", "<=", ">", ">=", "==", "!="]),
            integer_exprs(used),
        )
    )
    source = data.draw(conditions(atom))
    expected = direct_mask(_predicate(source, direct=True), grid, names)
    try:
        pattern = attncc.jit(_predicate(source), grid=names).pattern(grid)
    except TraceError as e:
        # Refused with a reason (see test_refusals), never a wrong pattern; "keeps nothing" is checked.
        assert "keeps no" not in str(e) or not expected.any(), source
        return
    assert torch.equal(mask(pattern, grid)[0], torch.from_numpy(expected)), source


# --- refusals -------------------------------------------------------------------------


def _if(q, k):
    if q.t <= k.t:
        return q.h == k.h
    return q.w == k.w


REFUSALS = [
    ("query-only", lambda q, k: q.t <= 2, r"cannot express q.t <= 2 .*a condition on the query alone \(q.t\), which holds for some queries only"),
    ("query-blocks", lambda q, k: q.t // 2 == 1, r"condition on the query alone \(q.t\)"),
    ("two-axes", lambda q, k: abs(q.t - k.h) <= 2, r"abs\(q.t - k.h\) <= 2 .*different axes: k.h, q.t"),
    ("l1-ball", lambda q, k: abs(q.t - k.t) + abs(q.h - k.h) <= 2, r"different axes"),
    ("sum", lambda q, k: q.t + k.t <= 3, r"q.t \+ k.t <= 3 .*coefficients differ"),
    ("chained", lambda q, k: 0 <= q.t - k.t <= 2, r"used as a Python bool.*\(a <= b\) & \(b <= c\)"),
    ("and", lambda q, k: (q.t <= k.t) and (q.h <= k.h), r"q.t <= k.t was used as a Python bool"),
    ("not", lambda q, k: not (q.t <= k.t), r"q.t <= k.t was used as a Python bool"),
    ("if", _if, r"q.t <= k.t was used as a Python bool \(and, or, not, if\)"),
    ("precedence", lambda q, k: abs(q.t - k.t) <= 2 & (q.h == k.h), r"2 & q.h == k.h: & and \| join comparisons, and bind tighter"),
    ("precedence-int", lambda q, k: abs(q.t - k.t) <= 2 & abs(q.h - k.h), r"2 & abs\(q.h - k.h\): & and \| join"),
    ("invert-int", lambda q, k: ~q.t == k.t, r"~q.t: ~ negates a comparison"),
    ("and-int", lambda q, k: (q.t == k.t) & 1, r"q.t == k.t & 1: & and \| join comparisons"),
    ("multiply", lambda q, k: 2 * q.t <= k.t, r"multiplication is not in the grammar"),
    ("float", lambda q, k: q.t <= k.t + 0.5, r"k.t \+ 0.5: .*integer constants"),
    ("divide-by-zero", lambda q, k: q.t // 0 == k.t // 0, r"q.t // 0: // takes a positive integer constant"),
    ("divide-by-coordinate", lambda q, k: q.t // k.t == 0, r"q.t // k.t: // takes a positive integer"),
    ("constant-by-coordinate", lambda q, k: 3 % q.t == 0, r"3 % q.t: // and % divide by a constant"),
    ("strictly-ordered-blocks", lambda q, k: q.t // 2 < k.t // 2, r"only equal blocks \(q.t // 2 == k.t // 2\) and block-causal ones \(k.t // 2 <= q.t // 2, or >=\)"),
    ("unequal-blocks", lambda q, k: q.t // 2 != k.t // 2, r"only equal blocks"),
    ("ordered-residues", lambda q, k: q.t % 2 < k.t % 2, r"only equal or unequal residues \(q.t % 2 == / != k.t % 2\)"),
    ("blocks-of-two-axes", lambda q, k: q.t // 2 == k.h // 2, r"the same constant to the same axis"),
    ("residue-of-one-token", lambda q, k: k.t % 2 == 1, r"\(k.t % 2\) is of a coordinate alone"),
    ("mod-of-multiple", lambda q, k: (k.t - q.t + k.t - q.t) % 3 == 0, r"is of a multiple of k - q"),
    ("mixed-atoms", lambda q, k: q.t // 2 + k.t <= 1, r"mixes coordinates with // or % terms"),
    ("floordiv-of-abs", lambda q, k: abs(q.t - k.t) // 2 <= 1, r"abs\(q.t - k.t\) // 2: // of a min, max or abs"),
    ("many-residues", lambda q, k: (k.t - q.t) % 100 <= 50, r"keeps 51 residues mod 100; at most 8"),
    ("many-unequal-residues", lambda q, k: q.t % 10 != k.t % 10, r"keeps 9 residues mod 10"),
    ("flat-off-diagonal", lambda q, k: k.index < q.index, r"k.index - q.index <= -1 leaves the diagonal.* 3-D grid"),
    ("keeps-nothing", lambda q, k: (q.t <= k.t) & (q.t > k.t), r"keeps no \(query, key\) pair"),
    ("no-key", lambda q, k: k.index < 0, r"keeps no \(query, key\) pair: its mask is empty"),
    ("no-query", lambda q, k: (q.t > 3) & (k.t <= q.t), r"keeps no \(query, key\) pair: its mask is empty"),
    ("unknown-torch-function", lambda q, k: torch.sin(q.t) <= k.t, r"torch.sin\(q.t\): not traced; allowed torch functions"),
    ("torch-where", lambda q, k: torch.where(q.t <= k.t, q.t, k.t) <= 1, r"torch.where\(q.t <= k.t, q.t, k.t\): not traced"),
    ("float-tensor-lookup", lambda q, k: torch.zeros(6)[q.w] == k.w, r"tensor\[q.w\]: tensor is <tensor of shape \[6\], float32>; a lookup reads a 1-D integer tensor"),
    ("slice-lookup", lambda q, k: SEGMENTS[:3] == k.w, r"Tensor.eq\(<tensor of shape \[3\], int64>, k.w\): <tensor of shape \[3\], int64> is not a constant"),
    ("short-lookup", lambda q, k: SHORT[q.h] == SHORT[k.h], r"SHORT has 2 entries, but it is read at coordinates up to 4"),
    ("unequal-lookups", lambda q, k: SEGMENTS[q.w] != SEGMENTS[k.w], r"only equal values"),
    ("index-a-coordinate", lambda q, k: q.t[0] == k.t, r"q.t\[0\]: a traced integer cannot be indexed"),
    ("python-error", lambda q, k: {}[q.t] == k.t, r"raised KeyError while tracing"),
    ("constant-false", lambda q, k: False, r"keeps no \(query, key\) pair"),
    ("unknown-axis", lambda q, k: q.x <= k.x, r"q.x: no such coordinate; allowed: t, h, w, index"),
    ("returns-int", lambda q, k: q.t - k.t, r"returned q.t - k.t; allowed: a comparison"),
    ("returns-none", lambda q, k: None, r"returned None"),
    ("min-of-nothing", lambda q, k: min([]) <= q.t, r"min\(\) of nothing"),
]  # fmt: skip


@pytest.mark.parametrize("name,fn,match", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(name, fn, match):
    traced = attncc.jit(fn, grid=AXES)
    with pytest.raises(TraceError, match=rf"@attncc.jit {fn.__name__} on grid 4x5x6: .*" + match):
        traced.pattern(Grid((4, 5, 6)))


@pytest.mark.parametrize(
    "grid,match",
    [
        (("T", "t"), r"jit grid = \('T', 't'\)"),
        (("index",), r"jit grid axis name = 'index'"),
        ((), r"jit grid = \(\).*1 to 3 distinct axis names"),
        (("A", "B", "C", "D"), r"jit grid = \('A', 'B', 'C', 'D'\)"),
        (("x y",), r"jit grid axis name = 'x y'"),
        (3, r"jit grid = 3"),
    ],
    ids=["duplicate", "index", "none", "four", "not-identifier", "not-names"],
)
def test_bad_axis_names(grid, match):
    with pytest.raises(TraceError, match=match):
        attncc.jit(grid=grid)(local_video)


def test_bad_signature_and_grid():
    with pytest.raises(TraceError, match="must take two arguments"):
        attncc.jit(lambda q: q.t == 0, grid=AXES)
    with pytest.raises(TraceError, match=r"grid = \(4, 5\).*3 sizes, for axes t, h, w"):
        attncc.jit(local_video, grid=AXES).pattern((4, 5))
    q = torch.zeros(1, 2, 60, 16)
    with pytest.raises(TraceError, match=r"grid = \(60,\).*3 axes \(t, h, w\).*grid=\(sizes\)"):
        attncc.jit(local_video, grid=AXES)(q, q, q)


def test_min_and_max_stay_the_builtins_outside_the_trace():
    traced = attncc.jit(lambda q, k: max(q.t, k.t) - min(q.t, k.t) <= 1, grid=AXES)
    traced.pattern((3, 4, 5))
    assert min(3, 1) == 1 and max([2, 5]) == 5  # the module's globals were not touched


# --- end to end --------------------------------------------------------------------------


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype=dtype, device=DEVICE) for s in shape]


def test_spatial_call_traces_once_and_reuses_the_kernel():
    calls = []

    def counted(q, k):
        calls.append(1)
        return local_video(q, k)

    traced = attncc.jit(grid=AXES)(counted)
    grid = Grid((3, 5, 6))
    q, k, v = _inputs([(2, *grid.shape, 4, 16), (2, *grid.shape, 2, 16), (2, *grid.shape, 2, 16)])
    out = traced(q, k, v)
    hits = _launches.cache_info().hits
    again = traced(q, k, v)
    assert len(calls) == 1 and _launches.cache_info().hits == hits + 1
    expected = reference(q, k, v, traced.pattern(grid))
    assert out.shape == q.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert torch.equal(out, again)


def test_sdpa_call_with_grid_and_attention_options():
    traced = attncc.jit(lambda q, k: (k.t <= q.t) & (abs(k.h - q.h) <= 1) & (q.w // 4 == k.w // 4), grid=AXES)
    grid = (4, 5, 6)
    n = math.prod(grid)
    q, k, v = _inputs([(1, 2, n, 16), (1, 1, n, 16), (1, 1, n, 16)])
    out, lse = traced(q, k, v, grid=grid, scale=0.3, return_lse=True)
    r, r_lse = reference(q, k, v, traced.pattern(grid), grid=Grid(grid), scale=0.3, return_lse=True)
    torch.testing.assert_close(out, r, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, r_lse, atol=1e-5, rtol=1e-6)


# --- the new primitives in the kernel ---------------------------------------------------

KERNEL_CASES = [
    ("bands-3x5x6", band(0, -1, 1) & band(1, -2, 2) & band(2, -2, 2), Grid((3, 5, 6))),
    ("prefix-lm-range-48", causal() | key_range(0, hi=15), Grid((48,))),
    ("block-causal-range-40", causal() | block_diagonal(0, 8), Grid((40,))),
    ("key-range-causal-time-4x9", key_range(1, 2, 5) & band(0, hi=0), Grid((4, 9))),
    (
        "flat-prefix-lm-table-4x9",
        causal() | key_range(0, hi=0) | key_range(0, 1, 1) & key_range(1, hi=6),
        Grid((4, 9)),
    ),
    ("previous-frames-empty-rows-4x9", band(0, hi=-1) & band(1, -1, 1), Grid((4, 9))),
    ("future-columns-empty-rows-3x11", band(1, lo=2, hi=4), Grid((3, 11))),
    ("two-bands-one-axis-6x5", band(0, lo=1) | band(0, hi=-2), Grid((6, 5))),
    ("block-diagonal-band-5x7", block_diagonal(0, 2) & band(1, -1, 1), Grid((5, 7))),
    ("congruent-causal-time-4x9", congruent(1, 3, 1) & band(0, hi=0), Grid((4, 9))),
    ("strict-causal-in-blocks-table-5x8", block_diagonal(1, 4) & band(1, hi=-1), Grid((5, 8))),
    ("band-and-neighborhood-6x7", band(0, hi=0) & neighborhood((3, 5)), Grid((6, 7))),
]


@pytest.mark.parametrize("name,pattern,grid", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_new_primitives_in_the_kernel(name, pattern, grid):
    q, k, v = _inputs([(2, 2, grid.size, 16), (2, 1, grid.size, 16), (2, 1, grid.size, 16)])
    out = torch.full_like(q, math.nan)  # poisoned: an unwritten element fails
    o, lse = attention(q, k, v, pattern, grid=grid, return_lse=True, out=out)
    r, r_lse = reference(q, k, v, pattern, grid=grid, return_lse=True)
    assert not o.isnan().any()
    torch.testing.assert_close(o, r, atol=1e-5, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse))
    finite = torch.isfinite(r_lse)
    torch.testing.assert_close(lse[finite], r_lse[finite], atol=1e-5, rtol=1e-6)


def test_attncc_analyze_reads_the_traced_pattern(tmp_path):
    pattern = attncc.jit(grid=AXES)(local_video).pattern((8, 24, 24))
    spec = tmp_path / "local_video.yaml"
    spec.write_text(f"pattern: {format_pattern(pattern)}\ngrid: [8, 24, 24]\nheads: 2\nhead_dim: 64\n")
    result = CliRunner().invoke(cli, ["analyze", str(spec)])
    assert result.exit_code == 0, result.output
    assert "band(axis=0, lo=-2, hi=2) & band(axis=1, lo=-7, hi=7)" in result.output
    assert "range iteration" in result.output


GPU_CASES = [
    ("issue-example-8x32x32", None, Grid((8, 32, 32))),
    ("previous-frames-8x32x32", band(0, hi=-1) & band(1, -4, 4) & band(2, -4, 4), Grid((8, 32, 32))),
    (
        "chunks-and-lattice-8x32x32",
        block_diagonal(0, 4) & congruent(1, 4) & band(2, -8, 8),
        Grid((8, 32, 32)),
    ),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,pattern,grid", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_jit_and_new_primitives_on_a_gpu(name, pattern, grid):
    # bf16 rounds P and O to 8 bits: a convex combination of O(1) values is within ~1.5e-2.
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn((2, *grid.shape, h, 64), generator=g, device="cuda", dtype=torch.bfloat16)
        for h in (8, 2, 2)
    )
    if pattern is None:
        traced = attncc.jit(grid=AXES)(local_video)
        out, pattern = traced(q, k, v), traced.pattern(grid)
    else:
        out = attention(q, k, v, pattern)
    torch.testing.assert_close(out.float(), reference(q, k, v, pattern).float(), atol=1.5e-2, rtol=0)

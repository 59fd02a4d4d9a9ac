"""Canonical form and stable hash: one pattern written two ways is one pattern."""

import subprocess
import sys

import networkx as nx
import pytest

from attncc.ir import (
    Grid,
    axial,
    band,
    block_diagonal,
    block_sparse,
    canonicalize,
    causal,
    congruent,
    dense,
    document,
    global_tokens,
    key_range,
    neighborhood,
    parse,
    pattern_hash,
    per_head,
    sliding_window,
    strided,
    to_graph,
)

G2 = Grid((12, 10))
G1 = Grid((40,))

SAME = [
    ("operand-order", neighborhood(3) | causal(), causal() | neighborhood(3), G2),
    (
        "nesting",
        (neighborhood(3) | axial(0)) | global_tokens([1]),
        neighborhood(3) | (axial(0) | global_tokens([1])),
        G2,
    ),
    ("duplicates", neighborhood(3) & neighborhood(3) & causal(), causal() & neighborhood(3), G2),
    ("whole-axis-window", neighborhood(window=(12, 10), stride=(3, 2)), dense(), G2),
    ("dense-identity", neighborhood(3) & dense(), neighborhood(3), G2),
    ("scalar-vs-tuple", neighborhood(3, dilation=2), neighborhood((3, 3), dilation=(2, 2)), G2),
    ("causal-1d-neighborhood", neighborhood(5, causal=True), sliding_window(4, 0), G1),
    ("band-and-causal", sliding_window(6, 3) & causal(), sliding_window(6, 0), G1),
    ("band-union", sliding_window(6, 0) | sliding_window(2, 3), sliding_window(6, 3), G1),
    ("full-band", sliding_window(100, 0), causal(), G1),
    ("per-head-identical", per_head([neighborhood(3), neighborhood(3)]), neighborhood(3), G2),
    ("globals-merge", global_tokens([3]) | global_tokens([1, 3]), global_tokens([1, 3]), G2),
    ("document-ids-renamed", document([5] * 20 + [2] * 20), document([0] * 20 + [1] * 20), G1),
    ("all-ones-layout", block_sparse([[1, 1], [1, 1]], 20), dense(), G1),
    ("axial-1d", axial(), dense(), G1),
    ("stride-1", strided(1), dense(), G1),
    ("axis-band-1d-is-flat", band(0, -6, 3), sliding_window(6, 3), G1),
    ("axis-causal-1d", band(0, hi=0), causal(), G1),
    ("axis-band-wider-than-axis", band(0, -20, 3) & band(1, hi=30), band(0, hi=3), G2),
    (
        "axis-bands-intersect",
        band(1, -3, 5) & band(1, lo=-1) & neighborhood(3),
        band(1, -1, 5) & neighborhood(3),
        G2,
    ),
    ("axis-bands-touching-union", band(0, 1, 2) | band(0, -4, 0), band(0, -4, 2), G2),
    ("axis-bands-apart", band(0, 2, 3) | band(0, -4, -2), band(0, -4, -2) | band(0, 2, 3), G2),
    ("disjoint-axis-bands-keep-nothing", band(0, 2, 3) & band(0, hi=-1) & causal(), band(0, lo=12), G2),
    ("block-of-one-is-the-diagonal", block_diagonal(1, 1), band(1, 0, 0), G2),
    ("block-of-the-axis-is-dense", block_diagonal(1, 10), dense(), G2),
    ("modulus-past-the-axis", congruent(1, 13, 3), band(1, -3, -3) | band(1, 10, 10), Grid((3, 11))),
    ("congruent-1d-is-strided", congruent(0, 4, 1), strided(4, 1), G1),
    ("stride-past-the-sequence", strided(50, 3), band(0, -3, -3), G1),
    ("huge-stride", strided(2**40, 0), sliding_window(0, 0), G1),
    ("key-range-of-the-whole-axis", key_range(0, lo=-3, hi=40), dense(), G1),
    ("key-range-from-0-is-open", key_range(1, lo=0, hi=4), key_range(1, hi=4), G2),
    ("key-ranges-touching-union", key_range(0, hi=3) | key_range(0, 4, 6), key_range(0, hi=6), G2),
    (
        "key-ranges-intersect",
        key_range(1, lo=2) & key_range(1, hi=5) & causal(),
        key_range(1, 2, 5) & causal(),
        G2,
    ),
    ("key-range-past-the-axis-keeps-nothing", key_range(0, lo=12) & causal(), band(0, lo=12), G2),
]


@pytest.mark.parametrize("name,a,b,grid", SAME, ids=[s[0] for s in SAME])
def test_same_pattern_same_canonical_form_and_hash(name, a, b, grid):
    assert canonicalize(a, grid) == canonicalize(b, grid)
    assert pattern_hash(a, grid) == pattern_hash(b, grid)


def test_different_patterns_or_grids_hash_differently():
    hashes = {pattern_hash(p, G2) for p in (neighborhood(3), neighborhood(5), causal(), axial(), dense())}
    assert len(hashes) == 5
    assert pattern_hash(neighborhood(3), G2) != pattern_hash(neighborhood(3), Grid((10, 12)))


def test_hash_is_stable_across_processes(tmp_path):
    text = "neighborhood(window=(7, 7), dilation=(2, 1)) & causal()"
    code = f"from attncc.ir import Grid, parse, pattern_hash; print(pattern_hash(parse({text!r}), Grid((30, 40))))"
    # Run outside the source tree so the installed package is imported.
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, cwd=tmp_path
    )
    assert out.stdout.strip() == pattern_hash(parse(text), Grid((30, 40)))


def test_graph_is_a_dag_sharing_equal_subpatterns():
    shared = neighborhood(3)
    p = (shared & causal()) | (shared & axial(0))
    g = to_graph(p)
    assert nx.is_directed_acyclic_graph(g)
    assert sum(1 for node in g if node == shared) == 1
    assert g.in_degree(shared) == 2


@pytest.mark.parametrize(
    "text",
    [
        "neighborhood(window=(7, 7), dilation=(2, 1)) & causal()",
        "neighborhood(7, 2)",
        "neighborhood(window=[3, 5], causal=[true, false])",
        "(sliding_window(left=127) | strided(stride=128)) & causal()",
        "per_head([neighborhood(window=15), axial(axes=(0,)), dense()])",
        "block_sparse(layout=[[[1, 0], [0, 1]], [[1, 1], [0, 1]]], block=64)",
        "union(causal(), global_tokens(indices=[0, 1]))",
        "document(ids=(0, 0, 1))",
        "band(axis=1, lo=-3, hi=None) & band(2, hi=0) | block_diagonal(0, 4) & congruent(1, 3, offset=2)",
        "causal() | key_range(axis=0, hi=15)",
    ],
)
def test_text_round_trip_by_hand(text):
    p = parse(text)
    assert parse(str(p)) == p
    assert str(parse(str(p))) == str(p)


def test_lists_and_tuples_parse_alike():
    assert parse("neighborhood(window=[7, 7])") == neighborhood((7, 7)) == parse("neighborhood((7, 7))")

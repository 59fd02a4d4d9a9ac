"""NATTEN semantics of `neighborhood`, checked on small cases worked out by hand,
and against an independent transcription of NATTEN's classic window-start rule."""

import pytest
import torch

from attncc.ir import Grid, neighborhood
from attncc.ir.mask import mask


def keys(pattern, grid, query):
    """Flat key indices the brute-force mask gives to a flat query index."""
    return mask(pattern, grid)[0, query].nonzero().flatten().tolist()


@pytest.mark.parametrize(
    "kwargs,length,expected",
    [
        # window 3 on 7 tokens: clamped at both borders, always 3 keys
        ({"window": 3}, 7, {0: [0, 1, 2], 3: [2, 3, 4], 6: [4, 5, 6]}),
        # even window 4: two keys left of centre, one right
        ({"window": 4}, 10, {0: [0, 1, 2, 3], 5: [3, 4, 5, 6], 9: [6, 7, 8, 9]}),
        # dilation 2: groups {0,2,4,6,8} and {1,3,5,7,9}
        ({"window": 3, "dilation": 2}, 10, {0: [0, 2, 4], 4: [2, 4, 6], 9: [5, 7, 9]}),
        # dilation 3 on 10 tokens: groups of 4, 3, 3 tokens
        ({"window": 3, "dilation": 3}, 10, {9: [3, 6, 9], 8: [2, 5, 8], 0: [0, 3, 6]}),
        # stride 2: pairs share the window of their leader (right-of-centre member)
        (
            {"window": 3, "stride": 2},
            8,
            {0: [0, 1, 2], 1: [0, 1, 2], 2: [2, 3, 4], 3: [2, 3, 4], 6: [5, 6, 7], 7: [5, 6, 7]},
        ),
        # stride 4: the leader of {0,1,2,3} is 2
        ({"window": 5, "stride": 4}, 12, {0: [0, 1, 2, 3, 4], 3: [0, 1, 2, 3, 4], 5: [4, 5, 6, 7, 8]}),
        # causal: the window ends at the query and is cut at 0
        ({"window": 3, "causal": True}, 6, {0: [0], 1: [0, 1], 4: [2, 3, 4]}),
        # causal + stride 2: the leader is the group's last member; keys k <= q, leader - k < 3
        ({"window": 3, "causal": True, "stride": 2}, 6, {0: [0], 1: [0, 1], 2: [1, 2], 3: [1, 2, 3]}),
    ],
    ids=[
        "clamp",
        "even-window",
        "dilation-2",
        "dilation-3-uneven",
        "stride-2",
        "stride-4",
        "causal",
        "causal-stride",
    ],
)
def test_one_axis_by_hand(kwargs, length, expected):
    grid = Grid((length,))
    for query, want in expected.items():
        assert keys(neighborhood(**kwargs), grid, query) == want, query


def test_non_causal_sees_exactly_window_keys_per_axis():
    grid = Grid((9, 11))
    m = mask(neighborhood(window=(3, 5), dilation=(2, 2), stride=(2, 3)), grid)[0]
    assert (m.sum(1) == 15).all()


def test_two_axes_are_a_product_with_per_axis_causal():
    grid = Grid((5, 6))
    p = neighborhood(window=(3, 5), causal=(True, False))
    rows = {0: [0], 3: [1, 2, 3], 4: [2, 3, 4]}  # causal along axis 0
    cols = {0: [0, 1, 2, 3, 4], 5: [1, 2, 3, 4, 5], 2: [0, 1, 2, 3, 4]}  # clamped along axis 1
    for r, want_r in rows.items():
        for c, want_c in cols.items():
            want = sorted(a * 6 + b for a in want_r for b in want_c)
            assert keys(p, grid, r * 6 + c) == want


def _classic_window(i, length, kernel, dilation):
    """NATTEN's branchy window start (stride 1, non-causal, odd kernel), transcribed independently."""
    r = kernel // 2
    if dilation <= 1:
        start = max(i - r, 0) + (i + r >= length) * (length - i - r - 1)
    else:
        ni = i - r * dilation
        if ni < 0:
            start = i % dilation
        elif i + r * dilation >= length:
            imodd = i % dilation
            a = (length // dilation) * dilation
            b = length - a
            start = length - b + imodd - 2 * r * dilation if imodd < b else a + imodd - kernel * dilation
        else:
            start = ni
    return [start + t * dilation for t in range(kernel)]


@pytest.mark.parametrize("length", range(1, 25))
def test_matches_natten_classic_window_start(length):
    for dilation in range(1, 5):
        for kernel in range(1, length + 1, 2):
            if kernel * dilation > length:
                continue
            m = mask(neighborhood(kernel, dilation=dilation), Grid((length,)))[0]
            for i in range(length):
                got = m[i].nonzero().flatten().tolist()
                assert got == _classic_window(i, length, kernel, dilation), (length, kernel, dilation, i)


def test_whole_axis_window_is_dense():
    m = mask(neighborhood(window=(4, 6), stride=(3, 2)), Grid((4, 6)))
    assert torch.all(m)

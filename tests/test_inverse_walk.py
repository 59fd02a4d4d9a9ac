"""Note [Inverse iteration]: the dK/dV kernel's Q-tile boxes visit exactly the forward's tile pairs.

Both walks are mirrored here on the host from the plan's closed forms (evaluated
as visits.py does): the forward box of a Q tile, and the inverse box of a KV
tile found by the kernel's bisection rule (first i with last(i) >= k0, first i
with first(i) > k1). The pair sets must be equal for every term and group.
"""

import itertools
import math

import numpy as np
import pytest

from attncc.ir import Grid, axial, causal, neighborhood, sliding_window, strided
from attncc.lower.lowering import LaunchConfig, lower
from attncc.lower.visits import _form

CASES = [
    (neighborhood(5, dilation=2), Grid((23, 19)), (4, 8)),
    (neighborhood((3, 5), stride=(2, 3), causal=(True, False)), Grid((17, 21)), (8, 4)),
    (neighborhood((2, 3, 5), causal=(True, False, False)), Grid((5, 9, 11)), (2, 4, 4)),
    (causal(), Grid((301,)), (32,)),
    (sliding_window(40, 7), Grid((250,)), (16,)),
    (axial(0) | neighborhood(3), Grid((13, 17)), (4, 4)),
    (sliding_window(15, 0) | (strided(16, 3) & causal()), Grid((150,)), (16,)),
]


def _pairs(plan, inverse: bool) -> set:
    pairs = set()
    for g in itertools.product(*(range(d) for d in plan.dilation)):
        lgs = plan.group_lengths(g)
        for term in plan.terms:
            per_axis = []
            for axis, lg, tq, tk in zip(term, lgs, plan.q_tile, plan.kv_tile):
                i = np.arange(lg)
                first, last = _form(axis.first, i, lg), _form(axis.last, i, lg)
                axis_pairs = set()
                if not inverse:
                    for qt in range(math.ceil(lg / tq)):
                        lo, hi = qt * tq, min(qt * tq + tq - 1, lg - 1)
                        axis_pairs |= {(qt, kt) for kt in range(first[lo] // tk, last[hi] // tk + 1)}
                else:
                    for kt in range(math.ceil(lg / tk)):
                        k0, k1 = kt * tk, kt * tk + tk - 1
                        ilo = int(np.argmax(last >= k0)) if (last >= k0).any() else lg
                        ihi = int(np.argmax(first > k1)) if (first > k1).any() else lg
                        if ihi > ilo:
                            axis_pairs |= {(qt, kt) for qt in range(ilo // tq, (ihi - 1) // tq + 1)}
                per_axis.append(axis_pairs)
            for combo in itertools.product(*per_axis):
                pairs.add((g, tuple(c[0] for c in combo), tuple(c[1] for c in combo)))
    return pairs


@pytest.mark.parametrize("pattern,grid,tile", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_inverse_walk_visits_the_forward_pairs(pattern, grid, tile):
    plan = lower(
        pattern, grid, 32, "float32", q_tile=tile, kv_tile=tile, config=LaunchConfig.default("cpu", 32)
    )
    assert plan.iteration == "range"
    forward, inverse = _pairs(plan, False), _pairs(plan, True)
    assert forward and forward == inverse

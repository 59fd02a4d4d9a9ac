"""How many KV tiles a plan's kernel visits: the denominator of its tile-level bound."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np

from attncc.lower.plan import KernelPlan

# The range forms are Triton expressions; on the host tl.minimum/maximum are numpy's.
_HOST = {"tl": SimpleNamespace(minimum=np.minimum, maximum=np.maximum)}


def visited_tiles(plan: KernelPlan, table_entries: int = 0) -> tuple[int, int]:
    """``(visited, dense)`` tile pairs of one head: what the kernel loops over, and
    a dense kernel with tiles of the same token counts would. Table plans pass their entry count."""
    n = math.prod(plan.grid)
    dense = math.ceil(n / plan.block_m) * math.ceil(n / plan.block_n)
    visited = 0
    for group in itertools.product(*(range(d) for d in plan.dilation)):
        lengths = plan.group_lengths(group)  # type: ignore[arg-type]
        q_tiles = [math.ceil(lg / t) for lg, t in zip(lengths, plan.q_tile)]
        if plan.iteration != "range":
            continue
        # Per term and axis, the KV tile interval of every Q tile; the kernel visits their union.
        boxes = []
        for term in plan.terms:
            per_axis = []
            for a, (axis, lg, t_q, t_k, n_q) in enumerate(
                zip(term, lengths, plan.q_tile, plan.kv_tile, q_tiles)
            ):
                lo = np.arange(n_q) * t_q
                hi = np.minimum(lo + t_q - 1, lg - 1)
                first = eval(axis.first, _HOST, {"i": lo, "Lg": lg}) + lo * 0  # forms printed by lowering
                last = eval(axis.last, _HOST, {"i": hi, "Lg": lg}) + hi * 0
                shape = [1, 1, 1]
                shape[a] = n_q
                per_axis.append(((first // t_k).reshape(shape), (last // t_k).reshape(shape)))
            boxes.append(per_axis)
        for size in range(1, len(boxes) + 1):  # inclusion-exclusion over the terms' boxes
            for subset in itertools.combinations(boxes, size):
                count = 1
                for a in range(3):
                    lo = np.maximum.reduce([b[a][0] for b in subset])
                    hi = np.minimum.reduce([b[a][1] for b in subset])
                    count = count * np.maximum(hi - lo + 1, 0)
                visited += (-1) ** (size + 1) * int(np.sum(count))
    return (table_entries if plan.iteration != "range" else visited), dense


def full_tiles(plan: KernelPlan) -> int:
    """Tiles a ``split_full`` plan walks in its unmasked loop (one head), as the kernel computes them."""
    total = 0
    for group in itertools.product(*(range(d) for d in plan.dilation)):
        lengths = plan.group_lengths(group)  # type: ignore[arg-type]
        q_tiles = [math.ceil(lg / t) for lg, t in zip(lengths, plan.q_tile)]
        count = np.ones((1, 1, 1), dtype=np.int64)
        for a, (axis, lg, t_q, t_k, n_q) in enumerate(
            zip(plan.terms[0], lengths, plan.q_tile, plan.kv_tile, q_tiles)
        ):
            lo = np.arange(n_q) * t_q
            hi = np.minimum(lo + t_q - 1, lg - 1)
            first_lo = eval(axis.first, _HOST, {"i": lo, "Lg": lg}) + lo * 0
            last_hi = eval(axis.last, _HOST, {"i": hi, "Lg": lg}) + hi * 0
            inner = eval(axis.first, _HOST, {"i": hi, "Lg": lg}) + hi * 0  # every row sees [inner, outer]
            outer = eval(axis.last, _HOST, {"i": lo, "Lg": lg}) + lo * 0
            f_lo = np.maximum(first_lo // t_k, -(-inner // t_k))
            f_hi = np.minimum(np.minimum(last_hi // t_k, (outer + 1) // t_k - 1), lg // t_k - 1)
            shape = [1, 1, 1]
            shape[a] = n_q
            count = count * np.maximum(f_hi - f_lo + 1, 0).reshape(shape)
        total += int(count.sum())
    return total

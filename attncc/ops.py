"""``attncc.attention``: run a pattern-specialised Triton forward kernel.

The first call with a given (pattern, grid, head dim, dtype) lowers and
renders the kernel; later calls reuse the loaded module and the tile tables.
Heads that share a pattern share one launch (see ``HEAD_MAP`` in the
template); per-head patterns launch once per distinct pattern.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch

from attncc.autotune.records import tuned_config
from attncc.errors import AttnccError, field_error
from attncc.ir.canonical import canonicalize, resolve_heads
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.ir.validate import validate
from attncc.layouts import check_score, to_sdpa_layout
from attncc.lower.lowering import LaunchConfig, lower, table_values, tile_table
from attncc.lower.render import load

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


@cache
def _compiled(
    pattern: Pattern, grid: Grid, head_dim: int, dtype: str, device_type: str, score: str, batch_heads: int
) -> tuple[object, tuple]:
    """Loaded module and host-side tables (numpy) of one head pattern; the config of a
    tuning record (``attncc tune``) when one exists for this launch."""
    tuned = tuned_config(pattern, grid, batch_heads, head_dim, dtype, score, device_type)
    config = tuned or LaunchConfig.default(device_type, head_dim)
    plan = lower(pattern, grid, head_dim, dtype, score=score, config=config)
    module = load(plan)
    if plan.iteration == "table":
        offsets, entries = tile_table(pattern, grid, plan)
        tables = (table_values(pattern, grid), offsets, entries)
    else:
        tables = (np.zeros(1, np.int32),) * 3
    return module, tables


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float | None = None,
    return_lse: bool = False,
    grid: Grid | tuple[int, ...] | None = None,
    out: torch.Tensor | None = None,
    score: str = "softmax",
    sigmoid_bias: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention of ``pattern`` with a fused, pattern-specialised kernel.

    Same layouts and semantics as :func:`attncc.reference.attention`: SDPA
    ``[B, H, N, D]`` (grid from ``grid`` or ``(N,)``) or spatial
    ``[B, *grid, H, D]``; ``k``/``v`` may have fewer heads (GQA/MQA). Returns
    the output in ``q``'s dtype and layout, and with ``return_lse`` the
    natural-log log-sum-exp in float32. ``out`` (same shape and dtype as
    ``q``) receives the result when given. ``score="sigmoid"`` computes
    sigmoid attention (bias default ``-ln(N)``, no log-sum-exp).
    """
    check_score(score, return_lse)
    grid, (qs, ks, vs), restore = to_sdpa_layout(q, k, v, grid)
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        allowed = "float16, bfloat16 or float32, the same for q, k and v"
        raise field_error(AttnccError, "dtype", (q.dtype, k.dtype, v.dtype), allowed)
    if not (q.device == k.device == v.device):
        raise field_error(AttnccError, "device", (q.device, k.device, v.device), "one device for q, k, v")
    b, h, n, d = qs.shape
    heads = validate(pattern, grid, h)
    o = torch.empty_like(q) if out is None else out
    if o.shape != q.shape or o.dtype != q.dtype:
        raise field_error(AttnccError, "out", (tuple(o.shape), o.dtype), f"{tuple(q.shape)} {q.dtype}")
    os_ = restore(o)  # [B, H, N, D] view of the caller's layout
    lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    bias = -math.log(n) if sigmoid_bias is None else float(sigmoid_bias)
    groups: dict[Pattern, list[int]] = {}
    for head, head_pattern in enumerate(resolve_heads(pattern, heads)):
        groups.setdefault(canonicalize(head_pattern, grid), []).append(head)
    for head_pattern, head_ids in groups.items():
        key = (head_pattern, grid, d, _DTYPES[q.dtype], q.device.type, score, b * len(head_ids))
        module, tables = _compiled(*key)
        values, offsets, entries = (torch.from_numpy(t).to(q.device) for t in tables)
        head_map = torch.tensor(head_ids, dtype=torch.int32, device=q.device)
        module.launch(qs, ks, vs, os_, lse, values, offsets, entries, head_map, scale, return_lse, bias)
    if not return_lse:
        return o
    return o, restore.lse(lse)

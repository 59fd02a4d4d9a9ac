"""Launching the decode kernels (issue 16 part 2): a few queries over a long 1-D key sequence.

The host side of attncc.lower.decode: which calls take the decode kernels, the kernels of a
pattern (lowered, rendered and loaded once per process), and one launch: the split count (Note
[Split count] in attncc.autotune.decode, or ``ATTNCC_DECODE_SPLITS``), a list plan's tile lists
(attncc.runtime.decode_lists), the kernel and the merge.

Note [Decode dispatch]: ``attncc.attention`` takes the decode kernels for a forward call (no
input requires grad) whose q covers a part of a 1-D key sequence with at most 64 queries per batch
element (``q[B, H, Lq, D]`` over ``k[B, H_kv, N, D]``, Lq < N; the queries' positions are the
call's ``q_offset``, bottom-right by default), with a softmax score, no dropout, score terms the
decode kernels spell, and one pattern for every head (:func:`takes`). Every other call over a
part of the keys runs the general kernels on a query region (Note [Query regions] in
attncc.lower.plan), which take everything, backward included, at one program per query tile: a
decode step there leaves most of the GPU idle. The library's hook is
``attncc.runtime.library._decode``; its op is ``attncc::decode`` (attncc.runtime.decode_op).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from attncc import settings
from attncc.autotune.cost import device_spec
from attncc.autotune.decode import split_count
from attncc.errors import PatternError, field_error
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.ir.score import parse_score
from attncc.ir.text import format_pattern, parse
from attncc.lower.decode import MAX_QUERIES, MAX_SPLITS, DecodePlan, lower_decode, score_refusal
from attncc.lower.lowering import table_values
from attncc.lower.render import load_decode
from attncc.memo import memo
from attncc.runtime import decode_lists
from attncc.runtime.ops import DTYPES, _broadcast_strides, _output_like, head_groups
from attncc.runtime.progress import log


@torch.compiler.assume_constant_result  # Note [Patterns under torch.compile] in attncc.runtime.dynamo
def takes(grid: tuple[int, ...], region: tuple[int, ...], score: str, pattern: str, heads: int) -> bool:
    """Whether the decode kernels take queries over ``region`` of the keys' ``grid`` with the
    score of text ``score`` and the pattern of text ``pattern`` over ``heads`` heads (Note
    [Decode dispatch]); ``ATTNCC_LOG=info`` says why not. torch.compile calls it once per trace."""
    return _takes(Grid(grid), region, score, pattern, heads)


@memo
def _takes(grid: Grid, region: tuple[int, ...], score: str, pattern: str, heads: int) -> bool:
    reason = None
    if grid.rank != 1:
        reason = f"a rank-{grid.rank} grid {grid.shape}"
    elif region[0] > MAX_QUERIES:
        reason = f"{region[0]} queries (they take 1..{MAX_QUERIES})"
    elif len(head_groups(parse(pattern), grid, heads)) > 1:
        reason = "a pattern per head"
    else:
        reason = score_refusal(parse_score(score))
    if reason:
        log.info("queries over %s of %s: the general kernels, not decode's: %s", region, grid.shape, reason)
    return reason is None


@dataclass(frozen=True, eq=False)  # one per plan: hashed by identity
class DecodeKernel:
    """The loaded decode module of one pattern, its plan, the rule's int32 tables and the
    canonical pattern (a list plan's lists are built from it)."""

    plan: DecodePlan
    module: ModuleType
    values: np.ndarray
    pattern: Pattern


@memo
def kernel(pattern: str, keys: int, queries: int, heads: int, kv_heads: int, head_dim: int,
           dtype: torch.dtype, device_type: str, score: str,
           paged: bool = False) -> DecodeKernel:  # fmt: skip
    """The decode kernels of the pattern with text ``pattern`` (cached per process); ``paged``:
    K/V in a pool of pages (Note [Paged caches] in attncc.lower.decode)."""
    grid = Grid((keys,))
    groups = head_groups(parse(pattern), grid, heads)
    if len(groups) > 1:
        shown = ", ".join(format_pattern(p) for p, _ in groups)
        allowed = "one pattern for every head (per-head patterns run in the general kernels)"
        raise field_error(PatternError, "decode head patterns", shown, allowed)
    canon = groups[0][0]
    plan = lower_decode(
        canon, keys, queries, heads // kv_heads, head_dim, DTYPES[dtype], score, device_type, paged=paged
    )
    log.info("decode %s, %d keys, %d queries: %s plan", format_pattern(canon), keys, queries, plan.iteration)
    return DecodeKernel(plan, load_decode(plan), table_values(canon, grid), canon)


def splits(plan: DecodePlan, batch: int, kv_heads: int, device: torch.device) -> int:
    """The launch's split count: ``ATTNCC_DECODE_SPLITS``, else the cost model's for the device
    (an H100 where there is none), at most one per tile."""
    forced = settings.decode_splits()
    if forced is None:
        forced = split_count(plan, batch, kv_heads, _device_spec(device))
    return max(1, min(forced, plan.kv_tiles, MAX_SPLITS))


def _device_spec(device: torch.device):
    if device.type != "cuda":
        return device_spec()
    props = _properties(device.index if device.index is not None else torch.cuda.current_device())
    return device_spec(props[0], props[1])


@memo
def _properties(index: int) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(index)
    return props.name, props.multi_processor_count


def forward(q, k, v, kern: DecodeKernel, offsets: torch.Tensor, scale: float, params: list[torch.Tensor],
            data: dict[str, torch.Tensor], wrap=None, block_table: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out, lse) of ``q [B, H, Lq, D]`` over ``k, v [B, H_kv, N, D]`` (views, any strides), or
    pools of pages ``[pages, page, H_kv, D]`` read through ``block_table`` (Note [Paged caches] in
    attncc.lower.decode): ``offsets`` [B] int32 each batch element's first query position,
    ``params`` the score terms' tensors (attncc.runtime.terms.inputs, in the plan's order),
    ``data`` the pattern's normalised data (attncc.runtime.data)."""
    plan = kern.plan
    b, h, lq, _ = q.shape
    h_kv = k.shape[1] if block_table is None else k.shape[2]
    n_splits = splits(plan, b, h_kv, q.device)
    o = _output_like(q)
    lse = torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
    if n_splits > 1:
        parts = _buffer((n_splits, b, h, lq, plan.head_dim_padded), q.device)
        part_lse = _buffer((n_splits, b, h, lq), q.device)
    else:  # the kernel writes o and lse directly
        parts, part_lse = o, lse
    terms = [x for t in params for x in (t, *t.stride())]
    runtime = [x for leaf in plan.runtime for x in (data[leaf.kind], *_broadcast_strides(data[leaf.kind]))]
    lists = decode_lists.build(plan, kern.pattern, data, offsets, h, h_kv) if plan.iteration == "list" else ()
    kern.module.launch(
        q, k, v, o, lse, parts, part_lse, offsets, _values(kern, q), n_splits, scale, terms, runtime, lists,
        wrap=wrap, block_table=block_table,
    )  # fmt: skip
    return o, lse


def _buffer(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A float32 buffer of split rows; NaN-filled with ``ATTNCC_POISON=1`` (as ops._output_like)."""
    if settings.poison():
        return torch.full(shape, float("nan"), device=device)
    return torch.empty(shape, device=device)


def _values(kern: DecodeKernel, like: torch.Tensor) -> torch.Tensor:
    """The rule's int32 tables on ``like``'s device (made once per device for real tensors)."""
    if type(like) is torch.Tensor:
        return _cached_values(kern, like.device)
    return torch.as_tensor(kern.values, device=like.device)


@memo
def _cached_values(kern: DecodeKernel, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(kern.values, device=device)

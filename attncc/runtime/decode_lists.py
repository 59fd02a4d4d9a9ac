"""The KV tiles each decode program visits, for ``list`` plans, built on the device per call.

Note [Decode lists]: a ``list`` plan's pattern has block layouts, document ids, global tokens or
a key mask (Note [Decode iteration] in attncc.lower.decode). Per call, for every (batch element,
query head, query) row and every KV tile, this module decides whether the row may keep a key of
the tile, from the pattern's leaves combined as the pattern combines them (a union of leaves
takes either, an intersection both):

- a key interval (causal, windows, key ranges, ...: the plan's spans of the leaf, evaluated
  once per plan at every position on the host): the tiles that meet the row's interval;
- key lengths: the tiles that start before the batch element's length;
- a key mask: the tiles holding a key valid for the row's batch element and head;
- a block layout (``block_mask``, ``topk_blocks`` after attncc.runtime.data, a static
  ``block_sparse``): the tiles holding a key block the row's query block keeps, by prefix sums
  over the layout's row (exact for any block and tile sizes);
- document ids (``documents``, a static ``document``): the tiles whose least and greatest id
  take in the row's id (exact for ids that are sorted, as packed ones are; a superset else);
- global tokens: every tile for a global query, else the tiles holding a global key.

A program's list is the union over its rows (Note [Decode rows]): ``counts [B, H_kv, M_TILES]``
and the tiles, in increasing order, ``lists [B, H_kv, M_TILES, KV_TILES]`` (int32). The kernel
masks each visited tile by the exact rule, so a superset costs loads, never a wrong answer.
Everything is torch ops on the device, in work proportional to rows x tiles, with no host sync
(as attncc.runtime.tables).
"""

from __future__ import annotations

import numpy as np
import sympy
import torch

from attncc.ir import symbolic
from attncc.ir.grid import Grid
from attncc.ir.nodes import (
    BlockMask,
    BlockSparse,
    Document,
    Documents,
    GlobalTokens,
    Intersection,
    KeyLengths,
    KeyMask,
    Pattern,
    TopkBlocks,
    Union,
)
from attncc.lower.decode import DecodePlan, spans_of
from attncc.memo import memo


def build(
    plan: DecodePlan,
    pattern: Pattern,
    data: dict[str, torch.Tensor],
    offsets: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, lists) of ``plan``'s programs for a call (Note [Decode lists]): ``pattern`` is the
    plan's canonical pattern, ``data`` the call's normalised data (attncc.runtime.data),
    ``offsets`` [B] each batch element's first query position."""
    device = offsets.device
    positions = offsets.long()[:, None] + torch.arange(plan.queries, device=device)  # [B, LQ]
    first = torch.arange(plan.kv_tiles, device=device) * plan.block_n  # each tile's first key
    last = torch.clamp(first + plan.block_n - 1, max=plan.keys - 1)
    visits = _visits(pattern, plan, data, positions, first, last)  # [B|1, H|1, LQ|1, tiles]
    batch = offsets.shape[0]
    per_row = visits.expand(batch, heads, plan.queries, plan.kv_tiles)
    group = heads // kv_heads
    rows = per_row.reshape(batch, kv_heads, group, plan.queries, plan.kv_tiles).transpose(2, 3)
    rows = rows.reshape(batch, kv_heads, plan.rows, plan.kv_tiles)  # query-major (Note [Decode rows])
    padded = torch.nn.functional.pad(rows, (0, 0, 0, plan.m_tiles * plan.block_m - plan.rows))
    seen = padded.reshape(batch, kv_heads, plan.m_tiles, plan.block_m, plan.kv_tiles).any(3)
    return _compact(seen)


def _compact(seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``seen`` [..., tiles], its count and its tiles in increasing order (the rest of
    the row unused): positions by a cumulative sum, written by one scatter (Note [Lists without
    a sort] in attncc.runtime.tables)."""
    tiles = seen.shape[-1]
    pos = torch.where(seen, torch.cumsum(seen, -1, dtype=torch.int32) - 1, tiles).long()
    index = torch.arange(tiles, device=seen.device, dtype=torch.int32).expand(seen.shape).contiguous()
    lists = torch.zeros((*seen.shape[:-1], tiles + 1), device=seen.device, dtype=torch.int32)
    lists.scatter_(-1, pos, index)
    return seen.sum(-1, dtype=torch.int32).contiguous(), lists[..., :tiles].contiguous()


def _visits(p: Pattern, plan: DecodePlan, data: dict, positions, first, last) -> torch.Tensor:
    """Whether a row may keep a key of each tile under ``p``: bool ``[B|1, H|1, LQ|1, tiles]``."""
    if isinstance(p, (Union, Intersection)):
        parts = [_visits(op, plan, data, positions, first, last) for op in p.operands]
        out = parts[0]
        for part in parts[1:]:
            out = (out | part) if isinstance(p, Union) else (out & part)
        return out
    if isinstance(p, (BlockMask, TopkBlocks)):
        block = p.block if isinstance(p.block, int) else p.block[0]
        return _block_visits(data[p.NAME], block, positions, first, last)
    if isinstance(p, BlockSparse):
        layout = _constant(("layout", p.layout), positions)[None, None]
        return _block_visits(layout, p.block, positions, first, last)
    if isinstance(p, (Documents, Document)):
        ids = data["documents"] if isinstance(p, Documents) else _constant(("ids", p.ids), positions)[None]
        return _document_visits(ids, positions, plan)
    if isinstance(p, GlobalTokens):
        flags = _constant(("global", p.indices, plan.keys), positions)
        tile_has = _per_tile(flags[None], plan).any(-1)[0]  # [tiles]
        return flags[positions][:, None, :, None] | tile_has
    if isinstance(p, KeyLengths):
        return (first < data["key_lengths"].long()[:, None])[:, None, None, :]
    if isinstance(p, KeyMask):
        flags = data["key_mask"]  # [B', H', N]
        tiled = _per_tile(flags.reshape(-1, plan.keys), plan).any(-1)  # [B' H', tiles]
        return tiled.reshape(*flags.shape[:2], 1, plan.kv_tiles)
    out = None
    for lo, hi in _constant(("spans", p, plan.keys), positions):  # a leaf with a closed form
        f, l_ = lo[positions][:, None, :, None], hi[positions][:, None, :, None]
        part = (f <= l_) & (f <= last) & (l_ >= first)
        out = part if out is None else out | part
    assert out is not None, f"{p} has no interval"
    return out


def _block_visits(layout: torch.Tensor, block: int, positions, first, last) -> torch.Tensor:
    """Tiles holding a key block the row's query block keeps, from a layout ``[B'|1, H', QB, KB]``."""
    batch, blocks = positions.shape[0], layout.shape[-1]
    q_block = torch.clamp(positions // block, max=layout.shape[2] - 1)  # [B, LQ]
    expanded = layout.expand(batch, *layout.shape[1:])
    index = q_block[:, None, :, None].expand(batch, layout.shape[1], positions.shape[1], blocks)
    rows = torch.gather(expanded, 2, index).to(torch.int32)  # [B, H', LQ, KB]
    sums = torch.nn.functional.pad(torch.cumsum(rows, -1, dtype=torch.int32), (1, 0))
    return (sums[..., last // block + 1] - sums[..., first // block]) > 0


def _document_visits(ids: torch.Tensor, positions, plan: DecodePlan) -> torch.Tensor:
    """Tiles whose id range takes in the row's id, from ids ``[B'|1, N]``."""
    tiled = _per_tile(ids, plan)  # [B', tiles, BLOCK_N]
    low, high = tiled.amin(-1)[:, None, None, :], tiled.amax(-1)[:, None, None, :]
    own = torch.gather(ids.expand(positions.shape[0], -1), 1, positions)[:, None, :, None]  # [B, 1, LQ, 1]
    return (low <= own) & (own <= high)


def _per_tile(values: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
    """Per-key values ``[B', N]`` by tile, ``[B', tiles, BLOCK_N]``: the last tile's padding
    repeats its last key's value."""
    keys = torch.clamp(torch.arange(plan.kv_tiles * plan.block_n, device=values.device), max=plan.keys - 1)
    return values[:, keys].reshape(values.shape[0], plan.kv_tiles, plan.block_n)


def _constant(key: tuple, like: torch.Tensor):
    """A static leaf's data on ``like``'s device (made once per device for real tensors; under
    tracing made afresh, as attncc.runtime.ops._int32)."""
    if type(like) is torch.Tensor:
        return _cached(key, like.device)
    return _make(key, like.device)


@memo
def _cached(key: tuple, device: torch.device):
    return _make(key, device)


def _make(key: tuple, device: torch.device):
    """A block layout (int8 [QB, KB]), document ids (int32 [N]), global flags (bool [N]), or a
    closed-form leaf's spans (attncc.lower.decode) at every position, ``((first, last), ...)``
    of int64 [N]."""
    kind, *args = key
    if kind == "layout":
        return torch.tensor(args[0], dtype=torch.int8, device=device)
    if kind == "ids":
        return torch.tensor(args[0], dtype=torch.int32, device=device)
    if kind == "global":
        indices, keys = args
        flags = np.zeros(keys, dtype=bool)
        flags[[i for i in indices if i < keys]] = True
        return torch.as_tensor(flags, device=device)
    leaf, keys = args
    q = np.arange(keys, dtype=np.int64)
    spans = spans_of(symbolic.rules(leaf, Grid((keys,))), keys)
    return tuple(
        tuple(torch.tensor(symbolic.to_numpy(sympy.sympify(e))(q), device=device) for e in span)
        for span in spans
    )

"""Brute-force masks: each primitive's definition, materialised over all pairs.

This is the oracle every other part of attncc is tested against, so it is
written straight from the definitions (see :mod:`attncc.ir.nodes`), one
element at a time in spirit, with no reuse of the symbolic analysis. It costs
O(N^2) memory: use it for tests and references, never in a kernel path.

Primitives whose data are given at call time (Note [Runtime data] in
attncc.ir.nodes) read the normalised data of :func:`attncc.runtime.data.checked`
(one tensor per kind, with a batch dimension), so a mask with data has a batch
dimension too: ``[B or 1, H or 1, N, N]``.

A pattern per pair of segments (Note [Segment spaces] in attncc.ir.segments) has a mask over its
whole space, made of one block per pair of segments: each same-segment pair's :func:`mask` on
that segment's grid, each pair of two segments' :func:`cross_mask`, nothing elsewhere.
"""

from __future__ import annotations

import networkx as nx
import torch

from attncc.errors import PatternError, field_error
from attncc.ir.canonical import resolve_heads, to_graph
from attncc.ir.grid import Grid
from attncc.ir.nodes import (
    Axial,
    Band,
    BlockDiagonal,
    BlockMask,
    BlockSparse,
    Causal,
    Congruent,
    Dense,
    Document,
    Documents,
    GlobalTokens,
    Intersection,
    KeyLengths,
    KeyMask,
    KeyRange,
    Neighborhood,
    Pattern,
    PerHead,
    RuntimePrimitive,
    SlidingWindow,
    Strided,
    TopkBlocks,
    Union,
)
from attncc.ir.segments import BySegments, Segments
from attncc.ir.validate import neighborhood_axes, validate, validate_cross, validate_segments


def coordinates(grid: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[N, rank]`` int64 grid coordinates of every flat token index."""
    axes = [torch.arange(s, device=device) for s in grid.shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, grid.rank)


def neighborhood_axis(
    q: torch.Tensor, k: torch.Tensor, length: int, window: int, dilation: int, stride: int, causal: bool
) -> torch.Tensor:
    """NATTEN's generalized neighborhood rule on one axis, for broadcastable q, k coords."""
    group = q % dilation
    same_group = (k % dilation) == group
    qi, kj = q // dilation, k // dilation  # positions inside the dilation group
    group_len = (length - group + dilation - 1) // dilation
    if causal:
        leader = torch.clamp((qi // stride) * stride + stride - 1, max=group_len - 1)
        keep = (kj <= qi) & (leader - kj < window)
    else:
        left = window // 2
        right = window - 1 - left
        leader = torch.minimum((qi // stride) * stride + stride // 2, group_len - 1)
        centre = torch.minimum(torch.clamp(leader, min=left), group_len - 1 - right)
        keep = (kj >= centre - left) & (kj <= centre + right)
    return keep & same_group


def mask(
    p: Pattern,
    grid: Grid | Segments,
    heads: int | None = None,
    device: torch.device | str = "cpu",
    data: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[H, N, N]`` bool mask, ``mask[h, q, k]`` true where query q sees key k.

    ``H`` is 1 when the pattern is the same for every head, else the head count. With
    ``data`` (the normalised data of :func:`attncc.runtime.data.checked`, on ``device``),
    ``[B, H, N, N]``: ``B`` and ``H`` are 1 where nothing varies with them. A pattern per pair
    of segments takes its space as ``grid`` (``p.space``) and no data.
    """
    if isinstance(p, BySegments):
        return _segments_mask(p, grid, heads, device, data)
    heads = validate(p, grid, heads)
    for leaf in p.runtime_leaves:
        if data is None or leaf.NAME not in data:
            allowed = f"the normalised data of {leaf} (attncc.runtime.data.checked)"
            raise field_error(PatternError, f"data[{leaf.NAME!r}]", None, allowed)
    n = grid.size
    coords = coordinates(grid, device)
    qc, kc = coords[:, None, :], coords[None, :, :]
    qf = torch.arange(n, device=device)[:, None]
    kf = torch.arange(n, device=device)[None, :]
    values: dict[Pattern, torch.Tensor] = {}
    for node in reversed(list(nx.topological_sort(to_graph(p)))):
        values[node] = _leaf_or_combine(node, grid, heads, qc, kc, qf, kf, values, data)
    out = values[p]
    return out if data is None or out.dim() == 4 else out[None]


def cross_mask(
    p: Pattern,
    q_grid: Grid,
    grid: Grid,
    heads: int | None = None,
    device: torch.device | str = "cpu",
    data: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[B or 1, H or 1, Nq, Nk]`` bool mask of ``p`` for queries on ``q_grid`` over keys on
    another grid ``grid`` (Note [Cross-attention] in attncc.runtime.cross): ``p`` compares no
    query's place with a key's (:func:`attncc.ir.validate.validate_cross`), so each pair is kept
    from the key's flat index and the data alone. ``data``: the normalised data of
    :func:`attncc.runtime.data.checked_cross` (``documents`` the keys' ids ``[B, Nk]``,
    ``query_documents`` the queries' ``[B, Nq]``, ``key_lengths`` ``[B]``)."""
    heads = validate_cross(p, q_grid, grid, heads)
    for leaf in p.runtime_leaves:
        for key in ("documents", "query_documents") if isinstance(leaf, Documents) else (leaf.NAME,):
            if data is None or key not in data:
                allowed = f"the normalised data of {leaf} (attncc.runtime.data.checked_cross)"
                raise field_error(PatternError, f"data[{key!r}]", None, allowed)
    n_q, n_k = q_grid.size, grid.size
    keys = torch.arange(n_k, device=device)

    def keep(node: Pattern) -> torch.Tensor:  # [B or 1, 1, Nq or 1, Nk]
        if isinstance(node, Dense):
            return torch.ones(1, 1, 1, n_k, dtype=torch.bool, device=device)
        if isinstance(node, KeyLengths):
            return (keys[None, :] < data["key_lengths"][:, None])[:, None, None, :]
        if isinstance(node, Documents):
            return (data["query_documents"][:, :, None] == data["documents"][:, None, :])[:, None]
        if isinstance(node, KeyRange):
            low = keys >= (node.lo if node.lo is not None else 0)
            return (low & (keys <= (node.hi if node.hi is not None else n_k)))[None, None, None, :]
        parts = [keep(op) for op in node.operands]
        out = parts[0]
        for part in parts[1:]:
            out = (out | part) if isinstance(node, Union) else (out & part)
        return out

    per_head = [keep(head) for head in resolve_heads(p, heads)]
    if len(set(resolve_heads(p, heads))) == 1:
        return per_head[0].expand(-1, 1, n_q, n_k)
    batch = max(m.shape[0] for m in per_head)
    return torch.cat([m.expand(batch, 1, n_q, n_k) for m in per_head], 1)


def _segments_mask(
    p: BySegments, space: Grid | Segments, heads: int | None, device: torch.device | str, data: dict | None
) -> torch.Tensor:
    """``[H or 1, N, N]`` mask of a pattern per pair of segments over its whole space."""
    if space != p.space:
        raise field_error(PatternError, "grid", str(space), f"the pattern's space, {p.space}")
    if data:
        why = "a pattern per pair of segments holds no primitive whose data are given at call time"
        raise field_error(PatternError, "data", sorted(data), "None", why)
    heads = validate_segments(p, heads)
    blocks = []
    for i, j, pattern in p.listed():
        q_grid, k_grid = space.grids[i], space.grids[j]
        keep = (
            mask(pattern, k_grid, heads, device)
            if i == j
            else cross_mask(pattern, q_grid, k_grid, heads, device)[0]
        )
        blocks.append((i, j, keep))
    varies = any(keep.shape[0] > 1 for _, _, keep in blocks)
    out = torch.zeros(heads if varies else 1, space.size, space.size, dtype=torch.bool, device=device)
    starts, sizes = space.offsets, space.sizes
    for i, j, keep in blocks:
        out[:, starts[i] : starts[i] + sizes[i], starts[j] : starts[j] + sizes[j]] = keep
    return out


def _runtime_leaf(node: Pattern, grid: Grid, coords: torch.Tensor, data: dict) -> torch.Tensor:
    """``[B, H, N, N]`` (B and H may be 1) mask of a primitive whose data are given at call time."""
    n = grid.size
    if isinstance(node, (BlockMask, TopkBlocks)):  # both normalised to an int8 layout
        if isinstance(node.block, tuple):  # box blocks, numbered row-major over the grid of blocks
            blk = torch.zeros(n, dtype=torch.long, device=coords.device)
            for a, (size, b) in enumerate(zip(grid.shape, node.block)):
                blk = blk * -(-size // b) + coords[:, a] // b
        else:
            blk = torch.arange(n, device=coords.device) // node.block
        return data[node.NAME][:, :, blk[:, None], blk[None, :]] != 0
    if isinstance(node, Documents):
        ids = data["documents"]  # [B, N]
        return (ids[:, :, None] == ids[:, None, :])[:, None]
    if isinstance(node, KeyLengths):
        lengths = data["key_lengths"]  # [B]
        keys = torch.arange(n, device=coords.device)
        return (keys[None, :] < lengths[:, None])[:, None, None, :].expand(-1, 1, n, n)
    if isinstance(node, KeyMask):
        valid = data["key_mask"] != 0  # [B, H, N]
        return valid[:, :, None, :].expand(-1, -1, n, n)
    raise TypeError(f"no brute-force rule for {type(node).__name__}")


def _leaf_or_combine(node, grid, heads, qc, kc, qf, kf, values, data) -> torch.Tensor:
    n = grid.size
    if isinstance(node, RuntimePrimitive):
        return _runtime_leaf(node, grid, qc[:, 0], data)
    if isinstance(node, Dense):
        return torch.ones(1, n, n, dtype=torch.bool, device=qf.device)
    if isinstance(node, Neighborhood):
        rank = grid.rank
        out = torch.ones(n, n, dtype=torch.bool, device=qf.device)
        for a, (w, d, s, c) in enumerate(neighborhood_axes(node, rank)):
            out &= neighborhood_axis(qc[..., a], kc[..., a], grid.shape[a], w, d, s, c)
        return out[None]
    if isinstance(node, SlidingWindow):
        return ((kf >= qf - node.left) & (kf <= qf + node.right))[None]
    if isinstance(node, Causal):
        return (kf <= qf)[None]
    if isinstance(node, Axial):
        axes = node.axes if node.axes is not None else range(grid.rank)
        out = torch.zeros(n, n, dtype=torch.bool, device=qf.device)
        for a in axes:
            others = [b for b in range(grid.rank) if b != a]
            out |= (qc[..., others] == kc[..., others]).all(-1)
        return out[None]
    if isinstance(node, Strided):
        return ((qf - kf) % node.stride == node.offset)[None]
    if isinstance(node, Band):
        offset = kc[..., node.axis] - qc[..., node.axis]
        keep = torch.ones(n, n, dtype=torch.bool, device=qf.device)
        if node.lo is not None:
            keep &= offset >= node.lo
        if node.hi is not None:
            keep &= offset <= node.hi
        return keep[None]
    if isinstance(node, KeyRange):
        key = kc[..., node.axis]
        keep = torch.ones(n, n, dtype=torch.bool, device=qf.device)
        if node.lo is not None:
            keep &= key >= node.lo
        if node.hi is not None:
            keep &= key <= node.hi
        return keep[None]
    if isinstance(node, BlockDiagonal):
        return (qc[..., node.axis] // node.block == kc[..., node.axis] // node.block)[None]
    if isinstance(node, Congruent):
        return ((qc[..., node.axis] - kc[..., node.axis]) % node.modulus == node.offset)[None]
    if isinstance(node, BlockSparse):
        layout = torch.tensor(node.layout, dtype=torch.bool, device=qf.device)
        if not node.per_head:
            layout = layout[None]
        blocks = torch.arange(n, device=qf.device) // node.block
        return layout[:, blocks[:, None], blocks[None, :]]
    if isinstance(node, GlobalTokens):
        is_global = torch.zeros(n, dtype=torch.bool, device=qf.device)
        is_global[list(node.indices)] = True
        return (is_global[:, None] | is_global[None, :])[None]
    if isinstance(node, Document):
        ids = torch.tensor(node.ids, device=qf.device)
        return (ids[:, None] == ids[None, :])[None]
    if isinstance(node, PerHead):
        # Head h takes head h of its entry (an entry may itself vary by head).
        return torch.cat(
            [values[op][h if values[op].shape[0] > 1 else 0][None] for h, op in enumerate(node.patterns)]
        )
    if isinstance(node, (Union, Intersection)):
        ops = [values[op] for op in node.operands]
        out = ops[0]
        for other in ops[1:]:
            out = (out | other) if isinstance(node, Union) else (out & other)
        return out
    raise TypeError(f"no brute-force rule for {type(node).__name__}")

"""Tile lists built on the device from pattern data given at call time (issue 18).

A ``runtime`` plan (Note [Runtime plans] in attncc.lower.plan) keeps no tile table of its own:
each call classifies every (Q tile, KV tile) pair of every batch element and head as empty,
partial or full from its data, combines those classes as the pattern combines its leaves,
and lists, per Q tile (per KV tile for dK/dV), the full tiles and then the partial ones, as
the kernels walk them. Everything here is torch ops on the device, in work proportional to
the tiles (and, for ids and lengths, to the tokens), with no host synchronisation: no
``.item()``, ``.tolist()`` or ``nonzero``.

Note [Tile classes from data]: a class is exact where it can be and conservative (partial)
where it cannot, never wrong:

- a block layout: a tile pair is full when every block pair it touches is set, empty when
  none is: ``Mq @ layout @ Mk^T`` counts the set block pairs, where ``Mq[t, j]`` is 1 when Q
  tile ``t`` holds a token of block ``j`` (a matmul per batch element and head, exact in
  float32 below 2^24 block pairs);
- document ids: a pair is full when both tiles hold one id, the same; empty when their id
  ranges ``[min, max]`` do not meet (for any ids; packed ids are sorted, so this is exact for
  them);
- key lengths: a KV tile is full for batch element ``b`` when its last token is below
  ``lengths[b]``, empty when its first is not;
- a key mask: a KV tile is full for ``(b, h)`` when every key of it is valid, empty when none
  is (exact; a gather of the flags by tile, work proportional to the tokens), so the lists
  skip a cache's tiles of invalid keys;
- static parts: the exact classes of the analysis (host, once per plan).

A union takes the larger class (empty < partial < full), an intersection the smaller; a tile
pair with padding is never full (the kernels run full tiles without bounds checks).

Note [Lists without a sort]: a row's full tiles go first, then its partial ones: positions
from cumulative sums, written by one scatter (every empty tile to a spare column past the end,
never read). Rows are ``[B', H', tiles, 2]`` counts (full, partial) and ``[B', H', tiles,
other tiles]`` indices, B' and H' being 1 where the data broadcast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from attncc.ir.grid import Grid
from attncc.ir.text import parse
from attncc.lower.lowering import static_classes
from attncc.lower.plan import RANK, KernelPlan, RuntimeLeaf
from attncc.memo import memo

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True, eq=False)
class Geometry:
    """A plan's tiles as tokens: per tile its flat tokens (-1 past the grid) and whether it is
    whole, for the Q and the KV side (host arrays)."""

    q_tokens: np.ndarray  # [Q tiles, BLOCK_M]
    kv_tokens: np.ndarray  # [KV tiles, BLOCK_N]


def _tokens(grid: tuple[int, int, int], box: tuple[int, int, int]) -> np.ndarray:
    """Per tile (row-major over the tiles), its tokens' flat indices in box order, -1 outside."""
    counts = [math.ceil(g / t) for g, t in zip(grid, box)]
    tiles = np.stack(np.meshgrid(*(np.arange(c) for c in counts), indexing="ij"), -1).reshape(-1, RANK)
    offs = np.stack(np.meshgrid(*(np.arange(t) for t in box), indexing="ij"), -1).reshape(-1, RANK)
    coords = tiles[:, None, :] * np.array(box) + offs[None, :, :]  # [tiles, box, 3]
    inside = (coords < np.array(grid)).all(-1)
    flat = np.ravel_multi_index(tuple(np.minimum(coords, np.array(grid) - 1).transpose(2, 0, 1)), grid)
    return np.where(inside, flat, -1)


@memo
def geometry(grid: tuple[int, ...], q_tile: tuple[int, ...], kv_tile: tuple[int, ...]) -> Geometry:
    return Geometry(_tokens(grid, q_tile), _tokens(grid, kv_tile))


@memo
def _device(key: tuple, device: torch.device) -> torch.Tensor:
    """A host array of this module's (``key`` names how it is made) as a device tensor, made once."""
    kind, *args = key
    if kind == "tokens":
        return torch.as_tensor(_tokens(*args), device=device)
    if kind == "incidence":
        return torch.as_tensor(_incidence(*args), device=device)
    raise AssertionError(kind)


def _incidence(grid: tuple[int, int, int], box: tuple[int, int, int], leaf: RuntimeLeaf) -> np.ndarray:
    """``M[t, j]`` = 1 when tile ``t`` holds a token of block ``j`` (float32)."""
    tokens = _tokens(grid, box)
    blocks = leaf_blocks(grid, leaf)
    out = np.zeros((tokens.shape[0], int(blocks.max()) + 1), np.float32)
    rows = np.repeat(np.arange(tokens.shape[0]), tokens.shape[1])
    real = tokens.ravel() >= 0
    out[rows[real], blocks[tokens.ravel()[real]]] = 1.0
    return out


@memo
def _largest_cover(grid: tuple, q_tile: tuple, kv_tile: tuple, leaf: RuntimeLeaf) -> int:
    """The most block pairs one tile pair touches (the largest count of the class matmul)."""
    return int(_incidence(grid, q_tile, leaf).sum(1).max() * _incidence(grid, kv_tile, leaf).sum(1).max())


def leaf_blocks(grid: tuple[int, int, int], leaf: RuntimeLeaf) -> np.ndarray:
    """The block of every flat token of a block leaf (Note [Runtime plans])."""
    flat = np.arange(math.prod(grid))
    if leaf.flat:
        return flat // leaf.block[2]
    coords = np.unravel_index(flat, grid)
    per_axis = [c // b for c, b in zip(coords, leaf.block)]
    return np.ravel_multi_index(per_axis, [math.ceil(g / b) for g, b in zip(grid, leaf.block)])


def _leaf_classes(plan: KernelPlan, leaf: RuntimeLeaf, data: dict[str, torch.Tensor], device) -> torch.Tensor:
    grid = plan.grid
    if leaf.kind in ("block_mask", "topk_blocks"):
        mq = _device(("incidence", grid, plan.q_tile, leaf), device)
        mk = _device(("incidence", grid, plan.kv_tile, leaf), device)
        cover = mq.sum(1)[:, None] * mk.sum(1)[None, :]
        # Counts of 0/1 products are exact in float16 up to 2048: tensor cores on a GPU.
        half = device.type == "cuda" and _largest_cover(grid, plan.q_tile, plan.kv_tile, leaf) <= 2048
        exact = torch.float16 if half else torch.float32
        count = mq.to(exact) @ data[leaf.kind].to(exact) @ mk.to(exact).T
        return torch.where(count == 0, EMPTY, torch.where(count == cover, FULL, PARTIAL)).to(torch.int8)
    if leaf.kind == "documents":
        ids = data["documents"]  # [B', N]
        lo_q, hi_q = _id_range(ids, _device(("tokens", grid, plan.q_tile), device))
        lo_k, hi_k = _id_range(ids, _device(("tokens", grid, plan.kv_tile), device))
        apart = (hi_q[:, :, None] < lo_k[:, None, :]) | (hi_k[:, None, :] < lo_q[:, :, None])
        one = (lo_q == hi_q)[:, :, None] & (lo_k == hi_k)[:, None, :] & (lo_q[:, :, None] == lo_k[:, None, :])
        classes = torch.where(apart, EMPTY, torch.where(one, FULL, PARTIAL)).to(torch.int8)
        return classes[:, None]  # [B', 1, QT, KT]
    if leaf.kind == "key_lengths":
        lengths = data["key_lengths"]  # [B]
        tokens = _device(("tokens", grid, plan.kv_tile), device)
        first = tokens.masked_fill(tokens < 0, torch.iinfo(tokens.dtype).max).amin(1)
        last = tokens.amax(1)
        full = last[None, :] < lengths[:, None]
        empty = first[None, :] >= lengths[:, None]
        classes = torch.where(empty, EMPTY, torch.where(full, FULL, PARTIAL)).to(torch.int8)
        return classes[:, None, None, :]  # [B, 1, 1, KT]
    if leaf.kind == "key_mask":
        tokens = _device(("tokens", grid, plan.kv_tile), device)  # [KT, BLOCK_N]
        real = tokens >= 0
        valid = (data["key_mask"][:, :, tokens.clamp(min=0)] != 0) & real  # [B', H', KT, BLOCK_N]
        count = valid.sum(-1)
        full = count == real.sum(-1)
        classes = torch.where(count == 0, EMPTY, torch.where(full, FULL, PARTIAL)).to(torch.int8)
        return classes[:, :, None, :]  # [B', H', 1, KT]
    raise AssertionError(leaf.kind)


def _id_range(ids: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch row and tile, the least and greatest id of the tile's tokens: ``[B', tiles]``."""
    real = tokens >= 0
    picked = ids[:, tokens.clamp(min=0)]  # [B', tiles, box]
    big = torch.iinfo(ids.dtype).max
    return picked.masked_fill(~real, big).amin(-1), picked.masked_fill(~real, -big).amax(-1)


def tile_classes(
    plan: KernelPlan, statics: tuple[np.ndarray, ...], data: dict[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    """``[B', H', Q tiles, KV tiles]`` int8 classes of a runtime plan's tile pairs (Note [Tile
    classes from data]); ``statics`` are the static parts' classes (attncc.lower.lowering.
    static_classes), in the order of the plan's program."""
    consts = iter(statics)

    def evaluate(node: tuple) -> torch.Tensor:
        op, arg = node
        if op == "static":
            return torch.as_tensor(next(consts), device=device)[None]  # [1, H or 1, QT, KT]
        if op == "leaf":
            return _leaf_classes(plan, next(leaf for leaf in plan.runtime if leaf.kind == arg), data, device)
        parts = [evaluate(child) for child in arg]
        combined = parts[0]
        for part in parts[1:]:
            combined = torch.maximum(combined, part) if op == "or" else torch.minimum(combined, part)
        return combined

    classes = evaluate(plan.program)
    while classes.dim() < 4:
        classes = classes[None]
    geo = geometry(plan.grid, plan.q_tile, plan.kv_tile)
    whole = torch.as_tensor(
        (geo.q_tokens >= 0).all(1)[:, None] & (geo.kv_tokens >= 0).all(1)[None, :], device=device
    )
    return torch.where(whole | (classes < FULL), classes, torch.full_like(classes, PARTIAL))


def tile_lists(classes: torch.Tensor, by_kv: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts ``[B', H', rows, 2]`` of full and partial tiles, indices ``[B', H', rows, cols]``)
    per Q tile, or per KV tile with ``by_kv`` (Note [Lists without a sort])."""
    if by_kv:
        classes = classes.transpose(-1, -2)
    full, part = classes == FULL, classes == PARTIAL
    n_full = full.sum(-1, dtype=torch.int32)
    n_part = part.sum(-1, dtype=torch.int32)
    cols = classes.shape[-1]
    pos = torch.where(
        full,
        torch.cumsum(full, -1, dtype=torch.int32) - 1,
        torch.where(part, n_full[..., None] + torch.cumsum(part, -1, dtype=torch.int32) - 1, cols),
    ).long()
    index = torch.arange(cols, device=classes.device, dtype=torch.int32).expand(classes.shape).contiguous()
    lists = torch.zeros((*classes.shape[:-1], cols + 1), device=classes.device, dtype=torch.int32)
    lists.scatter_(-1, pos, index)
    return torch.stack([n_full, n_part], -1).contiguous(), lists[..., :cols].contiguous()


def build(plan: KernelPlan, statics: tuple[np.ndarray, ...], data: dict[str, torch.Tensor],
          device: torch.device, by_kv: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The tile lists of ``plan`` for this call's ``data`` (Q tiles' lists, or KV tiles')."""
    return tile_lists(tile_classes(plan, statics, data, device), by_kv)


def static_classes_of(plan: KernelPlan, grid: Grid) -> tuple[np.ndarray, ...]:
    """The static parts' classes of ``plan`` in its program's order (host, per plan); none but
    for runtime plans."""
    out: list[np.ndarray] = []
    if plan.iteration != "runtime":
        return ()

    def walk(node: tuple) -> None:
        op, arg = node
        if op == "static":
            out.append(static_classes(parse(arg), grid, plan))
        elif op in ("or", "and"):
            for child in arg:
                walk(child)

    walk(plan.program)
    return tuple(out)

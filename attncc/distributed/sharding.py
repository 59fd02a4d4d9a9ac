"""How a grid's tokens are split across the ranks of a process group (issue 19).

Note [Sharding along the leading axis]: a rank owns whole slices of the grid's leading axis (the
tokens of a sequence, the rows of an image, the frames of a video), so its queries are a query
region of the grid (Note [Query regions] in attncc.lower.plan) that the kernels run as they are.
For a 1-D grid the leading axis is the flat order. ``contiguous`` gives rank ``r`` the ``r``-th
of ``ranks`` equal runs of slices; ``zigzag`` cuts the axis into ``2 * ranks`` chunks and gives
rank ``r`` chunks ``r`` and ``2 * ranks - 1 - r``: under a causal pattern the early chunk's
little work and the late chunk's large work add up to the same amount on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attncc.errors import AttnccError, field_error
from attncc.ir.grid import Grid

ORDERS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Sharding:
    """Tokens split across ``ranks`` ranks along the grid's leading axis, in ``order``
    (``contiguous`` or ``zigzag``: Note [Sharding along the leading axis]).

    The model lays out its activations with it: ``sharding.shard(x, rank, grid)`` is rank
    ``rank``'s part of a whole-grid tensor, ``sharding.unshard(parts, grid)`` puts the parts of
    every rank back in grid order.
    """

    ranks: int
    order: str = "contiguous"

    def __post_init__(self) -> None:
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, int) or self.ranks < 1:
            raise field_error(AttnccError, "Sharding.ranks", self.ranks, "an integer >= 1")
        if self.order not in ORDERS:
            raise field_error(AttnccError, "Sharding.order", self.order, ", ".join(ORDERS))

    @property
    def chunks(self) -> int:
        """Equal chunks the leading axis is cut into."""
        return self.ranks if self.order == "contiguous" else 2 * self.ranks

    def check(self, grid: Grid) -> None:
        """Raise unless the leading axis cuts into :attr:`chunks` equal chunks."""
        if grid.shape[0] % self.chunks:
            allowed = f"a multiple of {self.chunks} ({self.order} over {self.ranks} ranks)"
            raise field_error(AttnccError, "grid.shape[0]", grid.shape[0], allowed)

    def _rank(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.ranks:
            raise field_error(AttnccError, "rank", rank, f"0..{self.ranks - 1}")
        return rank

    def chunk_ids(self, rank: int) -> tuple[int, ...]:
        """The chunks rank ``rank`` owns, in the order its tokens are laid out."""
        rank = self._rank(rank)
        return (rank,) if self.order == "contiguous" else (rank, 2 * self.ranks - 1 - rank)

    def rows(self, rank: int, grid: Grid) -> tuple[tuple[int, int], ...]:
        """Half-open ranges ``[lo, hi)`` of the leading axis that rank ``rank`` owns, one per chunk."""
        self.check(grid)
        size = grid.shape[0] // self.chunks
        return tuple((c * size, (c + 1) * size) for c in self.chunk_ids(rank))

    def owner(self, row: int, grid: Grid) -> int:
        """The rank that owns slice ``row`` of the leading axis."""
        self.check(grid)
        chunk = row // (grid.shape[0] // self.chunks)
        return chunk if chunk < self.ranks else 2 * self.ranks - 1 - chunk

    def tokens(self, rank: int, grid: Grid) -> torch.Tensor:
        """int64 ``[N / ranks]``: the flat tokens of rank ``rank``, in its layout's order."""
        per_row = math.prod(grid.shape[1:])
        return torch.cat([torch.arange(lo * per_row, hi * per_row) for lo, hi in self.rows(rank, grid)])

    def order_index(self, grid: Grid) -> torch.Tensor:
        """int64 ``[N]``: every flat token, rank 0's first, then rank 1's, ... (each in its order)."""
        return torch.cat([self.tokens(r, grid) for r in range(self.ranks)])

    def shard(self, x: torch.Tensor, rank: int, grid: Grid, dim: int = 2) -> torch.Tensor:
        """Rank ``rank``'s part of ``x``, whose dimension ``dim`` holds the grid's flat tokens
        (``[B, H, N, D]``: ``dim=2``; ``[B, N, C]``: ``dim=1``)."""
        if x.shape[dim] != grid.size:
            raise field_error(
                AttnccError, f"x.shape[{dim}]", x.shape[dim], f"{grid.size} (the grid's tokens)"
            )
        return x.index_select(dim, self.tokens(rank, grid).to(x.device))

    def unshard(self, parts: list[torch.Tensor], grid: Grid, dim: int = 2) -> torch.Tensor:
        """The whole-grid tensor of every rank's part (``parts[r]`` from :meth:`shard`)."""
        if len(parts) != self.ranks:
            raise field_error(AttnccError, "len(parts)", len(parts), f"{self.ranks} (one per rank)")
        whole = torch.cat(parts, dim)
        inverse = torch.argsort(self.order_index(grid)).to(whole.device)
        return whole.index_select(dim, inverse)

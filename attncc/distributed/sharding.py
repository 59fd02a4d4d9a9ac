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

import bisect
import math
from dataclasses import dataclass

import torch

from attncc.errors import AttnccError, field_error
from attncc.ir.grid import Grid

ORDERS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Sharding:
    """Tokens split across ``ranks`` ranks along the grid's leading axis, in ``order``
    (``contiguous`` or ``zigzag``: Note [Sharding along the leading axis]), in equal chunks, or,
    contiguous, at ``cuts``: the ``ranks - 1`` rows where a rank's part begins (rank ``r`` owns
    rows ``cuts[r - 1]`` to ``cuts[r] - 1``), as :func:`attncc.distributed.balanced_sharding`
    picks to even the work out.

    The model lays out its activations with it: ``sharding.shard(x, rank, grid)`` is rank
    ``rank``'s part of a whole-grid tensor, ``sharding.unshard(parts, grid)`` puts the parts of
    every rank back in grid order.
    """

    ranks: int
    order: str = "contiguous"
    cuts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, int) or self.ranks < 1:
            raise field_error(AttnccError, "Sharding.ranks", self.ranks, "an integer >= 1")
        if self.order not in ORDERS:
            raise field_error(AttnccError, "Sharding.order", self.order, ", ".join(ORDERS))
        cuts = tuple(self.cuts)
        object.__setattr__(self, "cuts", cuts)
        if not cuts:
            return
        allowed = f"{self.ranks - 1} increasing integers >= 1 (where ranks 1..{self.ranks - 1} begin)"
        if self.order != "contiguous":
            raise field_error(AttnccError, "Sharding.cuts", cuts, "() with order 'zigzag'")
        ints = all(isinstance(c, int) and not isinstance(c, bool) for c in cuts)
        if len(cuts) != self.ranks - 1 or not ints or any(b <= a for a, b in zip((0, *cuts), cuts)):
            raise field_error(AttnccError, "Sharding.cuts", cuts, allowed)

    @property
    def chunks(self) -> int:
        """Chunks the leading axis is cut into (equal ones unless :attr:`cuts` are given)."""
        return self.ranks if self.order == "contiguous" else 2 * self.ranks

    @property
    def even(self) -> bool:
        """Whether every rank holds as many tokens."""
        return not self.cuts

    def check(self, grid: Grid) -> None:
        """Raise unless the leading axis cuts into :attr:`chunks` equal chunks, or past the cuts."""
        if self.cuts and self.cuts[-1] >= grid.shape[0]:
            allowed = f"cuts below the leading axis's {grid.shape[0]} rows"
            raise field_error(AttnccError, "Sharding.cuts", self.cuts, allowed)
        if not self.cuts and grid.shape[0] % self.chunks:
            allowed = f"a multiple of {self.chunks} ({self.order} over {self.ranks} ranks)"
            raise field_error(AttnccError, "grid.shape[0]", grid.shape[0], allowed)

    def bounds(self, grid: Grid) -> tuple[int, ...]:
        """The :attr:`chunks` + 1 rows where the chunks begin, and the axis's end."""
        self.check(grid)
        if self.cuts:
            return (0, *self.cuts, grid.shape[0])
        size = grid.shape[0] // self.chunks
        return tuple(range(0, grid.shape[0] + 1, size))

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
        bounds = self.bounds(grid)
        return tuple((bounds[c], bounds[c + 1]) for c in self.chunk_ids(rank))

    def owner(self, row: int, grid: Grid) -> int:
        """The rank that owns slice ``row`` of the leading axis."""
        chunk = bisect.bisect_right(self.bounds(grid), row) - 1
        return chunk if chunk < self.ranks else 2 * self.ranks - 1 - chunk

    def size(self, rank: int, grid: Grid) -> int:
        """Tokens rank ``rank`` holds."""
        return sum(hi - lo for lo, hi in self.rows(rank, grid)) * math.prod(grid.shape[1:])

    def tokens(self, rank: int, grid: Grid) -> torch.Tensor:
        """int64 ``[size(rank)]``: the flat tokens of rank ``rank``, in its layout's order."""
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

"""Token grids: the coordinate space a pattern is defined over."""

from __future__ import annotations

import math
from dataclasses import dataclass

from attncc.errors import PatternError, field_error

MAX_RANK = 3


@dataclass(frozen=True)
class Grid:
    """A rank 1-3 box of tokens, flattened row-major (last axis fastest).

    ``Grid((T, H, W))`` is a video of T frames of H×W tokens; token
    ``(t, h, w)`` has flat index ``(t * H + h) * W + w``.
    """

    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        shape = self.shape
        if isinstance(shape, int):
            shape = (shape,)
        shape = tuple(shape)
        if not 1 <= len(shape) <= MAX_RANK:
            raise field_error(PatternError, "grid", shape, f"1 to {MAX_RANK} axes")
        for axis, size in enumerate(shape):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise field_error(PatternError, f"grid[{axis}]", size, "an integer >= 1")
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of tokens N."""
        return math.prod(self.shape)

    @property
    def strides(self) -> tuple[int, ...]:
        """Row-major strides: flat index = sum(coord[a] * strides[a])."""
        out = [1] * self.rank
        for a in range(self.rank - 2, -1, -1):
            out[a] = out[a + 1] * self.shape[a + 1]
        return tuple(out)

    def __str__(self) -> str:
        return "x".join(str(s) for s in self.shape)

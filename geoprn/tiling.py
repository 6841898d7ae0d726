"""The scene-wide window grid, blending weights and the blocks Dask schedules.

Windows lie on one grid anchored at the scene origin, whatever the block size. A block
computes every window that touches it (its halo) and keeps only its own pixels, so each output
pixel is the same weighted blend of the same windows in any block layout: no seams, and
results that do not depend on block size or scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

Range = tuple[int, int]
"""A half-open pixel range ``[start, stop)`` on one axis, in scene coordinates."""


def window_origins(length: int, tile: int, overlap: int) -> np.ndarray:
    """Start coordinates of the windows covering an axis of ``length`` pixels.

    The first window starts ``overlap // 2`` before the scene so that edge pixels sit inside a
    window, not on its rim; windows advance by ``tile - overlap`` until the last one reaches
    ``overlap // 2`` past the end. Pixels outside the scene are reflect-padded.
    """
    stride = tile - overlap
    start = -(overlap // 2)
    span = length + overlap // 2 - start
    count = max(1, -(-(span - tile) // stride) + 1)
    return start + stride * np.arange(count)


@lru_cache(maxsize=4)
def blend_weights(tile: int, overlap: int) -> np.ndarray:
    """(tile, tile) float32 weights: 1 in the core, a linear ramp across each overlap.

    Two neighbouring windows' ramps sum to exactly 1 across their overlap; the ramp never
    reaches 0, so every covered pixel has a positive total weight.
    """
    if overlap == 0:
        return np.ones((tile, tile), np.float32)
    i = np.arange(tile, dtype=np.float64) + 0.5
    ramp = np.minimum(1.0, np.minimum(i, tile - i) / overlap)
    weights = np.outer(ramp, ramp).astype(np.float32)
    weights.flags.writeable = False
    return weights


def touching(origins: np.ndarray, span: Range, tile: int) -> np.ndarray:
    """The origins whose windows ``[o, o + tile)`` intersect ``span``."""
    return origins[(origins < span[1]) & (origins + tile > span[0])]


def cover(origins: np.ndarray, span: Range, tile: int) -> Range:
    """The range covered by all windows that touch ``span``."""
    hits = touching(origins, span, tile)
    return int(hits[0]), int(hits[-1]) + tile


@dataclass(frozen=True)
class Block:
    """A rectangle of output pixels that one Dask task computes and writes."""

    row: int
    col: int
    rows: Range
    cols: Range

    @property
    def key(self) -> str:
        return f"{self.row}_{self.col}"


def block_grid(height: int, width: int, block_size: int) -> list[Block]:
    """Blocks of ``block_size`` pixels tiling the scene (the last row and column clipped)."""
    return [
        Block(r, c, (y, min(y + block_size, height)), (x, min(x + block_size, width)))
        for r, y in enumerate(range(0, height, block_size))
        for c, x in enumerate(range(0, width, block_size))
    ]

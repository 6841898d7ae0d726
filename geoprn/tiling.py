"""The scene-wide window grid, blending weights and the blocks Dask schedules.

Windows lie on one grid anchored at the scene origin, whatever the block size. A block
blends every window that touches it (its halo) and keeps only its own pixels, so each output
pixel is the same weighted blend of the same windows in any block layout: no seams, and
results that do not depend on block size or scheduler.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

Range = tuple[int, int]
"""A half-open pixel range ``[start, stop)`` on one axis, in scene coordinates."""

DEFAULT_BLOCK_SIZE = 4096
"""``refine``'s block side. A block blends the windows its halo shares with its neighbours;
run one after another in a process, blocks take them from a cache
(:class:`geoprn.inference.WindowCache`), otherwise they are computed again. On a 100,000 px
square scene at overlap 64 base + PRN run 1.12 and 1.04 times the windows that cover the scene
once with 4096 blocks (1.21 and 1.08 with 2048; 1.78 and 1.26 without the cache), and every
window once up to 40,000 px square; a 4096 block costs 83 MiB more peak memory than a 2048 one
on a 6000 px scene (``benchmarks/throughput.py``, ``benchmarks/memory.py``)."""


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


def _ramp(tile: int, overlap: int) -> np.ndarray:
    """(tile,) float64 weights along one axis: 1 in the core, a linear ramp across each
    overlap that never reaches 0."""
    i = np.arange(tile, dtype=np.float64) + 0.5
    return np.minimum(1.0, np.minimum(i, tile - i) / overlap)


@lru_cache(maxsize=4)
def blend_weights(tile: int, overlap: int) -> np.ndarray:
    """(tile, tile) float32 weights: 1 in the core, a linear ramp across each overlap.

    Two neighbouring windows' ramps sum to exactly 1 across their overlap; the ramp never
    reaches 0, so every covered pixel has a positive total weight.
    """
    if overlap == 0:
        return np.ones((tile, tile), np.float32)
    ramp = _ramp(tile, overlap)
    weights = np.outer(ramp, ramp).astype(np.float32)
    weights.flags.writeable = False
    return weights


def weight_sums(origins: np.ndarray, span: Range, tile: int, overlap: int) -> np.ndarray:
    """(len(span),) float32: the summed ramps of the windows at ``origins`` over ``span``.

    A grid of windows' :func:`blend_weights` sum to the outer product of the row and column
    sums, so blending needs two vectors instead of a weight plane accumulated window by window.
    """
    ramp = _ramp(tile, overlap).astype(np.float32) if overlap else np.ones(tile, np.float32)
    sums = np.zeros(span[1] - span[0], np.float32)
    for o in origins:
        a, b = max(int(o), span[0]), min(int(o) + tile, span[1])
        sums[a - span[0] : b - span[0]] += ramp[a - o : b - o]
    return sums


def touching(origins: np.ndarray, span: Range, tile: int) -> np.ndarray:
    """The origins whose windows ``[o, o + tile)`` intersect ``span``."""
    return origins[(origins < span[1]) & (origins + tile > span[0])]


def cover(origins: np.ndarray, span: Range, tile: int) -> Range:
    """The range covered by all windows that touch ``span``."""
    hits = touching(origins, span, tile)
    return int(hits[0]), int(hits[-1]) + tile


def axis_regions(origins: np.ndarray, span: Range, tile: int, stages: int) -> list[Range]:
    """Along one axis, the ranges a chain of ``stages`` windowed models reads and fills to
    produce ``span``: the first stage's input, then each stage's output, the last ``span``."""
    ranges = [span]
    for _ in range(stages):
        ranges.insert(0, cover(origins, ranges[0], tile))
    return ranges


def stage_regions(
    origins: tuple[np.ndarray, np.ndarray], rows: Range, cols: Range, tile: int, stages: int
) -> list[tuple[Range, Range]]:
    """The (rows, cols) regions a chain of ``stages`` windowed models reads and fills.

    Each stage runs the windows touching the region the next stage needs (its halo), so the
    last stage's values over ``rows`` x ``cols`` are those of the scene-wide blend.

    Returns:
        ``stages + 1`` regions, outermost first: the first stage's input, then each stage's
        output, the last being ``(rows, cols)``.
    """
    return list(
        zip(
            axis_regions(origins[0], rows, tile, stages),
            axis_regions(origins[1], cols, tile, stages),
            strict=True,
        )
    )


def window_uses(origins: np.ndarray, spans: list[Range], tile: int, stages: int) -> np.ndarray:
    """(stages, len(origins)) int: along one axis, how many of the blocks spanning ``spans``
    run each window in each stage. A window's uses in the scene are its row count times its
    column count; a window used more than once is shared by neighbouring blocks' halos."""
    uses = np.zeros((stages, len(origins)), int)
    for span in spans:
        for k, (start, stop) in enumerate(axis_regions(origins, span, tile, stages)[1:]):
            uses[k] += (origins < stop) & (origins + tile > start)
    return uses


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


def serpentine(blocks: list[Block]) -> list[Block]:
    """``blocks`` row by row, every other row reversed: each block follows a neighbour, and
    the windows a row of blocks shares with the next are needed in the reverse of the order
    they were computed in, newest first (what a cache that drops its oldest entries keeps)."""
    rows: dict[int, list[Block]] = {}
    for block in blocks:
        rows.setdefault(block.row, []).append(block)
    return [
        block
        for r, row in enumerate(sorted(rows))
        for block in sorted(rows[row], key=lambda b: b.col, reverse=r % 2 == 1)
    ]


def lanes(blocks: list[Block], count: int) -> list[list[Block]]:
    """``blocks`` in :func:`serpentine` order, cut into ``count`` runs of neighbours, as even as
    possible (fewer when there are fewer blocks)."""
    ordered = serpentine(blocks)
    count = max(1, min(count, len(ordered)))
    size, extra = divmod(len(ordered), count)
    starts = [i * size + min(i, extra) for i in range(count + 1)]
    return [ordered[a:b] for a, b in itertools.pairwise(starts)]

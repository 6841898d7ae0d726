"""The window grid covers every pixel with margin, blends to one, and blocks tile the scene."""

import numpy as np
import pytest

from geoprn.inference import windows_run
from geoprn.tiling import (
    blend_weights,
    block_grid,
    cover,
    lanes,
    serpentine,
    stage_regions,
    touching,
    weight_sums,
    window_origins,
)


@pytest.mark.parametrize("length", [16, 300, 447, 511, 512, 513, 700, 1024, 1500, 20_001])
@pytest.mark.parametrize("overlap", [0, 64, 128])
def test_windows_cover_every_pixel_with_margin(length, overlap):
    tile = 512
    origins = window_origins(length, tile, overlap)
    assert np.all(np.diff(origins) == tile - overlap)
    margin = overlap // 2
    assert origins[0] <= -margin
    assert origins[-1] + tile >= length + margin
    # the grid holds no window that lies wholly in the padding
    assert origins[-1] < length and origins[0] + tile > 0


def test_blend_weights_are_a_partition_of_unity_across_overlaps():
    tile, overlap = 512, 64
    w = blend_weights(tile, overlap)[0] / blend_weights(tile, overlap)[0].max()
    stride = tile - overlap
    line = np.zeros(stride * 3 + tile)
    for k in range(4):
        line[k * stride : k * stride + tile] += w
    interior = line[overlap : 3 * stride + tile - overlap]
    np.testing.assert_allclose(interior, 1.0, atol=1e-6)
    assert w.min() > 0


def test_cover_contains_every_window_touching_a_span():
    origins = window_origins(3000, 512, 64)
    span = (1024, 1536)
    hits = touching(origins, span, 512)
    lo, hi = cover(origins, span, 512)
    assert lo == hits.min() and hi == hits.max() + 512
    assert all(o < span[1] and o + 512 > span[0] for o in hits)
    others = np.setdiff1d(origins, hits)
    assert all(o >= span[1] or o + 512 <= span[0] for o in others)


@pytest.mark.parametrize("shape", [(300, 700), (513, 513), (2048, 4096), (5000, 1234)])
def test_blocks_tile_the_scene_exactly_once(shape):
    count = np.zeros(shape, np.int32)
    blocks = block_grid(*shape, 1024)
    for b in blocks:
        count[slice(*b.rows), slice(*b.cols)] += 1
    assert np.all(count == 1)
    assert len({b.key for b in blocks}) == len(blocks)


@pytest.mark.parametrize("overlap", [0, 64, 128])
def test_weight_sums_are_the_accumulated_blend_weights(overlap):
    tile, rows, cols = 512, (-(overlap // 2), 1100), (300, 1500 + overlap // 2)
    origins = window_origins(1500, tile, overlap)
    ys, xs = touching(origins, rows, tile), touching(origins, cols, tile)
    plane = np.zeros((rows[1] - rows[0], cols[1] - cols[0]), np.float64)
    for y in ys:
        for x in xs:
            a, b, c, d = (
                max(y, rows[0]),
                min(y + tile, rows[1]),
                max(x, cols[0]),
                min(x + tile, cols[1]),
            )
            plane[a - rows[0] : b - rows[0], c - cols[0] : d - cols[0]] += blend_weights(
                tile, overlap
            )[a - y : b - y, c - x : d - x]
    outer = np.outer(weight_sums(ys, rows, tile, overlap), weight_sums(xs, cols, tile, overlap))
    np.testing.assert_allclose(outer, plane, rtol=1e-6)
    assert outer.min() > 0


def test_stage_regions_grow_by_a_halo_per_stage_and_windows_run_counts_them():
    origins = (window_origins(3000, 512, 64),) * 2
    regions = stage_regions(origins, (1024, 2048), (0, 1024), 512, 2)
    assert regions[-1] == ((1024, 2048), (0, 1024))
    for (outer_rows, outer_cols), (inner_rows, inner_cols) in zip(
        regions, regions[1:], strict=False
    ):
        assert outer_rows == cover(origins[0], inner_rows, 512)
        assert outer_cols == cover(origins[1], inner_cols, 512)
    # one block covering the scene runs every window of the grid once per stage; smaller
    # blocks rerun their halos' windows unless a cache of windows shares them
    once = 2 * len(origins[0]) ** 2
    assert windows_run(origins, block_grid(3000, 3000, 4096), 512, 2) == [once // 2] * 2
    blocks = block_grid(3000, 3000, 1024)
    alone = sum(windows_run(origins, blocks, 512, 2))
    assert alone > once
    assert sum(windows_run(origins, blocks, 512, 2, cache_bytes=1 << 30)) == once
    assert once < sum(windows_run(origins, blocks, 512, 2, cache_bytes=32 << 20)) < alone


def test_serpentine_order_visits_each_block_once_from_neighbour_to_neighbour():
    blocks = block_grid(3000, 2500, 1024)  # 3 x 3
    ordered = serpentine(blocks[::-1])
    assert sorted(b.key for b in ordered) == sorted(b.key for b in blocks)
    assert [b.key for b in ordered[:6]] == ["0_0", "0_1", "0_2", "1_2", "1_1", "1_0"]
    for a, b in zip(ordered, ordered[1:], strict=False):
        assert abs(a.row - b.row) + abs(a.col - b.col) == 1


def test_lanes_cut_the_serpentine_into_even_runs_of_neighbours():
    blocks = block_grid(3 * 512, 4 * 512, 512)  # 12 blocks
    runs = lanes(blocks, 5)
    assert [b for run in runs for b in run] == serpentine(blocks)
    assert [len(run) for run in runs] == [3, 3, 2, 2, 2]
    assert lanes(blocks, 40) == [[b] for b in serpentine(blocks)]
    assert lanes(blocks, 0) == [serpentine(blocks)]

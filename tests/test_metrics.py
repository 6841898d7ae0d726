"""Metrics: confusion counts and IoU, Boundary IoU bands, pooling, and a real-tile reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.io
from scipy import ndimage
from skimage.morphology import disk, erosion

from geoprn.metrics import (
    BoundaryCounts,
    Confusion,
    boundary_band,
    boundary_confusion,
    boundary_counts,
    confusion,
    evaluate,
    summary,
)

MASS_TEST = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "massachusetts" / "test"
)
REAL_TILE = "17278960_15.png"  # about 45% of it is white (no imagery): a real nodata mask

PRED = np.array(
    [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 1],
    ],
    dtype=bool,
)
TRUTH = np.array(
    [
        [1, 0, 0, 0],
        [1, 1, 1, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
    ],
    dtype=bool,
)


def square(top: int = 5, left: int = 5, size: int = 10, shape: tuple[int, int] = (20, 20)):
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


# --- confusion -----------------------------------------------------------------------------


def test_confusion_by_hand():
    conf = confusion(PRED, TRUTH)
    # TP (0,0) (1,0) (1,1); FP (0,1) (3,3); FN (1,2); the other 10 pixels are TN.
    assert conf == Confusion(tp=3, fp=2, fn=1, tn=10)
    assert conf.road_iou == pytest.approx(3 / 6)
    assert conf.background_iou == pytest.approx(10 / 13)
    assert conf.miou == pytest.approx((3 / 6 + 10 / 13) / 2)


def test_confusion_accepts_0_1_and_0_255():
    assert confusion(PRED.astype(np.uint8), TRUTH.astype(np.uint8) * 255) == confusion(PRED, TRUTH)


def test_invalid_pixels_count_nowhere():
    valid = np.ones((4, 4), dtype=bool)
    valid[3, 3] = False  # a false positive
    valid[1, 2] = False  # the false negative
    conf = confusion(PRED, TRUTH, valid)
    assert conf == Confusion(tp=3, fp=1, fn=0, tn=10)
    assert conf.road_iou == pytest.approx(3 / 4)
    assert conf.background_iou == pytest.approx(10 / 11)
    assert conf.miou == pytest.approx((3 / 4 + 10 / 11) / 2)
    assert confusion(PRED, TRUTH, np.zeros((4, 4), dtype=bool)) == Confusion()


def test_empty_classes_score_one():
    empty = np.zeros((4, 4), dtype=bool)
    conf = confusion(empty, empty)
    assert conf == Confusion(tn=16)
    assert conf.road_iou == 1.0
    assert conf.miou == 1.0
    assert confusion(~empty, ~empty).background_iou == 1.0
    assert confusion(~empty, empty).road_iou == 0.0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        confusion(PRED, TRUTH[:3])
    with pytest.raises(ValueError, match="shape"):
        boundary_counts(PRED, TRUTH, np.ones((4, 5), dtype=bool))
    with pytest.raises(ValueError, match="2-D"):
        confusion(PRED[None], TRUTH[None])


def test_per_tile_confusions_pool_to_the_whole():
    rng = np.random.default_rng(0)
    pred, truth, valid = (rng.random((3, 64, 96)) < p for p in (0.3, 0.2, 0.9))
    whole = confusion(pred.reshape(-1, 96), truth.reshape(-1, 96), valid.reshape(-1, 96))
    tiles = [confusion(p, t, v) for p, t, v in zip(pred, truth, valid, strict=True)]
    assert sum(tiles, Confusion()) == whole
    assert sum(tiles) == whole
    assert whole.tp + whole.fp + whole.fn + whole.tn == int(valid.sum())
    assert tiles[0] != whole


# --- boundary bands ------------------------------------------------------------------------


def test_band_of_a_square_by_hand():
    sq = square()  # rows and columns 5..14 of a 20 x 20 tile
    ring1 = sq & ~square(6, 6, 8)
    assert np.array_equal(boundary_band(sq, 1), ring1)
    assert boundary_band(sq, 1).sum() == 36  # the outer ring of the 10 x 10 square
    assert boundary_band(sq, 2).sum() == 100 - 36  # all but the 6 x 6 core
    assert not boundary_band(sq, 0).any()
    # Background band: the 4-neighbours of the square; its corners are sqrt(2) away, so they
    # join at d=2, together with the second ring of the sides (sqrt(5) corners stay out).
    assert boundary_band(~sq, 1).sum() == 40
    assert boundary_band(~sq, 2).sum() == 40 + 4 + 40
    with pytest.raises(ValueError):
        boundary_band(sq, -1)


def test_boundary_iou_of_a_shifted_square_by_hand():
    truth, pred = square(), square(left=6)
    # Road rings (36 px each) share 9 px of the top row and 9 of the bottom row.
    assert boundary_confusion(pred, truth, d=1) == (18, 36 + 36 - 18)
    # Background bands (40 px each) share the same 9 + 9 px of rows 4 and 15.
    bnd = boundary_counts(pred, truth, d=1)
    assert bnd == BoundaryCounts(road_inter=18, road_union=54, bg_inter=18, bg_union=62)
    assert bnd.road_biou == pytest.approx(1 / 3)
    assert bnd.background_biou == pytest.approx(18 / 62)
    assert bnd.mba == pytest.approx((1 / 3 + 18 / 62) / 2)


def test_identical_and_disjoint_masks():
    sq = square()
    same = boundary_counts(sq, sq, d=2)
    assert same.road_inter == same.road_union == 64
    assert same.mba == 1.0
    a, b = square(0, 0, 5), square(12, 12, 5)
    inter, union = boundary_confusion(a, b, d=2)
    assert inter == 0
    assert union > 0
    assert boundary_counts(a, b, d=2).road_biou == 0.0


def test_empty_and_full_masks_have_no_band():
    empty = np.zeros((8, 8), dtype=bool)
    assert not boundary_band(empty, 3).any()
    assert not boundary_band(~empty, 3).any()
    bnd = boundary_counts(empty, empty)
    assert bnd == BoundaryCounts()
    assert bnd.mba == 1.0


def test_tile_edge_is_not_a_boundary():
    strip = np.zeros((20, 20), dtype=bool)
    strip[:, 8:12] = True  # a road crossing the tile from top to bottom
    band = boundary_band(strip, 1)
    expected = np.zeros_like(strip)
    expected[:, [8, 11]] = True  # its sides only: no band along rows 0 and 19
    assert np.array_equal(band, expected)
    assert not band[[0, 19], 9:11].any()

    left = np.zeros((20, 20), dtype=bool)
    left[:, :4] = True  # a road along the left edge of the tile
    assert np.array_equal(np.flatnonzero(boundary_band(left, 2).any(axis=0)), [2, 3])
    assert boundary_band(left, 2).sum() == 2 * 20
    assert boundary_band(~left, 2).sum() == 2 * 20  # columns 4 and 5


def test_valid_restricts_counting_not_the_band():
    sq = square()
    valid = np.zeros_like(sq)
    valid[:, :10] = True
    # Only the left half of the ring counts: 5 + 5 px of the top and bottom rows, and 8 px of
    # column 5. Column 9 is no boundary: bands are computed on the full masks.
    inter, union = boundary_confusion(sq, sq, valid, d=1)
    assert inter == union == 18
    bnd = boundary_counts(sq, square(left=6), valid, d=1)
    band_t, band_p = boundary_band(sq, 1), boundary_band(square(left=6), 1)
    assert bnd.road_inter == (band_t & band_p & valid).sum()
    assert bnd.road_union == ((band_t | band_p) & valid).sum()


def test_boundary_counts_pool():
    a, b = boundary_counts(square(), square(left=6), d=1), boundary_counts(square(), square())
    pooled = sum([a, b], BoundaryCounts())
    assert pooled == BoundaryCounts(
        a.road_inter + b.road_inter,
        a.road_union + b.road_union,
        a.bg_inter + b.bg_inter,
        a.bg_union + b.bg_union,
    )
    assert sum([a, b]) == pooled


def test_evaluate_and_summary():
    conf, bnd = evaluate(square(left=6), square(), d=1)
    assert conf == confusion(square(left=6), square())
    assert bnd == boundary_counts(square(left=6), square(), d=1)
    scores = summary(conf, bnd)
    assert set(scores) == {"road_iou", "miou", "mba"}
    assert scores["road_iou"] == pytest.approx(90 / 110)
    assert scores["miou"] == pytest.approx((90 / 110 + 290 / 310) / 2)
    assert scores["mba"] == pytest.approx((1 / 3 + 18 / 62) / 2)


# --- a real tile against independent references ---------------------------------------------


def reference_band(mask: np.ndarray, d: int) -> np.ndarray:
    """The band as mask minus its erosion by a disk, on an edge-padded copy."""
    padded = np.pad(mask, d, mode="edge")
    eroded = ndimage.binary_erosion(padded, structure=disk(d))[d:-d, d:-d]
    return mask & ~eroded


@pytest.mark.skipif(not MASS_TEST.is_dir(), reason=f"real data not found at {MASS_TEST}")
@pytest.mark.parametrize("d", [3, 15])
def test_real_tile_matches_references(d):
    truth = skimage.io.imread(MASS_TEST / "masks" / REAL_TILE) > 127
    image = skimage.io.imread(MASS_TEST / "images" / REAL_TILE)
    valid = ~np.all(image == 255, axis=-1)
    assert truth.shape == valid.shape == (1500, 1500)
    assert 0.3 < valid.mean() < 0.8
    # A plausible prediction: the truth shifted by 3 px down and right, then thinned.
    shifted = np.zeros_like(truth)
    shifted[3:, 3:] = truth[:-3, :-3]
    pred = erosion(shifted, disk(1))

    conf = confusion(pred, truth, valid)
    codes = np.bincount((2 * truth + pred)[valid].ravel(), minlength=4)  # 0 TN, 1 FP, 2 FN, 3 TP
    assert conf == Confusion(tp=codes[3], fp=codes[1], fn=codes[2], tn=codes[0])
    assert 0.0 < conf.road_iou < 0.9

    bnd = boundary_counts(pred, truth, valid, d=d)
    road_p, road_t = reference_band(pred, d), reference_band(truth, d)
    bg_p, bg_t = reference_band(~pred, d), reference_band(~truth, d)
    assert bnd == BoundaryCounts(
        road_inter=int((road_p & road_t & valid).sum()),
        road_union=int(((road_p | road_t) & valid).sum()),
        bg_inter=int((bg_p & bg_t & valid).sum()),
        bg_union=int(((bg_p | bg_t) & valid).sum()),
    )
    assert boundary_confusion(pred, truth, valid, d=d) == (bnd.road_inter, bnd.road_union)
    assert 0.0 < bnd.mba < 1.0
    assert bnd.road_union > 1000

"""Patch-optimal pseudo-labels against a brute-force reference, on real road masks."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from skimage.filters import gaussian
from skimage.transform import resize

from geoprn.pseudo_labels import THRESHOLDS, patch_optimal_labels

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MASKS = DATA / "massachusetts" / "test" / "masks"
# Road-rich 256 x 256 crops (row, col) of two real Massachusetts Roads test masks.
CROPS = [("10078735_15.png", 384, 128), ("23428525_15.png", 768, 768)]
TAUS = (torch.arange(1, 20) * 0.05).numpy()  # the float32 thresholds, built independently


def real_mask(name: str, row: int, col: int, size: int = 256) -> np.ndarray:
    """A crop of a real road mask as {0, 1} uint8."""
    with warnings.catch_warnings():  # the PNG masks carry no georeferencing
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        src = rasterio.open(MASKS / name)
    with src:
        mask = src.read(1, window=((row, row + size), (col, col + size)))
    return (mask > 127).astype(np.uint8)


def fake_probs(label: np.ndarray, seed: int) -> np.ndarray:
    """Probability-like map: blurred label, spatially varying gain and bias, noise."""
    rng = np.random.default_rng(seed)
    size = label.shape
    blurred = gaussian(label.astype(np.float64), sigma=2.0)
    blurred /= max(blurred.max(), 1e-9)
    gain = resize(rng.uniform(0.3, 1.3, (4, 4)), size, order=1, mode="edge")
    bias = resize(rng.uniform(-0.2, 0.3, (3, 3)), size, order=1, mode="edge")
    probs = blurred * gain + bias + rng.normal(0.0, 0.08, size)
    return np.clip(probs, 0.0, 1.0).astype(np.float32)


def reference(probs, labels, patch, valid=None):
    """Loops over patches and thresholds, exact fractions, ties to the lowest τ."""
    h, w = probs.shape
    valid = np.ones((h, w), bool) if valid is None else valid
    out = np.zeros((h, w), np.float32)
    taus = np.full((h // patch, w // patch), np.nan, np.float32)
    for r in range(0, h, patch):
        for c in range(0, w, patch):
            window = np.s_[r : r + patch, c : c + patch]
            p, ok = probs[window], valid[window]
            road = (labels[window] > 0.5) & ok
            if not road.any():
                continue
            best, best_tau = Fraction(-1), None
            for tau in TAUS:
                pred = (p > tau) & ok
                inter = int((pred & road).sum())
                union = int((pred | road).sum())
                score = Fraction(inter + 1, union + 1)
                if score > best:
                    best, best_tau = score, tau
            out[window] = (p > best_tau) & ok
            taus[r // patch, c // patch] = best_tau
    return out, taus


@pytest.fixture(scope="module")
def real_maps():
    labels = np.stack([real_mask(*crop) for crop in CROPS])
    probs = np.stack([fake_probs(label, seed) for seed, label in enumerate(labels)])
    return probs, labels


@pytest.mark.parametrize("patch", [64, 32])
def test_matches_brute_force_on_real_masks(real_maps, patch):
    probs, labels = real_maps
    pseudo, taus = patch_optimal_labels(torch.from_numpy(probs), torch.from_numpy(labels), patch)
    assert isinstance(pseudo, torch.Tensor) and pseudo.dtype == torch.float32
    assert pseudo.shape == probs.shape and taus.shape == (2, 256 // patch, 256 // patch)
    for i in range(len(probs)):
        want, want_taus = reference(probs[i], labels[i], patch)
        np.testing.assert_array_equal(pseudo[i].numpy(), want)
        np.testing.assert_array_equal(taus[i].numpy(), want_taus)  # NaNs compare equal here
    chosen = taus[~taus.isnan()]
    # The map really is spatially biased: patches want different thresholds, and the
    # pseudo-labels differ from any single global threshold.
    assert len(torch.unique(chosen)) >= 4, chosen
    assert all(not torch.equal(pseudo, (torch.from_numpy(probs) > t).float()) for t in TAUS)


def test_numpy_and_two_dimensional_inputs(real_maps):
    probs, labels = real_maps
    pseudo, taus = patch_optimal_labels(probs[1], labels[1] * 255, 64)  # a 0/255 mask
    assert isinstance(pseudo, np.ndarray) and pseudo.shape == (256, 256)
    assert taus.shape == (4, 4)
    want, want_taus = reference(probs[1], labels[1], 64)
    np.testing.assert_array_equal(pseudo, want)
    np.testing.assert_array_equal(taus, want_taus)


def test_ties_go_to_the_lowest_threshold():
    # One 4 x 4 patch, road at a, b, c. τ < 0.27 predicts {a, b, d, e, f}: (2+1)/(6+1) = 3/7;
    # 0.30 <= τ <= 0.50 predicts {a, b, d, e}: 3/6; τ >= 0.55 predicts {a}: 2/4. 3/6 = 2/4,
    # a tie that must go to τ = 0.30 (binarising to {a, b, d, e}, not {a}).
    probs = torch.zeros(4, 4)
    labels = torch.zeros(4, 4)
    a, b, c, d, e, f = (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (3, 3)
    for (r, col), value in zip([a, b, d, e, f], [0.97, 0.52, 0.52, 0.52, 0.27], strict=True):
        probs[r, col] = value
    for r, col in (a, b, c):
        labels[r, col] = 1
    pseudo, taus = patch_optimal_labels(probs, labels, 4)
    assert taus.item() == THRESHOLDS[5].item() == pytest.approx(0.30)
    expected = torch.zeros(4, 4)
    for r, col in (a, b, d, e):
        expected[r, col] = 1
    assert torch.equal(pseudo, expected)
    # An everywhere-perfect patch ties at every τ up to 0.85: the lowest, 0.05, wins.
    probs = torch.where(labels > 0, 0.9, 0.0)
    _, taus = patch_optimal_labels(probs, labels, 4)
    assert taus.item() == THRESHOLDS[0].item()


def test_probabilities_on_the_threshold_grid_are_not_above_it(real_maps):
    # Probabilities quantised to exactly the τ values (float32): "probs > τ" is strict, in the
    # search and in the binarisation alike.
    probs, labels = real_maps
    levels = np.concatenate([[0.0], TAUS, [1.0]]).astype(np.float32)
    quantised = levels[np.rint(probs * 20).astype(int)]
    assert np.isin(quantised, TAUS).mean() > 0.5
    pseudo, taus = patch_optimal_labels(quantised, labels, 32)
    for i in range(len(probs)):
        want, want_taus = reference(quantised[i], labels[i], 32)
        np.testing.assert_array_equal(pseudo[i], want)
        np.testing.assert_array_equal(taus[i], want_taus)


def test_iou_is_smoothed():
    # The base model misses the road (probability 0) and fires elsewhere: I = 0 at every τ.
    # Only the +1 smoothing, 1 / (U + 1), ranks the τ: the fewer false roads the better, so
    # the first τ predicting none (0.70) wins; an unsmoothed IoU would tie at 0 -> 0.05.
    probs = torch.zeros(8, 8)
    labels = torch.zeros(8, 8)
    labels[2, :] = 1
    probs[5, :4] = 0.5
    probs[6, :2] = 0.68
    pseudo, taus = patch_optimal_labels(probs, labels, 8)
    assert taus.item() == THRESHOLDS[13].item() == pytest.approx(0.70)
    assert not pseudo.any()


def test_patch_without_road_is_all_zero(real_maps):
    probs, labels = map(torch.from_numpy, real_maps)
    labels = labels.clone()
    labels[0, :64, :64] = 0  # no road in this patch's ground truth...
    probs = probs.clone()
    probs[0, :64, :64] = 0.99  # ...however confident the base model is
    pseudo, taus = patch_optimal_labels(probs, labels, 64)
    assert not pseudo[0, :64, :64].any()
    assert math.isnan(taus[0, 0, 0].item())
    has_road = labels.reshape(2, 4, 64, 4, 64).sum(dim=(2, 4)) > 0
    assert torch.equal(~taus.isnan(), has_road)


def test_invalid_pixels_are_ignored(real_maps):
    probs, labels = real_maps
    rng = np.random.default_rng(7)
    valid = np.ones(probs.shape, bool)
    valid[:, :, :100] = False  # a nodata band across patch borders
    valid &= rng.random(probs.shape) > 0.1
    pseudo, taus = patch_optimal_labels(probs, labels, 32, valid=valid)
    for i in range(len(probs)):
        want, want_taus = reference(probs[i], labels[i], 32, valid[i])
        np.testing.assert_array_equal(pseudo[i], want)
        np.testing.assert_array_equal(taus[i], want_taus)
    assert not pseudo[~valid].any()
    assert np.isnan(taus[:, :, :3]).all()  # patches entirely in the band: no valid road
    # Whatever the invalid pixels hold, the result is the same.
    scrambled_probs = np.where(valid, probs, rng.random(probs.shape).astype(np.float32))
    scrambled_labels = np.where(valid, labels, 1 - labels)
    again, again_taus = patch_optimal_labels(scrambled_probs, scrambled_labels, 32, valid)
    np.testing.assert_array_equal(again, pseudo)
    np.testing.assert_array_equal(again_taus, taus)
    # And it differs from ignoring the mask (the mask does something).
    unmasked, _ = patch_optimal_labels(probs, labels, 32)
    assert not np.array_equal(unmasked, pseudo)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="patches"):
        patch_optimal_labels(torch.rand(100, 100), torch.zeros(100, 100), 64)
    with pytest.raises(ValueError, match="shape"):
        patch_optimal_labels(torch.rand(64, 64), torch.zeros(32, 64), 32)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        patch_optimal_labels(torch.rand(1, 1, 64, 64), torch.zeros(1, 1, 64, 64), 32)

"""Labelled tiles: discovery, loading, nodata masking, augmentation and masked losses."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from geoprn.data import (
    LabelledTile,
    RandomCrops,
    TilePair,
    augment,
    band_statistics,
    discover_pairs,
    load_tile,
    load_tiles,
)
from geoprn.errors import InputError
from geoprn.losses import base_loss, masked_bce, masked_soft_dice
from tests.conftest import CIL_TRAIN, MASS_TRAIN, NEEDS_TRAIN_DATA, SHARED_DATA, read_raster

DATA, MASS, CIL = SHARED_DATA, MASS_TRAIN, CIL_TRAIN
WHITE_TILE = "10978945_15.png"  # half of it is white (no imagery) yet its mask draws roads there

pytestmark = NEEDS_TRAIN_DATA
read = read_raster


def write_tif(path: Path, array: np.ndarray, nodata: float | None = None) -> Path:
    array = array if array.ndim == 3 else array[None]
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=array.shape[2],
        height=array.shape[1],
        count=array.shape[0],
        dtype=array.dtype,
        nodata=nodata,
    ) as dst:
        dst.write(array)
    return path


@pytest.fixture(scope="module")
def white_tile() -> LabelledTile:
    return load_tile(
        TilePair(MASS / "images" / WHITE_TILE, MASS / "masks" / WHITE_TILE), [1, 2, 3], nodata=255
    )


def test_images_masks_layout():
    pairs = discover_pairs([MASS])
    assert len(pairs) == len(list((MASS / "images").glob("*.png"))) == 30
    assert all(p.image.parent.name == "images" and p.label.parent.name == "masks" for p in pairs)
    assert all(p.image.name == p.label.name for p in pairs)


def test_deepglobe_layout(tmp_path):
    stems = sorted(p.stem for p in (CIL / "images").glob("*.png"))[:3]
    for stem in stems:
        shutil.copy(CIL / "images" / f"{stem}.png", tmp_path / f"{stem}_sat.png")
        shutil.copy(CIL / "masks" / f"{stem}.png", tmp_path / f"{stem}_mask.png")
    shutil.copy(CIL / "images" / "satImage_003.png", tmp_path / "lonely_sat.png")  # no mask
    pairs = discover_pairs([tmp_path])
    assert [p.image.name for p in pairs] == [f"{s}_sat.png" for s in stems]
    assert [p.label.name for p in pairs] == [f"{s}_mask.png" for s in stems]
    tile = load_tile(pairs[0], [1, 2, 3])
    assert np.array_equal(tile.image, read(CIL / "images" / f"{stems[0]}.png"))


def test_explicit_and_sibling_pairs(tmp_path):
    image = shutil.copy(CIL / "images" / "satImage_003.png", tmp_path / "scene.png")
    label = shutil.copy(CIL / "masks" / "satImage_003.png", tmp_path / "scene_mask.png")
    assert discover_pairs([image]) == [TilePair(Path(image), Path(label))]
    assert discover_pairs([f"{image},{label}"]) == [TilePair(Path(image), Path(label))]
    lone = shutil.copy(CIL / "images" / "satImage_006.png", tmp_path / "lone.png")
    with pytest.raises(InputError, match="no label raster"):
        discover_pairs([lone])


def test_folder_without_pairs(tmp_path):
    shutil.copy(CIL / "images" / "satImage_003.png", tmp_path / "satImage_003.png")
    with pytest.raises(InputError, match="no labelled tiles"):
        discover_pairs([tmp_path])
    with pytest.raises(InputError, match="not found"):
        discover_pairs([tmp_path / "missing"])


def test_soft_labels_thresholded_at_128():
    pair = TilePair(CIL / "images" / "satImage_003.png", CIL / "masks" / "satImage_003.png")
    raw = read(pair.label)[0]
    assert raw.max() > 1 and np.any((raw > 0) & (raw < 128))  # really soft
    tile = load_tile(pair, [1, 2, 3])
    assert np.array_equal(tile.label, (raw >= 128).astype(np.uint8))


def test_white_areas_are_nodata(white_tile):
    image = read(MASS / "images" / WHITE_TILE)
    white = np.all(image == 255, axis=0)
    assert white.mean() > 0.3
    assert np.array_equal(white_tile.valid, ~white)
    # the mask draws roads where there is no imagery: those must not be trained on
    assert white_tile.label[white].sum() > 1000
    unmasked = load_tile(
        TilePair(MASS / "images" / WHITE_TILE, MASS / "masks" / WHITE_TILE), [1, 2, 3]
    )
    assert unmasked.valid.all()


def test_geotiff_nodata_is_invalid(tmp_path):
    image = read(CIL / "images" / "satImage_003.png")
    image[:, :50, :] = 0
    pair = TilePair(
        write_tif(tmp_path / "img.tif", image, nodata=0),
        shutil.copy(CIL / "masks" / "satImage_003.png", tmp_path / "lab.png"),
    )
    tile = load_tile(pair, [1, 2, 3])
    assert not tile.valid[:50].any()
    assert np.array_equal(tile.valid[50:], ~np.all(image[:, 50:] == 0, axis=0))
    assert tile.valid[50:].mean() > 0.9


def test_band_statistics_over_valid_pixels(white_tile):
    mean, std = band_statistics([white_tile])
    values = white_tile.image[:, white_tile.valid].astype(np.float64)
    assert np.allclose(mean, values.mean(axis=1))
    assert np.allclose(std, values.std(axis=1))
    unmasked = load_tile(
        TilePair(MASS / "images" / WHITE_TILE, MASS / "masks" / WHITE_TILE), [1, 2, 3]
    )
    mean_all, _ = band_statistics([unmasked])
    assert min(np.subtract(mean_all, mean)) > 30  # white nodata would pull the mean up


def test_mismatched_sizes(tmp_path):
    pair = TilePair(MASS / "images" / WHITE_TILE, CIL / "masks" / "satImage_003.png")
    with pytest.raises(InputError, match="400x400 but its image"):
        load_tile(pair, [1, 2, 3])


def test_band_count_mismatch(tmp_path):
    rgb = read(CIL / "images" / "satImage_003.png")
    single = TilePair(
        write_tif(tmp_path / "one.tif", rgb[:1]),
        shutil.copy(CIL / "masks" / "satImage_003.png", tmp_path / "one_mask.png"),
    )
    with pytest.raises(InputError, match="has 1 band"):
        load_tile(single, [1, 2, 3])
    four = TilePair(
        write_tif(tmp_path / "four.tif", np.concatenate([rgb, rgb[:1]])),
        CIL / "masks" / "satImage_003.png",
    )
    three = TilePair(CIL / "images" / "satImage_003.png", CIL / "masks" / "satImage_003.png")
    with pytest.raises(InputError, match="all tiles must match"):
        load_tiles([three, four], [1, 2, 3])


SYMMETRIES = [(k, f) for k in range(4) for f in (False, True)]


def transform(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    return np.rot90(a[..., :, ::-1] if flip else a, k, axes=(-2, -1))


def test_joint_augmentation_keeps_alignment(white_tile):
    plain = RandomCrops([white_tile], crop=96, length=24, seed=3, augment=False)
    augmented = RandomCrops([white_tile], crop=96, length=24, seed=3, augment=True)
    seen = set()
    for i in range(len(plain)):
        ref = [t.numpy() for t in plain[i]]
        out = [t.numpy() for t in augmented[i]]
        matches = [
            s
            for s in SYMMETRIES
            if all(np.array_equal(transform(r, *s), o) for r, o in zip(ref, out, strict=True))
        ]
        assert matches, f"crop {i}: image, label and valid were not transformed alike"
        seen.add(matches[0])
    assert len(seen) >= 4  # the augmentation really varies


def test_augment_single_symmetry_matches_numpy():
    a = np.arange(2 * 5 * 5).reshape(2, 5, 5)
    b = np.arange(5 * 5).reshape(5, 5)
    rng = np.random.default_rng(0)
    for _ in range(8):
        state = rng.bit_generator.state
        ra, rb = augment((a, b), rng)
        rng2 = np.random.default_rng()
        rng2.bit_generator.state = state
        k, flip = int(rng2.integers(4)), bool(rng2.integers(2))
        assert np.array_equal(ra, transform(a, k, flip))
        assert np.array_equal(rb, transform(b, k, flip))


def test_crops_avoid_nodata_and_are_float(white_tile):
    crops = RandomCrops([white_tile], crop=128, length=16, seed=0)
    image, label, valid = crops[0]
    assert image.dtype == label.dtype == valid.dtype == torch.float32
    assert image.shape == (3, 128, 128) and label.shape == valid.shape == (1, 128, 128)
    assert all(crops[i][2].mean() >= 0.1 for i in range(len(crops)))
    crops.set_epoch(1)
    assert not torch.equal(crops[0][0], image)


def test_loss_ignores_invalid_pixels(white_tile):
    crops = RandomCrops([white_tile], crop=128, length=64, seed=1, augment=False, min_valid=0)
    batch = [crops[i] for i in range(len(crops))]
    keep = [b for b in batch if 0.2 < b[2].mean() < 0.8][:4]  # crops straddling the white edge
    assert len(keep) == 4
    _, label, valid = (torch.stack(t) for t in zip(*keep, strict=True))
    assert (label * (1 - valid)).sum() > 0  # roads drawn in the white area
    logits = torch.randn(label.shape, generator=torch.Generator().manual_seed(0))
    changed = torch.where(valid > 0, logits, torch.randn_like(logits) * 10)
    for loss in (masked_bce, masked_soft_dice, base_loss):
        assert torch.allclose(loss(logits, label, valid), loss(changed, label, valid))
        touched_valid = torch.where(valid > 0, logits + 3, logits)
        assert not torch.allclose(loss(logits, label, valid), loss(touched_valid, label, valid))
    # perfect predictions on valid pixels give a near-zero loss whatever the white area says
    perfect = torch.where(label > 0, 20.0, -20.0)
    perfect = torch.where(valid > 0, perfect, -perfect)
    assert base_loss(perfect, label, valid) < 1e-3

"""The quicklook PNG, assembled from the pieces block tasks sample, against the whole scene."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import zarr

from geoprn import refine
from geoprn.quicklook import GAP, NODATA, ROAD, _stretch, sampling_step
from tests.conftest import massachusetts_pixels, write_raster


@pytest.mark.parametrize("source", ["probs", "base", "base1"])
def test_pieces_make_the_quicklook_of_the_whole_scene(tmp_path, models, source):
    """A 2100 px wide scene is sampled every 3rd pixel, which 512 px blocks do not align
    with; one block is all nodata (no piece, grey). The PNG must be the scene and store
    sampled as a whole, whether the blocks read no image (a probability raster refined
    without one) or sample the image they read for the model (three bands, or one)."""
    pixels = np.concatenate([massachusetts_pixels(700, 1500), massachusetts_pixels(700, 600)], 2)
    pixels[:, :512, 512:1024] = 0  # a block with no data
    pixels[:, 600:, 1900:] = 0  # part of another
    scene = write_raster(tmp_path / "wide.tif", pixels, nodata=0)
    probs = write_raster(tmp_path / "probs.tif", pixels[:1].astype(np.float32) / 255)
    inputs = {"probs": probs} if source == "probs" else {"base": models[source]}
    record = refine(scene, tmp_path / "out", **inputs, use_prn=False, block_size=512)
    assert record.blocks["skipped"] == 1
    shown = [1] if source == "base1" else [1, 2, 3]

    step = sampling_step(700, 2100)
    assert step == 3
    with rasterio.open(scene) as ds:
        image = ds.read(shown)[:, ::step, ::step]
        valid = ds.dataset_mask()[::step, ::step] > 0
    base = zarr.open_array(tmp_path / "out" / "wide.zarr" / "base", mode="r")[::step, ::step]
    base = base.astype(np.float64)  # as the quicklook paints
    rgb = _stretch(image, valid)
    alpha = np.clip(np.nan_to_num(base, nan=0.0), 0, 1)[..., None] * 0.85
    painted = np.where(np.isnan(base)[..., None], NODATA, rgb * (1 - alpha) + ROAD * alpha)
    gap = np.full((*valid.shape, 3), 255.0)[:, :GAP]
    expected = np.concatenate([np.where(valid[..., None], rgb, NODATA), gap, painted], axis=1)
    with rasterio.open(tmp_path / "out" / "wide_quicklook.png") as png:
        picture = png.read()
    np.testing.assert_array_equal(picture, np.moveaxis(np.round(expected), -1, 0))
    assert (picture[:, :170, 171:341] == 160).all()  # the block without data is grey

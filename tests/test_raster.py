"""Scene validation, reflect-padded reads and the COG writer, on real imagery."""

import numpy as np
import pytest
import rasterio

from geoprn.errors import InputError
from geoprn.raster import (
    mirrored,
    open_scene,
    read_region,
    reflect_index,
    write_mask_cog,
    write_mask_piece,
)
from tests.conftest import SAMPLE_SCENE, massachusetts_pixels, write_raster


def test_reflect_index_matches_numpy_reflect_padding():
    for length in (1, 2, 5, 17):
        values = np.arange(length)
        pad = 40
        expected = np.pad(values, pad, mode="reflect") if length > 1 else np.zeros(2 * pad + 1)
        got = values[reflect_index(np.arange(-pad, length + pad), length)]
        np.testing.assert_array_equal(got, expected)


def test_mirrored_reads_equal_reflect_index_for_any_range():
    """The slice-and-pad path (one mirror) and the gather path (wide margins, ranges wholly
    outside) both give the pixels reflect_index names."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(n) for n in rng.integers(1, 30, 2))
        array = rng.integers(0, 255, (2, h, w))
        r0, c0 = (int(n) for n in rng.integers(-50, 50, 2))
        r1, c1 = r0 + int(rng.integers(1, 60)), c0 + int(rng.integers(1, 60))
        got = mirrored(lambda win, a=array: a[(..., *win.toslices())], (r0, r1), (c0, c1), h, w)
        iy, ix = reflect_index(np.arange(r0, r1), h), reflect_index(np.arange(c0, c1), w)
        np.testing.assert_array_equal(got, array[(..., *np.ix_(iy, ix))])


def test_read_region_past_the_edges_is_the_reflected_scene():
    with rasterio.open(SAMPLE_SCENE) as ds:
        full = ds.read()
        data, valid = read_region(ds, [3, 2, 1], (-100, 700), (550, 900))
    padded = np.pad(full[[2, 1, 0]], ((0, 0), (100, 100), (0, 250)), mode="reflect")
    np.testing.assert_array_equal(data, padded[:, :800, 550:900])
    assert valid.shape == (800, 350) and valid.all()


def test_open_scene_reads_the_header(mass_scene):
    info = open_scene(mass_scene)
    assert (info.width, info.height, info.count, info.dtype) == (1100, 900, 3, "uint8")
    assert info.crs.to_epsg() == 26919
    assert info.pixel_area_m2 == pytest.approx(1.0)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        open_scene(tmp_path / "nope.tif")


def test_not_a_raster(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("these are not pixels\n")
    with pytest.raises(InputError, match="not a raster"):
        open_scene(path)


def test_truncated_geotiff(tmp_path, mass_scene):
    path = tmp_path / "cut.tif"
    data = mass_scene.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated|not a raster"):
        open_scene(path)


def test_tiny_scene_is_refused(tmp_path):
    path = write_raster(tmp_path / "tiny.tif", massachusetts_pixels(8, 40))
    with pytest.raises(InputError, match="at least"):
        open_scene(path)


def test_scene_without_crs_warns(tmp_path):
    path = write_raster(tmp_path / "nocrs.tif", massachusetts_pixels(64, 64), crs=None)
    with pytest.warns(UserWarning, match="no CRS"):
        info = open_scene(path)
    assert info.crs is None


def test_mask_cog_is_assembled_aligned_tiled_with_overviews(tmp_path, mass_scene):
    """Blocks write their pieces of the mask; the COG puts them in place, and pixels no piece
    covers (blocks without valid pixels) are nodata."""
    info = open_scene(mass_scene)  # 900 x 1100
    probs = np.random.default_rng(0).random(info.shape, dtype=np.float32)
    probs[:100, :100] = np.nan
    blocks = [((0, 512), (0, 512)), ((0, 512), (512, 1100)), ((512, 900), (512, 1100))]
    pieces = []
    for i, (rows, cols) in enumerate(blocks):
        pieces.append((tmp_path / "pieces" / f"{i}.tif", rows, cols))
        write_mask_piece(pieces[-1][0], probs[slice(*rows), slice(*cols)], threshold=0.5)
    out = tmp_path / "mask.tif"
    write_mask_cog(pieces, info, out)
    with rasterio.open(out) as ds, rasterio.open(mass_scene) as src:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert (ds.crs, ds.transform, ds.shape) == (src.crs, src.transform, src.shape)
        assert ds.nodata == 255 and ds.dtypes[0] == "uint8" and ds.overviews(1)
        mask = ds.read(1)
    expected = (probs > 0.5).astype(np.uint8)
    expected[:100, :100] = 255
    expected[512:, :512] = 255  # no piece
    np.testing.assert_array_equal(mask, expected)
    assert not list(tmp_path.glob("*.part*")) and not list(tmp_path.glob("pieces/*.part"))

"""--resample: a scene finer than the model runs on a work grid at the model's GSD."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from rasterio.transform import from_origin

from geoprn import refine
from geoprn.errors import InputError
from geoprn.raster import WorkGrid, open_scene
from tests.conftest import REPO, make_checkpoint, massachusetts_pixels, write_raster

SAMPLE = REPO / "data" / "sample" / "paris_img1447.tif"


def test_gsd_of_projected_and_geographic_scenes(tmp_path):
    utm = write_raster(tmp_path / "utm.tif", np.zeros((1, 32, 32), np.uint8))
    assert open_scene(utm).gsd == pytest.approx(1.0)
    # the Paris sample is 2.2e-6 x 3.3e-6 degrees at 49 deg N: about 0.24 m
    assert open_scene(SAMPLE).gsd == pytest.approx(0.2436, abs=0.002)
    bare = write_raster(tmp_path / "bare.tif", np.zeros((1, 32, 32), np.uint8), crs=None)
    with pytest.warns(UserWarning, match="no CRS"):
        assert open_scene(bare).gsd is None


def test_grid_choice():
    scene = open_scene(SAMPLE)
    assert WorkGrid.choose(scene, 1.0, "auto").factor == pytest.approx(1 / 0.2436, rel=0.01)
    assert not WorkGrid.choose(scene, 1.0, "off").resampled
    assert not WorkGrid.choose(scene, 0.3, "auto").resampled  # within 1.5x
    assert not WorkGrid.choose(scene, None, "auto").resampled  # model without a GSD
    with pytest.raises(InputError, match="only 4x4 px"):
        WorkGrid.choose(scene, 50.0, "auto")


def test_bilinear_back_to_the_scene_is_exact_on_planes():
    grid = WorkGrid(4.0, 100, 100)
    rows, cols = (13, 61), (0, 37)
    (r0, r1), (c0, c1) = grid.support(rows), grid.support(cols)
    work_y, work_x = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
    plane = (0.5 * work_y + 0.25 * work_x).astype(np.float64)
    scene_y, scene_x = np.meshgrid(np.arange(*rows), np.arange(*cols), indexing="ij")
    # a work pixel centre i sits at scene coordinate (i + 0.5) * 4 - 0.5
    expected = 0.5 * ((scene_y + 0.5) / 4 - 0.5) + 0.25 * ((scene_x + 0.5) / 4 - 0.5)
    np.testing.assert_allclose(grid.to_scene(plane, rows, cols), expected, atol=1e-6)


@pytest.fixture(scope="module")
def fine_scene(tmp_path_factory) -> Path:
    """Real 1 m Massachusetts pixels upsampled 3x and declared at 1/3 m: 1500 x 1200 px."""
    pixels = massachusetts_pixels(400, 500).repeat(3, axis=1).repeat(3, axis=2)
    path = tmp_path_factory.mktemp("fine") / "fine.tif"
    return write_raster(path, pixels, transform=from_origin(300_000.0, 4_700_000.0, 1 / 3, 1 / 3))


@pytest.fixture(scope="module")
def gsd_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gsd_models")
    rgb = {"mean": [110.0, 110.0, 100.0], "std": [50.0, 50.0, 50.0], "gsd": 1.0}
    return {
        "base": make_checkpoint(root / "base.safetensors", "base", 3, 0, **rgb),
        "prn": make_checkpoint(root / "prn.safetensors", "prn", 1, 2, gsd=1.0),
    }


def test_resampled_run_is_on_the_scene_grid_and_block_size_invariant(
    fine_scene, gsd_models, tmp_path
):
    runs = {}
    for block_size in (512, 1024):
        out = tmp_path / str(block_size)
        refine(fine_scene, out, **gsd_models, block_size=block_size, device="cpu", batch_size=2)
        runs[block_size] = out
        record = json.loads((out / "fine_run.json").read_text())
        assert record["inputs"]["resample_factor"] == pytest.approx(3.0)
    a, b = (zarr.open_group(runs[k] / "fine.zarr", mode="r") for k in (512, 1024))
    assert a["refined"].shape == (1200, 1500)
    np.testing.assert_array_equal(a["refined"][:], b["refined"][:])
    np.testing.assert_array_equal(a["base"][:], b["base"][:])
    with rasterio.open(runs[512] / "fine_mask.tif") as m, rasterio.open(fine_scene) as s:
        assert (m.crs, m.transform, m.shape) == (s.crs, s.transform, s.shape)
    # on the scene's own grid the same blocks need about 4 times the windows
    off = tmp_path / "off"
    refine(fine_scene, off, **gsd_models, block_size=1024, resample="off", device="cpu")
    record_off = json.loads((off / "fine_run.json").read_text())
    assert record_off["inputs"]["resample_factor"] == 1.0
    assert record_off["windows"] > 3 * record["windows"]


def test_resampled_probabilities_follow_the_work_grid(fine_scene, gsd_models, tmp_path):
    """The scene is 1 m pixels repeated 3x: resampled, the model sees the 1 m pixels exactly,
    so the base probabilities at the centre of each 3 x 3 group equal a 1 m run's."""
    coarse = write_raster(tmp_path / "coarse.tif", massachusetts_pixels(400, 500))
    refine(coarse, tmp_path / "c", base=gsd_models["base"], use_prn=False, device="cpu")
    refine(fine_scene, tmp_path / "f", base=gsd_models["base"], use_prn=False, device="cpu")
    one_metre = zarr.open_array(tmp_path / "c" / "coarse.zarr" / "base", mode="r")[:]
    fine = zarr.open_array(tmp_path / "f" / "fine.zarr" / "base", mode="r")[:]
    np.testing.assert_allclose(fine[1::3, 1::3], one_metre, atol=1e-5)

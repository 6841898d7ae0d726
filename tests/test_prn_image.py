"""A PRN that reads the image beside the base model's probabilities (``in_channels`` > 1),
trained on real val crops and run by ``refine`` on a real scene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import zarr

from geoprn.errors import InputError
from geoprn.inference import auto_batch_size, predict_array
from geoprn.models.checkpoint import DEFAULT_BASE, file_sha256, load_cached, read_header
from geoprn.models.header import reads_image
from geoprn.pipeline import refine
from geoprn.train import refined_probabilities, train_prn
from tests.conftest import config_from
from tests.test_train_prn import SMALL, VAL

WITH_IMAGE = {
    **SMALL,
    "kind": "prn",
    "arguments": {**SMALL["arguments"], "in_channels": 4, "input_skip": True},
    "bands": [1, 2, 3],
}

pytestmark = pytest.mark.skipif(not VAL.is_dir(), reason="real data not found")


@pytest.fixture(scope="module")
def image_prn(val_crops, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prn_image")
    config = config_from(WITH_IMAGE, folder)
    out = folder / "prn.safetensors"
    train_prn([val_crops], config, out, base=DEFAULT_BASE, val_fraction=0.25, device="cpu")
    return out


def test_the_header_says_it_reads_the_base_models_bands(image_prn):
    header, base = read_header(image_prn, "prn"), read_header(DEFAULT_BASE, "base")
    assert reads_image(header) and not reads_image(read_header(DEFAULT_BASE, "base"))
    assert header["bands"] == base["bands"] and header["arguments"]["in_channels"] == 4
    assert header["mean"] == [0.0, *base["mean"]] and header["std"] == [1.0, *base["std"]]


def test_a_recipe_whose_channels_do_not_match_its_bands_is_refused(tmp_path):
    wrong = {**WITH_IMAGE, "bands": [1]}
    with pytest.raises(InputError, match="in_channels is 4, 2 channels are read"):
        config_from(wrong, tmp_path)


@pytest.fixture(scope="module")
def runs(image_prn, mass_scene, tmp_path_factory) -> dict[str, np.ndarray]:
    """refine with the base model and the image PRN; then from that run's stored base
    probabilities (``--probs``) with the same PRN."""
    out = tmp_path_factory.mktemp("prn_image_refine")
    refine(mass_scene, out / "a", base=DEFAULT_BASE, prn=image_prn, block_size=512,
           device="cpu")  # fmt: skip
    store = zarr.open_group(str(out / "a" / "mass.zarr"), mode="r")
    with rasterio.open(mass_scene) as scene:
        profile = {**scene.profile, "count": 1, "dtype": "float32", "nodata": None}
    probs = out / "probs.tif"
    with rasterio.open(probs, "w", **profile) as dst:
        dst.write(store["base"][:][None])
    refine(mass_scene, out / "b", probs=probs, prn=image_prn, device="cpu")
    from_probs = zarr.open_array(str(out / "b" / "mass.zarr" / "refined"), mode="r")[:]
    return {"base": store["base"][:], "refined": store["refined"][:], "from_probs": from_probs}


def test_refine_runs_it_on_the_probabilities_and_the_scene_pixels(
    image_prn, runs, mass_scene, tmp_path
):
    """What refine writes from ``--probs`` is the PRN run window by window over those
    probabilities and the scene's own pixels (predict_array, no blocks, no Dask), as
    prn_accuracy.py scores it, bit for bit at the batch size refine used (1 on a CPU: fp32
    convolutions of a batch of 8 differ in the last bit on some CPUs); the image changes it."""
    with rasterio.open(mass_scene) as scene:
        image = scene.read().astype(np.float32)
    prn = load_cached(str(image_prn), file_sha256(image_prn), "cpu")
    batch = auto_batch_size(torch.device("cpu"))  # what refine's --batch-size auto ran
    expected = predict_array(prn, np.concatenate([runs["base"][None], image]), batch_size=batch)
    np.testing.assert_array_equal(runs["from_probs"], expected)
    blind = predict_array(prn, np.concatenate([runs["base"][None], np.zeros_like(image)]))
    assert np.abs(blind - expected).max() > 1e-3  # it reads the image
    names = ["mass"]
    again = refined_probabilities([runs["base"]], names, tmp_path / "c.zarr", image_prn, batch,
                                  "cpu", images=[image])  # fmt: skip
    np.testing.assert_array_equal(again[0], expected)
    with pytest.raises(InputError, match="reads the image beside the probabilities"):
        refined_probabilities([runs["base"]], names, tmp_path / "d.zarr", image_prn, 4, "cpu")


def test_its_maps_averaged_over_symmetries_are_cached_apart(image_prn, runs, mass_scene, tmp_path):
    """``refined_probabilities(symmetries=4)`` (``prn_accuracy.py --prn-symmetries``) is the
    PRN averaged over 4 symmetries of each window, and the cache keeps it apart from the PRN
    in one pass."""
    from geoprn.models.predictor import SymmetryMean

    with rasterio.open(mass_scene) as scene:
        image = scene.read().astype(np.float32)
    prn = load_cached(str(image_prn), file_sha256(image_prn), "cpu")
    stacked = np.concatenate([runs["base"][None], image])
    cache, names = tmp_path / "c.zarr", ["mass"]
    one = refined_probabilities([runs["base"]], names, cache, image_prn, 4, "cpu", images=[image])
    four = refined_probabilities(
        [runs["base"]], names, cache, image_prn, 4, "cpu", images=[image], symmetries=4
    )
    np.testing.assert_array_equal(one[0], predict_array(prn, stacked, batch_size=4))
    np.testing.assert_array_equal(
        four[0], predict_array(SymmetryMean(prn, 4), stacked, batch_size=4)
    )
    assert np.abs(four[0] - one[0]).max() > 1e-3


def test_the_base_models_run_matches_and_bpr_runs_after_it(
    image_prn, runs, mass_scene, models, tmp_path
):
    # the stored base probabilities are rounded; the run refined them unrounded
    np.testing.assert_allclose(runs["refined"], runs["from_probs"], atol=0.03)
    assert np.abs(runs["refined"] - runs["base"]).max() > 1e-3  # the PRN changed the map
    refine(mass_scene, tmp_path, base=DEFAULT_BASE, prn=image_prn, bpr=models["bpr"],
           use_bpr=True, device="cpu")  # fmt: skip
    with_bpr = zarr.open_array(str(tmp_path / "mass.zarr" / "refined"), mode="r")[:]
    assert with_bpr.shape == runs["refined"].shape and np.isfinite(with_bpr).all()
    assert not np.array_equal(with_bpr, runs["refined"])  # BPR ran after the PRN


def test_a_header_whose_channels_do_not_match_says_what_is_read(image_prn):
    from geoprn.models.header import header_problem

    header = read_header(image_prn, "prn")
    wrong = {**header, "arguments": {**header["arguments"], "in_channels": 5}}
    assert "4 channel(s) are read (3 band(s) and the probabilities)" in header_problem(wrong)
    base = {**read_header(DEFAULT_BASE, "base"), "arguments": {"in_channels": 4}}
    assert "3 channel(s) are read (3 band(s))" in header_problem(base)

"""The base model averaged over symmetries of each window (``refine --symmetries``): the
mean of the passes mapped back, what refine writes, what its checkpoint records, and the
one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from geoprn.cli.main import cli
from geoprn.inference import predict_array
from geoprn.models.checkpoint import DEFAULT_BASE, load_cached, load_model
from geoprn.models.predictor import SymmetryMean

from .conftest import massachusetts_pixels, write_raster
from .test_cli import assert_one_line_error

NUMPY_SYMMETRIES = [  # (forward, back) in refine's order: flips first, then quarter turns
    (lambda a: a, lambda a: a),
    (lambda a: a[..., ::-1], lambda a: a[..., ::-1]),
    (lambda a: a[..., ::-1, :], lambda a: a[..., ::-1, :]),
    (lambda a: a[..., ::-1, ::-1], lambda a: a[..., ::-1, ::-1]),
    (lambda a: np.rot90(a, 1, (-2, -1)), lambda a: np.rot90(a, -1, (-2, -1))),
    (lambda a: np.rot90(a, -1, (-2, -1)), lambda a: np.rot90(a, 1, (-2, -1))),
    (lambda a: np.swapaxes(a, -2, -1), lambda a: np.swapaxes(a, -2, -1)),
    (lambda a: np.rot90(np.swapaxes(a, -2, -1), 2, (-2, -1)),
     lambda a: np.rot90(np.swapaxes(a, -2, -1), 2, (-2, -1))),
]  # fmt: skip


@pytest.mark.parametrize("n", [4, 8])
def test_the_mean_of_the_passes_mapped_back_and_it_commutes_with_them(models, n):
    model = load_model(models["base"]).eval()
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 64, 64)).astype(np.float32)

    def run(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(a))).numpy()

    expected = np.mean([back(run(fwd(x))) for fwd, back in NUMPY_SYMMETRIES[:n]], axis=0)
    with torch.no_grad():
        averaged = SymmetryMean(model, n)
        got = averaged(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert np.abs(got - run(x)).max() > 1e-3  # a random network is no symmetric one
        for fwd, _ in NUMPY_SYMMETRIES[1:n]:  # the average is equivariant under its group
            turned = averaged(torch.from_numpy(np.ascontiguousarray(fwd(x)))).numpy()
            np.testing.assert_allclose(turned, fwd(got), atol=1e-6)
    with pytest.raises(ValueError, match="symmetries must be one of"):
        SymmetryMean(model, 3)


def test_refine_writes_the_averaged_map_and_a_change_of_symmetries_is_another_command(
    models, tmp_path
):
    pixels = massachusetts_pixels(500, 700)
    scene = write_raster(tmp_path / "scene.tif", pixels)
    common = ["--base", str(models["base"]), "--refiner", "none", "--device", "cpu"]
    common += ["--precision", "fp32"]
    run = lambda *a: CliRunner().invoke(cli, [str(x) for x in a])  # noqa: E731
    result = run("refine", scene, "-o", tmp_path / "s8", *common, "--symmetries", "8")
    assert result.exit_code == 0, result.output
    written = zarr.open_array(tmp_path / "s8" / "scene.zarr" / "base", mode="r")[:]
    model = SymmetryMean(load_cached(str(models["base"].resolve()), "x", "cpu"), 8)
    expected = predict_array(model, pixels, batch_size=1, device="cpu", precision="fp32")
    np.testing.assert_allclose(written, expected, atol=1e-5)
    one = predict_array(model.model, pixels, batch_size=1, device="cpu", precision="fp32")
    assert np.abs(written - one).mean() > 1e-3  # not the single pass
    record = json.loads((tmp_path / "s8" / "scene_run.json").read_text())
    assert record["inputs"]["symmetries"] == 8
    again = run("refine", scene, "-o", tmp_path / "s8", *common, "--symmetries", "1")
    assert_one_line_error(again, "--overwrite")
    assert zarr.open_array(tmp_path / "s8" / "scene.zarr" / "base", mode="r")[:].tolist() == (
        written.tolist()
    )  # nothing overwritten
    single = run("refine", scene, "-o", tmp_path / "s1", *common)  # auto: none recorded
    assert single.exit_code == 0, single.output
    inputs = json.loads((tmp_path / "s1" / "scene_run.json").read_text())["inputs"]
    assert "symmetries" not in inputs  # older runs' signatures stay the same


def test_symmetries_with_given_probabilities_or_of_an_unknown_count_are_one_line(models, tmp_path):
    scene = write_raster(tmp_path / "scene.tif", massachusetts_pixels(300, 400))
    probs = write_raster(tmp_path / "p.tif", np.full((1, 300, 400), 0.5, "f4"))
    run = lambda *a: CliRunner().invoke(cli, [str(x) for x in a])  # noqa: E731
    given = run("refine", scene, "-o", tmp_path / "o", "--probs", probs, "--prn",
                models["prn"], "--device", "cpu", "--symmetries", "8")  # fmt: skip
    assert_one_line_error(given, "--probs has none")
    assert not (tmp_path / "o").exists()
    unknown = run("refine", scene, "-o", tmp_path / "o", "--symmetries", "3")
    assert unknown.exit_code == 2 and "Traceback" not in unknown.output
    assert "'3' is not one of" in unknown.output


def test_the_shipped_base_averaged_commutes_with_a_quarter_turn_on_real_imagery():
    """The shipped base model on a real window: alone it is not symmetric, averaged over the
    8 symmetries its map turns with the image."""
    model = load_cached(str(DEFAULT_BASE), "shipped", "cpu")
    window = massachusetts_pixels(512, 512).astype(np.float32)[None]
    turn = lambda a: np.ascontiguousarray(np.rot90(a, 1, (-2, -1)))  # noqa: E731
    with torch.no_grad():
        for averaged, bound in ((SymmetryMean(model, 8), 1e-5), (model, None)):
            a = averaged(torch.from_numpy(turn(window))).numpy()
            b = turn(averaged(torch.from_numpy(window)).numpy())
            if bound is None:
                assert np.abs(a - b).max() > 0.05
            else:
                np.testing.assert_allclose(a, b, atol=bound)

"""Bad input a hostile user tries (issue 21): one line on stderr and a non-zero exit, at once,
or, for non-finite pixels, nodata exactly where they are."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr

from geoprn import load_model, refine
from geoprn.errors import CheckpointError
from geoprn.models.checkpoint import read_header, rewrite_header
from tests.conftest import TINY, make_checkpoint, massachusetts_pixels, write_raster
from tests.test_cli import assert_one_line_error, run


@pytest.fixture
def scene(tmp_path) -> Path:
    return write_raster(tmp_path / "scene.tif", massachusetts_pixels(300, 400))


# --- 9: devices torch cannot use ----------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "pattern"),
    [
        ("mps", "geoprn runs on the CPU or a CUDA GPU, not on 'mps'"),
        ("meta", "not on 'meta'"),
        ("xla", "not on 'xla'"),
        ("garbage", "unknown device 'garbage'"),
        ("cuda:-1", "unknown device 'cuda:-1'"),
    ],
)
def test_a_device_torch_cannot_use_is_one_line(scene, models, tmp_path, device, pattern):
    args = ("refine", scene, "-o", tmp_path / "o", "--base", models["base"], "--no-prn")
    assert_one_line_error(run(*args, "--device", device), pattern)
    assert not (tmp_path / "o").exists()


# --- 10: scheduler addresses --------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "pattern"),
    [
        ("garbage", "not a Dask scheduler address like tcp://HOST:PORT (no port number)"),
        ("tcp://garbage", "(no port number)"),
        ("http://host:8786", "unknown scheme http://"),
        ("tcp://127.0.0.1:99999", "port 99999 is out of range"),
        ("tcp://no-such-host.invalid:8786", "unknown host no-such-host.invalid"),
    ],
)
def test_a_malformed_scheduler_address_is_one_line_at_once(
    scene, models, tmp_path, address, pattern
):
    """In a process of its own, so the half-made Client's ``__del__`` (10 s, then a
    TimeoutError traceback at exit) would show."""
    started = time.perf_counter()
    args = ["refine", scene, "-o", tmp_path / "o", "--base", models["base"], "--no-prn"]
    result = subprocess.run(
        [Path(sys.executable).with_name("geoprn"), *args, "--scheduler", address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("geoprn: error:")
    assert pattern in result.stderr and "Traceback" not in result.stderr
    assert time.perf_counter() - started < 30  # no connection timeout, no wait at exit


# --- 12, 13: checkpoints well-formed but wrong ---------------------------------------------


def with_header(source: Path, out: Path, **changes) -> Path:
    """``source``'s weights under its header with ``changes`` (None deletes a key)."""
    header = read_header(source)
    for key, value in changes.items():
        if value is None:
            header.pop(key)
        else:
            header[key] = value
    return rewrite_header(source, header, out)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"bands": []}, "bands: List should have at least 1 item"),
        ({"bands": "123"}, "bands: Input should be a valid list (got '123')"),
        ({"bands": [0, 1, 2]}, "bands.0: Input should be greater than or equal to 1"),
        ({"tile_size": "512"}, "tile_size: Input should be a valid integer (got '512')"),
        ({"tile_size": 0}, "tile_size: Input should be greater than or equal to 32"),
        ({"tile_size": 500}, "tile_size: Input should be a multiple of 32"),
        ({"mean": [1.0, 2.0]}, "mean holds 2 values for 3 input channel(s)"),
        ({"std": [50.0, 0.0, 50.0]}, "std.1: Input should be greater than 0"),
        ({"gsd": -1}, "gsd: Input should be greater than 0"),
        ({"kind": "segmenter"}, "kind: Input should be 'base', 'prn' or 'bpr'"),
        ({"tile_size": None}, "tile_size: Field required"),
        ({"arguments": [1]}, "arguments: Input should be a valid dictionary"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else None,
)
def test_a_wrong_header_field_is_one_line(scene, models, tmp_path, changes, pattern):
    bad = with_header(models["base"], tmp_path / "bad.safetensors", **changes)
    for extra in ([], ["--no-prn"]):  # both ways through refine
        args = ("refine", scene, "-o", tmp_path / "o", "--base", bad, *extra)
        assert_one_line_error(run(*args), f"has a malformed geoprn header: {pattern}")
    assert_one_line_error(run("info", bad), pattern)
    assert not (tmp_path / "o").exists()


def test_a_wrong_refiner_header_is_one_line(scene, models, tmp_path):
    bad = with_header(models["prn"], tmp_path / "prn.safetensors", tile_size="512")
    args = ("refine", scene, "-o", tmp_path / "o", "--base", models["base"], "--prn", bad)
    assert_one_line_error(run(*args), "tile_size: Input should be a valid integer")
    bpr = with_header(models["bpr"], tmp_path / "bpr.safetensors", nms_iou=None)
    args = ("refine", scene, "-o", tmp_path / "o", "--base", models["base"], "--bpr", bpr)
    assert_one_line_error(run(*args, "--refiner", "bpr"), "a bpr header needs nms_iou")


def test_the_shipped_headers_are_valid():
    for path in (Path(__file__).parents[1] / "geoprn" / "weights").glob("*.safetensors"):
        read_header(path)


def test_a_bad_header_is_not_saved(tmp_path):
    with pytest.raises(CheckpointError, match="bad checkpoint header: bands: List should"):
        make_checkpoint(tmp_path / "x.safetensors", "base", 3, 0, bands=[])
    assert not list(tmp_path.iterdir())


def test_tensors_of_the_wrong_shapes_are_one_line(scene, models, tmp_path):
    """The header describes a wider decoder than the weights stored: one line naming the
    first tensor that differs and how many do, not one line per tensor."""
    wider = {**TINY, "decoder_channels": [32, 16, 16], "in_channels": 3}
    bad = with_header(models["base"], tmp_path / "bad.safetensors", arguments=wider)
    with pytest.raises(CheckpointError) as caught:
        load_model(bad)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    assert "tensors have the wrong shape (first decoder." in message
    result = run("refine", scene, "-o", tmp_path / "o", "--base", bad, "--no-prn")
    assert_one_line_error(result, "does not match its own header: ")
    assert len(result.stderr.splitlines()) == 1


# --- 14: probabilities outside [0, 1] ------------------------------------------------------


# --- 12: YAML recipes of the wrong type or range --------------------------------------------


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"bands": []}, "bands: List should have at least 1 item"),
        ({"bands": "123"}, "bands: Input should be a valid list (got '123')"),
        ({"tile_size": 0}, "tile_size: Input should be greater than 0 (got 0)"),
        ({"lr": "fast"}, "lr: Input should be a valid number"),
        ({"epochs": 2.5}, "epochs: Input should be a valid integer"),
        ({"lr_factor": 1.5}, "lr_factor: Input should be less than 1 (got 1.5)"),
        ({"micro_batch": "most"}, "micro_batch"),
        ({"learning_rate": 0.1}, "learning_rate: Extra inputs are not permitted"),
        ({"kind": "gan"}, "kind: Input should be 'base', 'prn' or 'bpr'"),
    ],
)
def test_a_wrong_recipe_setting_is_one_line_before_any_work(tmp_path, changes, pattern):
    import yaml

    from geoprn.train import config_path

    recipe = yaml.safe_load(config_path("base_unet_mnv2").read_text())
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({**recipe, **changes}))
    out = tmp_path / "base.safetensors"
    tiles = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "massachusetts" / "val"
    result = run("train", "base", tiles, "-o", out, "--config", path, "--device", "cpu")
    assert_one_line_error(result, f"{path}: {pattern}")
    assert not out.exists()


def test_a_recipe_without_its_network_names_what_is_missing(tmp_path):
    path = tmp_path / "bare.yaml"
    path.write_text("epochs: 3\n")
    result = run("train", "base", tmp_path, "-o", tmp_path / "b.safetensors", "--config", path)
    assert_one_line_error(result, f"{path}: architecture: Field required")


def probabilities(path: Path, values: np.ndarray) -> Path:
    return write_raster(path, values[None])


def test_float_probabilities_outside_0_1_are_refused(scene, models, tmp_path):
    rng = np.random.default_rng(0)
    wild = probabilities(tmp_path / "wild.tif", rng.uniform(0, 1000, (300, 400)).astype("f4"))
    args = ("refine", scene, "-o", tmp_path / "o", "--probs", wild, "--prn", models["prn"])
    assert_one_line_error(run(*args, "--device", "cpu"), "probabilities lie in [0, 1]")
    negative = probabilities(tmp_path / "neg.tif", np.full((300, 400), -0.5, "f4"))
    args = ("refine", scene, "-o", tmp_path / "o2", "--probs", negative, "--prn", models["prn"])
    assert_one_line_error(run(*args, "--device", "cpu"), "values from -0.5 to -0.5")


def test_uint8_probabilities_0_255_and_nodata_stay_accepted(scene, models, tmp_path):
    values = np.random.default_rng(1).integers(0, 256, (300, 400)).astype("uint8")
    ok = probabilities(tmp_path / "u8.tif", values)
    record = refine(scene, tmp_path / "o", probs=ok, prn=models["prn"], device="cpu")
    assert record.blocks["computed"] == 1
    base = zarr.open_array(tmp_path / "o" / "scene.zarr" / "base", mode="r")[:]
    np.testing.assert_allclose(base, values / np.float32(255), rtol=1e-6)
    # a float raster with a declared nodata far outside [0, 1]: those pixels are not values
    floats = np.full((300, 400), 0.25, "f4")
    floats[:10] = -9999
    nodata = write_raster(tmp_path / "nd.tif", floats[None], nodata=-9999)
    refine(scene, tmp_path / "o2", probs=nodata, prn=models["prn"], device="cpu")


# --- 15: NaN and inf pixels without a declared nodata ---------------------------------------


def test_non_finite_pixels_are_nodata_where_they_are_and_nowhere_else(models, tmp_path):
    pixels = massachusetts_pixels(650, 650).astype("float32")
    bad = np.zeros((650, 650), bool)
    rng = np.random.default_rng(2)
    for value in [np.nan] * 16 + [np.inf, -np.inf, np.inf, -np.inf]:
        y, x = rng.integers(0, 650, 2)
        pixels[rng.integers(0, 3), y, x] = value
        bad[y, x] = True
    scene = write_raster(tmp_path / "f32.tif", pixels)
    record = refine(scene, tmp_path / "o", base=models["base"], prn=models["prn"], device="cpu")
    assert record.blocks["computed"] == 1
    for name in ("base", "refined"):
        values = zarr.open_array(tmp_path / "o" / "f32.zarr" / name, mode="r")[:]
        np.testing.assert_array_equal(np.isnan(values), bad)
        assert np.all((values[~bad] >= 0) & (values[~bad] <= 1))
    with rasterio.open(tmp_path / "o" / "f32_mask.tif") as mask:
        np.testing.assert_array_equal(mask.read(1) == 255, bad)


# --- 16: a damaged run state -----------------------------------------------------------------


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_a_damaged_signature_is_one_line_and_overwrite_recovers(scene, models, tmp_path, content):
    out = tmp_path / "o"
    args = ["refine", scene, "-o", out, "--base", models["base"], "--no-prn", "--device", "cpu"]
    assert run(*args).exit_code == 0
    (out / ".scene.geoprn" / "signature.json").write_bytes(content)
    assert_one_line_error(run(*args), "signature.json is damaged")
    result = run(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / ".scene.geoprn" / "signature.json").read_text())["scene"]


# --- 17: vectorize into a place it cannot write ---------------------------------------------


@pytest.fixture
def road_mask(tmp_path) -> Path:
    mask = np.zeros((1, 128, 128), np.uint8)
    mask[0, 60:66, :] = 1
    return write_raster(tmp_path / "mask.tif", mask, nodata=255)


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A read-only file system at ``path`` (a tmpfs mounted ro), or a skip where this
    process may not mount one."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_vectorize_checks_its_output_folder_before_any_work(road_mask, tmp_path):
    missing = tmp_path / "missing" / "roads.gpkg"
    assert_one_line_error(
        run("vectorize", road_mask, "-o", missing), f"the folder {missing.parent} does not exist"
    )
    (tmp_path / "file").write_text("")
    under_file = tmp_path / "file" / "roads.gpkg"
    assert_one_line_error(run("vectorize", road_mask, "-o", under_file), "does not exist")
    # it is checked before the mask is read: a missing mask still names the output first
    result = run("vectorize", tmp_path / "nope.tif", "-o", missing)
    assert_one_line_error(result, f"the folder {missing.parent} does not exist")
    assert run("vectorize", road_mask, "-o", tmp_path / "roads.gpkg").exit_code == 0


def test_vectorize_onto_a_read_only_file_system_is_one_line(road_mask, tmp_path):
    with read_only_folder(tmp_path / "ro") as folder:
        assert_one_line_error(
            run("vectorize", road_mask, "-o", folder / "roads.gpkg"), "is not writable"
        )


# --- the benchmark scripts: the same one line as the CLI ----------------------------------


@pytest.mark.parametrize(
    ("script", "options"),
    [("prn_accuracy.py", ["--prn", "none", "--bpr", "none"]), ("research/missed_roads.py", [])],
)
def test_a_benchmark_given_a_missing_checkpoint_says_so_in_one_line(script, options, tmp_path):
    missing = tmp_path / "nope.safetensors"
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, repo / "benchmarks" / script, "--base", missing, *options],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"{Path(script).name}: error: checkpoint not found: {missing}"
    ]

"""Every bad input gives one clear line on stderr, a non-zero exit, no traceback, no lost data."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner

from geoprn.cli.main import cli
from geoprn.models.checkpoint import file_sha256
from tests.conftest import SHARED_DATA, make_checkpoint, massachusetts_pixels, write_raster


def run(*args: str | Path):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, pattern: str) -> None:
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # no uncaught exception
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("geoprn: error:")]
    assert len(errors) == 1, lines
    assert "Traceback" not in result.output
    assert pattern in errors[0], errors[0]


@pytest.fixture
def scene(tmp_path) -> Path:
    return write_raster(tmp_path / "scene.tif", massachusetts_pixels(300, 400))


def test_refine_prints_where_the_outputs_are(scene, models, tmp_path):
    result = run(
        "refine",
        scene,
        "-o",
        tmp_path / "out",
        "--base",
        models["base"],
        "--prn",
        models["prn"],
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "1 blocks computed" in result.stdout
    assert f"mask: {tmp_path / 'out' / 'scene_mask.tif'}" in result.stdout
    assert (tmp_path / "out" / "scene_mask.tif").is_file()


def test_info_prints_the_header_and_parameter_count(models):
    result = run("info", models["prn"])
    assert result.exit_code == 0
    header = json.loads(result.stdout)
    assert header["kind"] == "prn" and header["parameters"] > 100_000


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda tmp: tmp / "missing.tif", "file not found"),
        (lambda tmp: (tmp / "a.tif").write_text("hello") and tmp / "a.tif", "not a raster"),
        (lambda tmp: write_raster(tmp / "t.tif", massachusetts_pixels(10, 400)), "at least 16"),
    ],
    ids=["missing", "not-a-raster", "tiny"],
)
def test_bad_scene(tmp_path, models, make, pattern):
    assert_one_line_error(
        run("refine", make(tmp_path), "-o", tmp_path / "o", "--base", models["base"]), pattern
    )


def test_truncated_scene(tmp_path, models):
    whole = write_raster(tmp_path / "whole.tif", massachusetts_pixels(600, 600))
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    assert_one_line_error(
        run("refine", cut, "-o", tmp_path / "o", "--base", models["base"]), "truncated"
    )


def test_corrupt_checkpoint(scene, models, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(models["base"].read_bytes()[:3000])
    assert_one_line_error(
        run("refine", scene, "-o", tmp_path / "o", "--base", bad), "not a geoprn checkpoint"
    )


def test_wrong_kind_of_checkpoint(scene, models, tmp_path):
    assert_one_line_error(
        run("refine", scene, "-o", tmp_path / "o", "--base", models["prn"]),
        "is a prn checkpoint, a base one is needed",
    )
    assert_one_line_error(
        run(
            "refine", scene, "-o", tmp_path / "o", "--base", models["base"], "--prn", models["base"]
        ),
        "is a base checkpoint, a prn one",
    )


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/geoprn-pickle-was-run", "w"))


def test_pickled_checkpoint_is_refused_and_never_run(scene, tmp_path):
    Path("/tmp/geoprn-pickle-was-run").unlink(missing_ok=True)
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(pickle.dumps(_Payload()))
    assert_one_line_error(
        run("refine", scene, "-o", tmp_path / "o", "--base", ckpt), "not a geoprn checkpoint"
    )
    assert not Path("/tmp/geoprn-pickle-was-run").exists()


def test_wrong_band_count(models, tmp_path):
    scene = SHARED_DATA / "spacenet" / "solaris_pan_utm.tif"
    assert_one_line_error(
        run("refine", scene, "-o", tmp_path / "o", "--base", models["base"]),
        "has 1 band(s); the model reads band(s) 1,2,3",
    )


def test_output_folder_not_writable(scene, models, tmp_path):
    (tmp_path / "file").write_text("")
    assert_one_line_error(
        run("refine", scene, "-o", tmp_path / "file" / "o", "--base", models["base"]),
        "cannot create output folder",
    )


def test_existing_outputs_are_not_overwritten(scene, models, tmp_path):
    out = tmp_path / "o"
    common = ["refine", scene, "-o", out, "--base", models["base"], "--no-prn", "--device", "cpu"]
    assert run(*common).exit_code == 0
    mask_before = (out / "scene_mask.tif").read_bytes()
    assert_one_line_error(run(*common, "--threshold", "0.2"), "use --overwrite")
    assert (out / "scene_mask.tif").read_bytes() == mask_before
    assert run(*common, "--threshold", "0.2", "--overwrite").exit_code == 0


def test_foreign_file_in_the_way_is_not_overwritten(scene, models, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "scene_mask.tif").write_text("someone's work")
    assert_one_line_error(
        run("refine", scene, "-o", out, "--base", models["base"]), "already holds scene_mask.tif"
    )
    assert (out / "scene_mask.tif").read_text() == "someone's work"


def test_unreachable_scheduler(scene, models, tmp_path):
    args = ("refine", scene, "-o", tmp_path / "o", "--base", models["base"])
    assert_one_line_error(run(*args, "--scheduler", "tcp://127.0.0.1:9"), "cannot reach the Dask")


def test_bad_options(scene, models, tmp_path):
    assert_one_line_error(
        run(
            "refine", scene, "-o", tmp_path / "o", "--base", models["base"], "--block-size", "1000"
        ),
        "multiple of 512",
    )
    assert_one_line_error(
        run("refine", scene, "-o", tmp_path / "o", "--base", models["base"], "--device", "cuda:0"),
        "no CUDA GPU",
    )
    result = run("refine", scene, "-o", tmp_path / "o", "--bands", "r,g,b")
    assert result.exit_code == 2 and "band numbers" in result.stderr


def test_bad_window_cache_setting_is_refused_before_any_output(
    scene, models, tmp_path, monkeypatch
):
    monkeypatch.setenv("GEOPRN_WINDOW_CACHE_MB", "1G")
    result = run("refine", scene, "-o", tmp_path / "o", "--base", models["base"], "--no-prn")
    assert_one_line_error(result, "GEOPRN_WINDOW_CACHE_MB='1G' is not a whole number of MiB")
    assert not (tmp_path / "o").exists()


def test_prn_trained_for_another_base_is_said_once(scene, models, tmp_path):
    other = {"sha256": "0" * 64, "file": "other_base.safetensors"}
    prn = make_checkpoint(tmp_path / "prn.safetensors", "prn", 1, 2, base=other)
    args = ("refine", scene, "-o", tmp_path / "o", "--base", models["base"], "--prn", prn)
    result = run(*args, "--device", "cpu")
    assert result.exit_code == 0
    assert result.stderr.count("was trained for another base model (other_base.safetensors)") == 1
    # the PRN's own base raises no warning
    own = {"sha256": file_sha256(models["base"]), "file": "base.safetensors"}
    prn = make_checkpoint(tmp_path / "prn_own.safetensors", "prn", 1, 2, base=own)
    args = ("refine", scene, "-o", tmp_path / "o2", "--base", models["base"], "--prn", prn)
    result = run(*args, "--device", "cpu")
    assert result.exit_code == 0 and "warning" not in result.stderr


def test_without_prn_weights_the_base_runs_alone_and_says_so_once(
    scene, models, tmp_path, monkeypatch
):
    import geoprn.job

    monkeypatch.setattr(geoprn.job, "DEFAULT_PRN", tmp_path / "not_shipped.safetensors")
    result = run("refine", scene, "-o", tmp_path / "o", "--base", models["base"], "--device", "cpu")
    assert result.exit_code == 0
    assert result.stderr.count("the mask comes from the base model") == 1
    assert json.loads((tmp_path / "o" / "scene_run.json").read_text())["inputs"]["prn"] is None


@pytest.mark.parametrize("threshold", ["1", "1.5", "-0.1", "nan"])
def test_bad_threshold(scene, models, tmp_path, threshold):
    args = ("refine", scene, "-o", tmp_path / "o", "--base", models["base"])
    assert_one_line_error(run(*args, "--threshold", threshold), "--threshold must lie in [0, 1)")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("size", ["0", "-2", "many"])
def test_bad_batch_size(scene, models, tmp_path, size):
    assert_one_line_error(
        run("refine", scene, "-o", tmp_path / "o", "--base", models["base"], "--batch-size", size),
        "--batch-size must be 'auto' or at least 1",
    )
    assert not (tmp_path / "o").exists()

"""How loud the commands are: -q prints nothing but errors, -v says what ran and how long,
library log lines never show at the default level, progress moves window by window."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from geoprn import refine
from geoprn.cli.main import cli
from tests.conftest import make_checkpoint, massachusetts_pixels, write_raster


def run(*args: str | Path):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def scene(tmp_path) -> Path:
    return write_raster(tmp_path / "scene.tif", massachusetts_pixels(300, 400))


def test_quiet_run_prints_nothing_even_its_warnings(scene, models, tmp_path):
    other = {"sha256": "0" * 64, "file": "other_base.safetensors"}  # a warning at the default
    prn = make_checkpoint(tmp_path / "prn.safetensors", "prn", 1, 2, base=other)
    args = ["refine", scene, "-o", tmp_path / "o", "--base", models["base"], "--prn", prn]
    result = run("-q", *args, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and result.stderr == ""
    assert (tmp_path / "o" / "scene_mask.tif").is_file()
    # without -q the same command says where its outputs are and warns
    result = run(*args, "--device", "cpu", "--overwrite")
    assert "mask: " in result.stdout and "trained for another base model" in result.stderr


def test_quiet_run_still_reports_errors(scene, models, tmp_path):
    result = run("-q", "refine", scene, "-o", tmp_path / "o", "--base", models["prn"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("geoprn: error:") and len(result.stderr.splitlines()) == 1


def test_quiet_and_verbose_together_are_refused(scene):
    result = run("-q", "-v", "info", scene)
    assert result.exit_code == 2 and "contradict" in result.stderr


def test_verbose_says_blocks_planned_and_where_the_time_went(scene, models, tmp_path):
    args = ["refine", scene, "-o", tmp_path / "o", "--base", models["base"], "--no-prn"]
    result = run("-v", *args, "--device", "cpu", "--block-size", "512")
    assert result.exit_code == 0, result.output
    assert "1 blocks of 512 px: 1 to compute (about 1 windows of 512 px), 0 done before" in (
        result.stderr
    )
    assert "blocks: " in result.stderr and "mask COG and quicklook: " in result.stderr
    result = run("-v", *args, "--device", "cpu", "--block-size", "512")  # the same: resumed
    assert "0 to compute (about 0 windows of 512 px), 1 done before" in result.stderr


def test_library_log_lines_show_only_with_verbose(scene, capsys):
    """GDAL's messages reach Python through rasterio's loggers (distributed logs its own):
    at the default level none is printed, with -v their warnings are."""
    for flags, shown in (([], False), (["-v"], True)):
        assert run(*flags, "vectorize", "--help").exit_code == 0  # sets the levels up
        capsys.readouterr()
        logging.getLogger("rasterio._env").warning("CPLE_AppDefined in TIFFReadDirectory")
        logging.getLogger("distributed.client").warning("a distributed warning")
        logging.getLogger("geoprn.pipeline").warning("a geoprn warning")
        err = capsys.readouterr().err
        assert ("TIFFReadDirectory" in err) is shown and ("distributed warning" in err) is shown
        assert "a geoprn warning" in err


def test_progress_moves_per_forward_pass_not_per_block(scene, models, tmp_path):
    """One block of base + PRN (2 windows): the progress callback hears of each window
    (batch size 1) with the total planned, not only of the finished block."""
    calls = []
    record = refine(
        scene,
        tmp_path / "o",
        base=models["base"],
        prn=models["prn"],
        device="cpu",
        batch_size=1,
        on_windows=lambda ran, planned: calls.append((ran, planned)),
    )
    assert record.blocks["computed"] == 1 and record.windows == 2
    assert calls == [(0, 2), (1, 2), (1, 2)]


def test_progress_plans_shared_windows_once(mass_scene, models, tmp_path):
    """Six 512 blocks share their halos' windows: the plan counts each window once, as the
    run computes it, and the ticks add up to the windows run."""
    calls = []
    record = refine(
        mass_scene,
        tmp_path / "o",
        base=models["base"],
        prn=models["prn"],
        device="cpu",
        block_size=512,
        batch_size=3,
        on_windows=lambda ran, planned: calls.append((ran, planned)),
    )
    assert calls[0] == (0, record.windows) == (0, 2 * 3 * 3)
    assert sum(ran for ran, _ in calls) == record.windows and len(calls) > 7

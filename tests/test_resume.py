"""refine resumes from anything: a SIGKILL at any point, a full disk, chunks lost or damaged
after the run. Real scenes, real stores, the real CLI; the disk is a real (small) tmpfs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from click.testing import CliRunner

from geoprn.cli.main import cli
from tests.conftest import massachusetts_pixels, write_raster

STEM = "scene"
BLOCKS = 4  # a 600 x 700 scene in 512 px blocks


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A real 600 x 700 aerial scene (Massachusetts Roads, 1 m) on a UTM grid."""
    path = tmp_path_factory.mktemp("scene") / f"{STEM}.tif"
    return write_raster(path, massachusetts_pixels(600, 700))


def options(models: dict[str, Path]) -> list[str]:
    return ["--base", str(models["base"]), "--refiner", "none", "--block-size", "512"]


def refine(scene: Path, out: Path, models: dict[str, Path]):
    """``geoprn refine`` through the CLI, in this process."""
    args = ["refine", str(scene), "-o", str(out), *options(models), "--device", "cpu"]
    return CliRunner().invoke(cli, args)


@pytest.fixture(scope="module")
def reference(scene, models, tmp_path_factory) -> Path:
    """One uninterrupted run: what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    result = refine(scene, out, models)
    assert result.exit_code == 0, result.output
    return out


def assert_same_outputs(a: Path, b: Path) -> None:
    """The same probabilities, mask and quicklook, pixel for pixel."""
    for out in (a, b):
        assert not list(out.glob(f".{STEM}.geoprn/done/*.tmp"))
    stored = [zarr.open_array(out / f"{STEM}.zarr" / "base", mode="r")[:] for out in (a, b)]
    np.testing.assert_array_equal(*stored)
    for name in ("mask.tif", "quicklook.png"):
        pixels = [rasterio.open(out / f"{STEM}_{name}").read() for out in (a, b)]
        np.testing.assert_array_equal(*pixels)


def blocks_record(out: Path) -> dict[str, int]:
    return json.loads((out / f"{STEM}_run.json").read_text())["blocks"]


def leftovers(folder: Path) -> list[str]:
    """Temporary files of any writer (ours, zarr's, GDAL's) under ``folder``."""
    marks = (".tmp", ".part", ".partial")
    return [str(p) for p in folder.rglob("*") if any(m in p.name for m in marks)]


# -- SIGKILL at any point (issue 21, point 19) ----------------------------------------------

KILLED = r"""
import importlib, os, signal, sys
module, owner, name, when = sys.argv[1:5]
target = importlib.import_module(module)
if owner != "-":
    target = getattr(target, owner)
original = getattr(target, name)

def kill(*args, **kwargs):
    if when == "after":
        original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

setattr(target, name, kill)
from geoprn.cli.main import cli
cli(sys.argv[5:])
"""

KILL_POINTS = {
    "before the signature": ("geoprn.store", "-", "write_text", "before"),
    "after the signature, before the store": ("xarray", "Dataset", "to_zarr", "before"),
    "after the empty store, before it is marked complete": (
        "xarray",
        "Dataset",
        "to_zarr",
        "after",
    ),
    "after a block's data, before its marker": ("geoprn.store", "-", "write_block", "after"),
    "after the first block's marker": ("geoprn.store", "-", "mark_done", "after"),
    "after every block, before the mask": ("geoprn.pipeline", "-", "write_mask_cog", "before"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS), ids=list(KILL_POINTS))
def test_the_same_command_resumes_after_a_kill_at_any_point(
    point, scene, models, reference, tmp_path
):
    """A run SIGKILLed at each point where it writes: rerunning the same command finishes it
    with exit 0 and the outputs of an uninterrupted run. (Killed right after the empty store
    was created, an earlier version refused: "already holds ...; use --overwrite".)"""
    out = tmp_path / "out"
    args = ["refine", str(scene), "-o", str(out), *options(models), "--device", "cpu"]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED, *KILL_POINTS[point], *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # the point was reached
    assert not (out / f"{STEM}_mask.tif").exists()

    result = refine(scene, out, models)
    assert result.exit_code == 0, result.output
    assert_same_outputs(out, reference)
    record = blocks_record(out)
    assert record["computed"] + record["resumed"] == BLOCKS, record
    assert not (out / f".{STEM}.lock").exists()


# -- chunks deleted or damaged after the run (point 20) -------------------------------------


@pytest.fixture
def nodata_scene(tmp_path) -> Path:
    """The scene with its bottom-right block all nodata (0): a block that writes no chunk."""
    pixels = massachusetts_pixels(600, 700)
    pixels[pixels == 0] = 1
    pixels[:, 512:, 512:] = 0
    return write_raster(tmp_path / f"{STEM}.tif", pixels, nodata=0)


def test_chunks_deleted_or_damaged_after_the_run_are_computed_again(nodata_scene, models, tmp_path):
    """Done markers record each block's chunks and their checksums: a rerun finds a chunk
    deleted, one overwritten with garbage and one written into the nodata block, computes
    those three blocks again, says how many, and ends with the outputs of the first run."""
    out, first = tmp_path / "out", tmp_path / "first"
    assert refine(nodata_scene, out, models).exit_code == 0
    shutil.copytree(out, first)

    untouched = refine(nodata_scene, out, models)  # nothing changed: nothing recomputed
    assert untouched.exit_code == 0 and "no longer match" not in untouched.stderr
    assert blocks_record(out) == {
        "total": BLOCKS,
        "computed": 0,
        "skipped": 0,
        "resumed": BLOCKS,
        "repaired": 0,
    }

    store = out / f"{STEM}.zarr" / "base"
    (store / "0.0").unlink()
    damaged = store / "1.0"
    damaged.write_bytes(np.random.default_rng(0).bytes(damaged.stat().st_size))
    assert not (store / "1.1").exists()  # the nodata block left no chunk
    (store / "1.1").write_bytes((store / "0.1").read_bytes())

    result = refine(nodata_scene, out, models)
    assert result.exit_code == 0, result.output
    assert "geoprn: warning: 3 finished block(s) no longer match" in result.stderr
    record = blocks_record(out)
    assert record["repaired"] == 3 and record["resumed"] == 1, record
    assert record["computed"] == 2 and record["skipped"] == 1, record
    assert not (store / "1.1").exists()  # the stray chunk is gone: the block reads NaN
    assert np.isnan(zarr.open_array(store, mode="r")[512:, 512:]).all()
    assert_same_outputs(out, first)


# -- a full disk (point 11) -----------------------------------------------------------------

DISK = 16 << 20


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A real 16 MiB tmpfs (mounting needs root or CAP_SYS_ADMIN; skipped without)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` but ``leave`` bytes with a file, to delete to free the space."""
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - leave))
    return filler


@pytest.mark.parametrize("phase", ["store", "blocks", "mask"])
def test_a_full_disk_is_one_line_leaves_no_temporary_file_and_resumes(
    phase, small_disk, scene, models
):
    """The disk fills while the store is created, while blocks are written (a 2 MB piece of
    the quicklook, the issue's case) or while the mask is assembled: one line naming the
    file, exit 1, no temporary file left to keep the disk full; once space is freed, the
    same command finishes and gives the outputs of an uninterrupted run."""
    reference = small_disk / "reference"  # also measures what a whole run takes
    before = shutil.disk_usage(small_disk).used
    assert refine(scene, reference, models).exit_code == 0
    needs = shutil.disk_usage(small_disk).used - before
    leave = {"store": 16 << 10, "blocks": 2560 << 10, "mask": needs - (12 << 10)}[phase]
    filler = fill(small_disk, leave)

    out = small_disk / "out"
    result = refine(scene, out, models)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geoprn: error: cannot write "), lines
    assert "No space left on device" in lines[0] and "resume" in lines[0], lines
    assert str(out) in lines[0], lines
    assert leftovers(small_disk) == []
    assert not (out / f".{STEM}.lock").exists()
    if phase == "mask":
        assert not (out / f"{STEM}_run.json").exists()
        assert len(list((out / f".{STEM}.geoprn" / "done").iterdir())) == BLOCKS
    if phase == "blocks":
        assert 0 < len(list((out / f".{STEM}.geoprn" / "done").iterdir())) < BLOCKS

    filler.unlink()
    result = refine(scene, out, models)
    assert result.exit_code == 0, result.output
    assert_same_outputs(out, reference)
    assert leftovers(small_disk) == []


def test_a_full_disk_while_writing_road_vectors(small_disk, scene, models):
    """``refine --vectors`` on a disk that fills while the GeoPackage is written: one line
    naming it, nothing partial left, and the rerun (space freed) writes it whole."""
    vectors = [*options(models), "--device", "cpu", "--vectors"]
    reference = small_disk / "reference"
    before = shutil.disk_usage(small_disk).used
    result = CliRunner().invoke(cli, ["refine", str(scene), "-o", str(reference), *vectors])
    assert result.exit_code == 0, result.output
    needs = shutil.disk_usage(small_disk).used - before
    gpkg = reference / f"{STEM}_roads.gpkg"
    filler = fill(small_disk, needs - gpkg.stat().st_size // 2)

    out = small_disk / "out"
    result = CliRunner().invoke(cli, ["refine", str(scene), "-o", str(out), *vectors])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot write {out / f'{STEM}_roads.gpkg'}" in lines[0], lines
    assert "No space left on device" in lines[0] and "resume" in lines[0], lines
    assert leftovers(small_disk) == [] and not (out / f"{STEM}_roads.gpkg").exists()

    filler.unlink()
    result = CliRunner().invoke(cli, ["refine", str(scene), "-o", str(out), *vectors])
    assert result.exit_code == 0, result.output
    assert_same_outputs(out, reference)
    import pyogrio

    assert (
        pyogrio.read_info(out / f"{STEM}_roads.gpkg")["features"]
        == (pyogrio.read_info(gpkg)["features"])
    )

"""``refine -o s3://bucket/prefix/``: outputs on moto's S3-protocol server on 127.0.0.1, the
same as a local run's, resumed on the bucket after a kill, a lease instead of a lock, damaged
objects recomputed, and one line for a bucket that is not there."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from click.testing import CliRunner

from geoprn.batch import gather_scenes
from geoprn.bucket import LEASE_SECONDS, working_copy
from geoprn.cli.main import cli
from geoprn.errors import OutputError
from geoprn.pipeline import refine
from geoprn.raster import open_raster
from geoprn.remote import s3_filesystem
from tests.conftest import imagery_pixels, write_raster
from tests.servers import put_objects, s3_server

STEM = "scene"


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A real 1024 x 1100 aerial scene (Massachusetts Roads, 1 m, all imagery), UTM 19N."""
    return write_raster(tmp_path_factory.mktemp("scene") / f"{STEM}.tif", imagery_pixels())


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("s3")
    saved = os.environ.get("GEOPRN_CACHE")
    os.environ["GEOPRN_CACHE"] = str(root / "cache")
    with s3_server(root) as endpoint:
        put_objects(endpoint, "outputs", {})
        yield endpoint
    if saved is None:
        os.environ.pop("GEOPRN_CACHE")
    else:
        os.environ["GEOPRN_CACHE"] = saved


def options(models: dict[str, Path]) -> dict:
    return {"base": models["base"], "use_prn": False, "use_bpr": False, "block_size": 512}


@pytest.fixture(scope="module")
def local(scene, models, tmp_path_factory) -> Path:
    """The same run into a local folder: what the bucket must end up holding."""
    out = tmp_path_factory.mktemp("local")
    refine(scene, out, **options(models))
    return out


def download(url: str, folder: Path) -> Path:
    s3_filesystem().get(url.removeprefix("s3://").rstrip("/") + "/", str(folder), recursive=True)
    return folder


def assert_same(a: Path, b: Path) -> None:
    for name in ("base",):
        np.testing.assert_array_equal(
            zarr.open_array(a / f"{STEM}.zarr" / name, mode="r")[:],
            zarr.open_array(b / f"{STEM}.zarr" / name, mode="r")[:],
        )
    for name in ("mask.tif", "quicklook.png"):
        with rasterio.open(a / f"{STEM}_{name}") as x, rasterio.open(b / f"{STEM}_{name}") as y:
            np.testing.assert_array_equal(x.read(), y.read())
            assert x.crs == y.crs and x.transform == y.transform


def test_outputs_on_s3_are_a_local_runs_and_a_rerun_resumes(s3, scene, models, local, tmp_path):
    url = "s3://outputs/first/"
    record = refine(scene, url, **options(models))
    assert record.blocks["computed"] == 6
    assert record.outputs["mask"] == f"s3://outputs/first/{STEM}_mask.tif"
    assert not working_copy(url).joinpath(f"{STEM}.zarr").exists()  # nothing kept here
    assert_same(download(url, tmp_path / "got"), local)
    with open_raster(record.outputs["mask"]) as ds:  # read where it is, through GDAL
        assert ds.crs == rasterio.open(local / f"{STEM}_mask.tif").crs

    rerun = refine(scene, url, **options(models))
    assert rerun.blocks["resumed"] == 6 and rerun.blocks["computed"] == 0
    with pytest.raises(OutputError, match="different command .*threshold"):
        refine(scene, url, **options(models), threshold=0.4)

    fs = s3_filesystem()  # a chunk damaged in the bucket is found and recomputed
    chunk = f"outputs/first/{STEM}.zarr/base/1.1"
    good = fs.cat_file(chunk)
    fs.pipe_file(chunk, b"garbage")
    repaired = refine(scene, url, **options(models))
    assert repaired.blocks["repaired"] == 1 and repaired.blocks["computed"] == 1
    assert fs.cat_file(chunk) == good


def test_a_batch_from_a_bucket_prefix_to_a_bucket(s3, scene, models, tmp_path):
    """Every GeoTIFF under an ``s3://`` prefix (or an ``s3://`` glob's) refined into another
    prefix; the batch's report is an object there too."""
    other = write_raster(tmp_path / "other.tif", imagery_pixels(600, 700))
    put_objects(
        s3, "outputs", {"in/scene.tif": scene, "in/other.tif": other, "in/notes.txt": other}
    )
    assert [s.uri for s in gather_scenes(["s3://outputs/in/o*.tif"])] == [
        "s3://outputs/in/other.tif"
    ]
    result = CliRunner().invoke(
        cli,
        ["refine", "s3://outputs/in/", "-o", "s3://outputs/batch", "--base", str(models["base"]),
         "--refiner", "none"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(s3_filesystem().cat_file("outputs/batch/batch.json"))
    assert [(r["scene"], r["status"]) for r in report["scenes"]] == [
        ("other", "done"), (STEM, "done"),
    ]  # fmt: skip
    for name in ("other", STEM):
        assert s3_filesystem().isfile(f"outputs/batch/{name}_mask.tif")


def test_cluster_workers_write_the_bucket_without_sharing_this_disk(
    s3, scene, models, local, tmp_path
):
    """`--scheduler` with `-o s3://`: the workers keep their working copies on a disk of
    their own (another GEOPRN_CACHE here, as on another machine), upload their blocks
    themselves and keep none of them; the bucket ends up a local run's, vectors too, and a
    rerun resumes from it."""
    from distributed import LocalCluster

    url = "s3://outputs/cluster/"
    elsewhere = tmp_path / "worker-disk"
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        env={"GEOPRN_CACHE": str(elsewhere)},
    ) as cluster:  # fmt: skip
        address = cluster.scheduler_address
        record = refine(scene, url, **options(models), scheduler=address, vectors=True)
        assert record.blocks["computed"] == 6
        rerun = refine(scene, url, **options(models), scheduler=address, vectors=True)
    assert rerun.blocks["resumed"] == 6 and rerun.blocks["computed"] == 0
    copy = elsewhere / "outputs" / working_copy(url).name
    assert (copy / f"{STEM}.zarr" / "base" / ".zarray").is_file()  # the workers wrote there
    left = [p for p in copy.rglob("*") if p.is_file() and ".z" not in p.name]
    assert left == []  # and kept none of their blocks: chunks, pieces, markers uploaded
    got = download(url, tmp_path / "got")
    assert_same(got, local)
    fs = s3_filesystem()
    assert len(fs.ls(f"outputs/cluster/.{STEM}.geoprn/done")) == 6
    assert (got / f"{STEM}_roads.gpkg").is_file()


KILLED_AFTER_TWO_BLOCKS = r"""
import os, signal, sys
from geoprn.bucket import BucketOutputs
push, pushed = BucketOutputs.push_block, []

def push_then_die_at_the_second(self, key, drop=False):
    push(self, key, drop)
    pushed.append(key)
    if len(pushed) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

BucketOutputs.push_block = push_then_die_at_the_second
from geoprn.cli.main import cli
cli(sys.argv[1:])
"""
"""``geoprn`` SIGKILLed right after its second block is in the bucket (not timed: exact)."""


def test_a_killed_run_resumes_on_the_bucket(s3, scene, models, local, tmp_path):
    """SIGKILL once some blocks are in the bucket, and the working copy lost (another
    machine): the same command resumes from the bucket and its outputs are a whole run's."""
    url = "s3://outputs/killed"
    command = [
        sys.executable, "-m", "geoprn", "refine", str(scene), "-o", url, "--base",
        str(models["base"]), "--refiner", "none", "--block-size", "512",
    ]  # fmt: skip
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_TWO_BLOCKS, *command[3:]], capture_output=True,
        text=True,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # two blocks were uploaded
    fs = s3_filesystem()
    assert not fs.exists(f"outputs/killed/{STEM}_run.json")
    shutil.rmtree(working_copy(url))  # as on another machine

    result = CliRunner().invoke(cli, command[3:])  # the lease of the killed run is there...
    assert result.exit_code == 1 and "being written by another run" in result.output
    lease = f"outputs/killed/.{STEM}.lock"
    held = json.loads(fs.cat_file(lease))
    fs.pipe_file(lease, json.dumps({**held, "expires": time.time() - 1}).encode())
    result = CliRunner().invoke(cli, command[3:])  # ...and taken over once it expires
    assert result.exit_code == 0, result.output
    record = json.loads(fs.cat_file(f"outputs/killed/{STEM}_run.json"))
    assert record["blocks"]["resumed"] == 2 and record["blocks"]["computed"] == 4
    assert not s3_filesystem().exists(lease)
    assert_same(download(url, tmp_path / "got"), local)
    assert LEASE_SECONDS >= 60


def test_a_bucket_that_is_not_there_is_one_line(s3, scene, models, tmp_path):
    result = CliRunner().invoke(
        cli, ["refine", str(scene), "-o", "s3://no-such-bucket/x", "--base", str(models["base"])]
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cannot write s3://no-such-bucket/x" in lines[0], lines

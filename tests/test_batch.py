"""``geoprn refine`` over many scenes: folders, globs, ``--scenes`` lists and STAC items; the
models load once, failures stay local, the report, and resume after a kill."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import zarr
from click.testing import CliRunner

from geoprn.batch import gather_scenes, stac_scenes
from geoprn.cli.main import cli
from geoprn.errors import InputError
from geoprn.models.checkpoint import load_cached
from geoprn.pipeline import refine
from tests.conftest import SAMPLE_SCENE, imagery_pixels, write_raster


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    """Real scenes in one folder (two Massachusetts crops on a UTM grid, the Paris sample),
    and beside them, elsewhere, a truncated copy and a one-band scene."""
    root = tmp_path_factory.mktemp("batch")
    folder = root / "scenes"
    folder.mkdir()
    pixels = imagery_pixels(1024, 1100)
    found = {
        "north": write_raster(folder / "north.tif", np.ascontiguousarray(pixels[:, :, :600])),
        "south": write_raster(folder / "south.tif", np.ascontiguousarray(pixels[:, :, 424:])),
        "paris": Path(shutil.copy(SAMPLE_SCENE, folder / "paris.tif")),
    }
    bad = root / "bad"
    bad.mkdir()
    data = SAMPLE_SCENE.read_bytes()
    (bad / "truncated.tif").write_bytes(data[: len(data) // 3])
    found["truncated"] = bad / "truncated.tif"
    found["gray"] = write_raster(bad / "gray.tif", pixels[:1, :300, :300].copy())
    found["folder"] = folder
    return found


def _arrays(outdir: Path, stem: str) -> dict[str, np.ndarray]:
    store = zarr.open_group(outdir / f"{stem}.zarr", mode="r")
    with rasterio.open(outdir / f"{stem}_mask.tif") as ds:
        mask = ds.read(1)
    return {"base": store["base"][:], "refined": store["refined"][:], "mask": mask}


def _options(models: dict[str, Path]) -> list[str]:
    return ["--base", str(models["base"]), "--refiner", "prn", "--prn", str(models["prn"])]


def test_a_batch_loads_the_models_once_and_keeps_failures_local(scenes, models, tmp_path):
    """A folder, a glob and two bad scenes in one run: the good scenes' outputs are those of
    separate runs, the bad ones are reported with their reason, the exit status is 1."""
    out = tmp_path / "out"
    arguments = [str(scenes["folder"]), str(scenes["truncated"]), str(scenes["gray"])]
    load_cached.cache_clear()
    result = CliRunner().invoke(
        cli, ["refine", *arguments, "-o", str(out), *_options(models), "--block-size", "512"]
    )
    assert result.exit_code == 1, result.output
    assert load_cached.cache_info().misses == 2  # base model and PRN, once for five scenes
    assert "2 of 5 scenes failed" in result.output
    report = json.loads((out / "batch.json").read_text())
    rows = {row["scene"]: row for row in report["scenes"]}
    assert [row["scene"] for row in report["scenes"]] == [
        "north", "paris", "south", "truncated", "gray",
    ]  # fmt: skip
    assert {name: rows[name]["status"] for name in rows} == {
        "north": "done", "paris": "done", "south": "done", "truncated": "failed",
        "gray": "failed",
    }  # fmt: skip
    assert "truncated" in rows["truncated"]["reason"]
    assert "1 band" in rows["gray"]["reason"]
    assert rows["north"]["computed"] == 4 and rows["south"]["computed"] == 4
    assert rows["north"]["area_km2"] == pytest.approx(1024 * 600 / 1e6)
    for line in ("north", "paris", "south", "truncated", "gray"):
        assert any(row.startswith(line) for row in result.stdout.splitlines())
    for name in ("north", "south", "paris"):  # what a run of its own gives, bit for bit
        alone = tmp_path / f"alone_{name}"
        refine(
            scenes[name], alone, base=models["base"], prn=models["prn"], use_prn=True,
            use_bpr=False, block_size=512,
        )  # fmt: skip
        batch, single = _arrays(out, name), _arrays(alone, name)
        for key in batch:
            np.testing.assert_array_equal(batch[key], single[key], err_msg=f"{name} {key}")
    assert not (out / "truncated.zarr").exists() and not (out / "gray.zarr").exists()


def test_on_a_cluster_the_next_scene_starts_before_the_last_one_ends(scenes, models, tmp_path):
    """Two scenes in flight on a real cluster: the next scene starts as soon as one lane is
    free, while the other scene is still running; a failing scene stays its own, and every
    output is bit for bit what one scene at a time writes.

    Which of two scenes ends first depends on the machine (how dask interleaves their blocks),
    so the test does not race them: north, once refined, does not end until south has begun or
    a minute has passed. With two lanes south begins when paris ends; one scene at a time,
    south could only begin after north, and north would wait in vain."""
    from distributed import LocalCluster

    from geoprn.batch import gather_scenes, refine_batch

    south_began, waits = threading.Event(), []

    @contextlib.contextmanager
    def hold_north(source):
        if source.name == "south":
            south_began.set()
        yield {}
        if source.name == "north":
            waits.append(south_began.wait(timeout=60))

    sources = gather_scenes([str(scenes[n]) for n in ("paris", "truncated", "north", "south")])
    options = {"base": models["base"], "prn": models["prn"], "use_prn": True, "use_bpr": False,
               "block_size": 512, "device": "cpu"}  # fmt: skip
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        both = refine_batch(
            sources, tmp_path / "both", scheduler=address, callbacks=hold_north, **options
        )
        one = refine_batch(sources, tmp_path / "one", scheduler=address, in_flight=1, **options)
    rows = {r.scene: r for r in both.scenes}
    assert [r.status for r in both.scenes] == ["done", "failed", "done", "done"]
    assert [r.status for r in one.scenes] == ["done", "failed", "done", "done"]
    assert "truncated" in rows["truncated"].reason
    north, south, paris = rows["north"], rows["south"], rows["paris"]
    assert north.began < paris.began + paris.seconds  # two scenes were in flight at once
    assert waits == [True]  # south began while north was still in flight
    rounding = 0.002  # began and seconds are each rounded to the millisecond
    assert south.began >= paris.began + paris.seconds - rounding  # in paris's lane, once free
    solo = {r.scene: r for r in one.scenes}
    assert solo["north"].began >= solo["paris"].began + solo["paris"].seconds - rounding
    assert solo["south"].began >= solo["north"].began + solo["north"].seconds - rounding
    for name in ("north", "south", "paris"):
        together, alone = _arrays(tmp_path / "both", name), _arrays(tmp_path / "one", name)
        for key in together:
            np.testing.assert_array_equal(together[key], alone[key], err_msg=f"{name} {key}")
    saved = json.loads((tmp_path / "both" / "batch.json").read_text())
    assert [r["status"] for r in saved["scenes"]] == ["done", "failed", "done", "done"]


def test_a_scene_list_and_globs(scenes, models, tmp_path):
    """``--scenes FILE`` (comments and blank lines skipped) plus a glob argument; a glob that
    matches nothing is a failed row, not a crash."""
    listing = tmp_path / "scenes.txt"
    listing.write_text(f"# two scenes\n{scenes['north']}\n\n{scenes['paris']}\n")
    pattern = str(scenes["folder"] / "s*.tif")
    missing = str(tmp_path / "nothing" / "*.tif")
    sources = gather_scenes([pattern, missing], listing)
    assert [(s.name, s.problem is None) for s in sources] == [
        ("south", True), (missing, False), ("north", True), ("paris", True),
    ]  # fmt: skip
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["refine", "--scenes", str(listing), pattern, "-o", str(out), *_options(models)]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "batch.json").read_text())["scenes"]
    assert [(r["scene"], r["status"]) for r in rows] == [
        ("south", "done"), ("north", "done"), ("paris", "done"),
    ]  # fmt: skip
    result = CliRunner().invoke(cli, ["refine", missing, "-o", str(out), *_options(models)])
    assert result.exit_code == 1 and f"no file matches {missing}" in result.output


def test_two_scenes_with_one_name_are_refused(scenes, tmp_path):
    other = tmp_path / "north.tif"
    shutil.copy(scenes["north"], other)
    with pytest.raises(InputError, match="both write outputs named 'north'"):
        gather_scenes([str(scenes["north"]), str(other)])


def _item(item_id: str, assets: dict[str, pystac.Asset]) -> pystac.Item:
    item = pystac.Item(
        item_id, {"type": "Point", "coordinates": [-71.0, 42.3]}, None,
        pystac.utils.str_to_datetime("2026-01-01T00:00:00Z"), {},
    )  # fmt: skip
    for key, asset in assets.items():
        item.add_asset(key, asset)
    return item


def test_stac_items_name_their_outputs(scenes, models, tmp_path):
    """An ItemCollection file: each item's ``visual`` asset (else its first GeoTIFF asset,
    or ``--asset KEY``) is a scene named by the item's id; relative hrefs are relative to
    the file; an item without such an asset fails alone."""
    cog = "image/tiff; application=geotiff; profile=cloud-optimized"
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    shutil.copy(scenes["north"], catalog / "north.tif")
    items = [
        _item("item-a", {"visual": pystac.Asset("north.tif", media_type=cog)}),
        _item(
            "item-b",
            {
                "thumbnail": pystac.Asset(str(scenes["paris"]), media_type="image/png"),
                "image": pystac.Asset(str(scenes["paris"]), media_type=cog),
                "red": pystac.Asset(str(scenes["south"]), media_type=cog),
            },
        ),
        _item("item-c", {"thumbnail": pystac.Asset("quick.png", media_type="image/png")}),
    ]
    path = catalog / "items.json"
    path.write_text(json.dumps(pystac.ItemCollection(items).to_dict()))
    found = {s.name: s for s in stac_scenes(path)}
    assert found["item-a"].uri == str(catalog / "north.tif")
    assert found["item-b"].uri == str(scenes["paris"])
    assert "no GeoTIFF asset" in found["item-c"].problem
    assert stac_scenes(path, "red")[1].uri == str(scenes["south"])
    single = catalog / "one.json"
    single.write_text(json.dumps(items[0].to_dict()))
    assert [s.name for s in stac_scenes(single)] == ["item-a"]

    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["refine", "--stac", str(path), "-o", str(out), *_options(models)]
    )
    assert result.exit_code == 1, result.output
    assert (out / "item-a.zarr").is_dir() and (out / "item-b_mask.tif").is_file()
    rows = {r["scene"]: r["status"] for r in json.loads((out / "batch.json").read_text())["scenes"]}
    assert rows == {"item-a": "done", "item-b": "done", "item-c": "failed"}

    not_stac = tmp_path / "not.json"
    not_stac.write_text('{"type": "Catalog"}')
    with pytest.raises(InputError, match="not a STAC Item or ItemCollection"):
        stac_scenes(not_stac)


def _batch_process(scenes, models, tmp_path) -> tuple[Path, Path, list[str], dict]:
    """A three-scene ``--scenes`` batch as a command line: its list, OUTDIR, argv, env."""
    listing = tmp_path / "scenes.txt"
    listing.write_text("\n".join(str(scenes[n]) for n in ("north", "south", "paris")))
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "geoprn", "refine", "--scenes", str(listing),
        "-o", str(out), *_options(models), "--block-size", "512",
    ]  # fmt: skip
    return listing, out, command, {**os.environ, "PYTHONWARNINGS": "ignore"}


def _wait_for_a_block(done: Path, process: subprocess.Popen) -> None:
    """Until a block of the scene whose markers go to ``done`` is finished."""
    deadline = time.monotonic() + 300
    while not (done.is_dir() and os.listdir(done)) and time.monotonic() < deadline:
        assert process.poll() is None, "the batch ended before it was stopped"
        time.sleep(0.05)


def test_ctrl_c_stops_a_batch_in_one_line_and_the_same_command_resumes(scenes, models, tmp_path):
    """SIGINT (Ctrl-C) once the second scene has a block done: exit 130 with one line, the
    report says which scene was interrupted and which were not reached, and the same
    command resumes. The child gets SIGINT's default disposition back before Python starts,
    since one inherited as ignored (a shell's background job) would never reach it."""
    listing, out, command, env = _batch_process(scenes, models, tmp_path)
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    _wait_for_a_block(out / ".south.geoprn" / "done", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted; rerun the same command to resume" in stderr
    assert "Traceback" not in stderr, stderr
    rows = {r["scene"]: r for r in json.loads((out / "batch.json").read_text())["scenes"]}
    statuses = {name: row["status"] for name, row in rows.items()}
    assert statuses == {"north": "done", "south": "interrupted", "paris": "pending"}
    assert not (out / ".south.lock").exists()  # the lock is released on the way out

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    rows = {r["scene"]: r for r in json.loads((out / "batch.json").read_text())["scenes"]}
    assert {row["status"] for row in rows.values()} == {"done"}
    assert rows["north"]["resumed"] == 4 and rows["south"]["resumed"] >= 1
    assert rows["paris"]["computed"] == 4


def test_a_killed_batch_resumes_every_scene(scenes, models, tmp_path):
    """SIGKILL once the second scene has a block done, then the same command: the first
    scene is all resumed, the second partly, and every output is what an unbroken batch
    writes."""
    listing, out, command, env = _batch_process(scenes, models, tmp_path)
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for_a_block(out / ".south.geoprn" / "done", process)
    process.send_signal(signal.SIGKILL)
    process.wait(120)
    assert (out / "north_run.json").is_file() and not (out / "paris_run.json").exists()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    rows = {r["scene"]: r for r in json.loads((out / "batch.json").read_text())["scenes"]}
    assert rows["north"]["resumed"] == 4 and rows["north"]["computed"] == 0
    assert rows["south"]["resumed"] >= 1 and rows["south"]["computed"] <= 3
    assert rows["paris"]["computed"] + rows["paris"]["resumed"] == 4

    whole = tmp_path / "whole"
    CliRunner().invoke(
        cli, ["refine", "--scenes", str(listing), "-o", str(whole), *_options(models),
              "--block-size", "512"],
    )  # fmt: skip
    for name in ("north", "south", "paris"):
        resumed, unbroken = _arrays(out, name), _arrays(whole, name)
        for key in resumed:
            np.testing.assert_array_equal(resumed[key], unbroken[key], err_msg=f"{name} {key}")

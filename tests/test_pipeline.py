"""refine end to end on real imagery: invariance, distribution, resume, nodata, georeferencing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401
import xarray as xr
import zarr

from geoprn import refine
from geoprn.blocks import LANES_PER_THREAD, SHARED_WINDOWS, blocks_in_flight
from geoprn.errors import InputError, OutputError, SchedulerError
from geoprn.inference import predict_array
from geoprn.models.checkpoint import load_cached
from geoprn.tiling import block_grid, lanes
from tests.conftest import SHARED_DATA, massachusetts_pixels, write_raster

STEM = "mass"


def read(outdir: Path, name: str, stem: str = STEM) -> np.ndarray:
    return zarr.open_array(outdir / f"{stem}.zarr" / name, mode="r")[:]


def mask(outdir: Path, stem: str = STEM) -> np.ndarray:
    with rasterio.open(outdir / f"{stem}_mask.tif") as ds:
        return ds.read(1)


@pytest.fixture(scope="module")
def reference(mass_scene, models, tmp_path_factory) -> Path:
    """One uninterrupted local run with 1024 blocks: what every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    refine(mass_scene, out, base=models["base"], prn=models["prn"], block_size=1024, device="cpu")
    return out


def assert_same_outputs(a: Path, b: Path, stem: str = STEM) -> None:
    for name in ("base", "refined"):
        np.testing.assert_array_equal(read(a, name, stem), read(b, name, stem))
    np.testing.assert_array_equal(mask(a, stem), mask(b, stem))
    quicklooks = [rasterio.open(out / f"{stem}_quicklook.png").read() for out in (a, b)]
    np.testing.assert_array_equal(*quicklooks)  # assembled from the blocks' pieces


def test_outputs_are_probabilities_and_a_mask_of_them(reference):
    base, refined = read(reference, "base"), read(reference, "refined")
    assert base.shape == refined.shape == (900, 1100)
    assert np.isfinite(refined).all() and refined.min() >= 0 and refined.max() <= 1
    assert not np.array_equal(base, refined)
    np.testing.assert_array_equal(mask(reference), (refined > 0.5).astype("uint8"))
    record = json.loads((reference / f"{STEM}_run.json").read_text())
    blocks = {"total": 2, "computed": 2, "skipped": 0, "resumed": 0, "repaired": 0}
    assert record["blocks"] == blocks


def test_zarr_and_mask_are_georeferenced_like_the_scene(reference, mass_scene):
    with rasterio.open(mass_scene) as scene:
        crs, transform, shape = scene.crs, scene.transform, scene.shape
    ds = xr.open_zarr(reference / f"{STEM}.zarr", decode_coords="all")
    assert ds.rio.crs == crs and ds.rio.transform() == transform
    assert ds["refined"].shape == shape and ds["refined"].encoding["chunks"] == (512, 512)
    with rasterio.open(f'ZARR:"{reference / f"{STEM}.zarr"}":/refined') as gdal_view:
        assert gdal_view.crs == crs and gdal_view.transform.almost_equals(transform)
        np.testing.assert_array_equal(gdal_view.read(1), read(reference, "refined"))
    with rasterio.open(reference / f"{STEM}_mask.tif") as m:
        assert (m.crs, m.transform, m.shape, m.nodata) == (crs, transform, shape, 255)
        assert m.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and m.overviews(1)


def test_output_does_not_depend_on_block_size(reference, mass_scene, models, tmp_path):
    load_cached.cache_clear()
    order = []
    record = refine(
        mass_scene,
        tmp_path,
        base=models["base"],
        prn=models["prn"],
        block_size=512,
        batch_size=3,
        device="cpu",
        progress=lambda done, total, result: result and order.append(result.key),
    )
    assert record.blocks["computed"] == 6
    # the local scheduler runs the blocks row by row, back and forth
    assert order == ["0_0", "0_1", "0_2", "1_2", "1_1", "1_0"]
    assert record.windows == 2 * 3 * 3  # each window of each stage run once, halos shared
    assert_same_outputs(reference, tmp_path)
    cache = load_cached.cache_info()
    assert cache.misses == 2 and cache.hits == 10  # each model loaded once, not per block


def test_blocks_that_recompute_their_halos_give_the_same_outputs(
    reference, mass_scene, models, tmp_path, monkeypatch
):
    monkeypatch.setenv("GEOPRN_WINDOW_CACHE_MB", "0")  # nothing kept between blocks
    kept = len(SHARED_WINDOWS)
    record = refine(
        mass_scene, tmp_path, base=models["base"], prn=models["prn"], block_size=512, device="cpu"
    )
    assert record.windows > 2 * 3 * 3 and len(SHARED_WINDOWS) == kept
    assert_same_outputs(reference, tmp_path)


def test_blocks_in_parallel_threads_give_the_same_outputs(reference, mass_scene, models, tmp_path):
    record = refine(
        mass_scene,
        tmp_path,
        base=models["base"],
        prn=models["prn"],
        block_size=512,
        threads=3,
        device="cpu",
    )
    assert record.blocks["computed"] == 6 and record.inputs["scheduler"] == "local, 3 thread(s)"
    assert_same_outputs(reference, tmp_path)


def test_distributed_run_equals_local_run(reference, mass_scene, models, tmp_path):
    from distributed import LocalCluster

    ran_on, defaults = {}, set()

    def progress(done, total, result):
        defaults.add(dask.config.get("scheduler", None))  # while refine's client is open
        if result:
            ran_on[result.key] = result.worker

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        record = refine(
            mass_scene,
            tmp_path,
            base=models["base"],
            prn=models["prn"],
            block_size=512,
            device="cpu",
            scheduler=cluster.scheduler_address,
            progress=progress,
        )
    assert record.blocks["computed"] == 6
    assert defaults == {None}  # the client is not made dask's default
    seen = set(ran_on.values())
    assert len(seen) == 2 and not any(w.endswith(f":{os.getpid()}") for w in seen)
    # each run of neighbouring blocks ran in one process, sharing its window cache
    runs = lanes(block_grid(900, 1100, 512), LANES_PER_THREAD * 2)
    assert len(runs) == 2 * LANES_PER_THREAD
    assert all(len({ran_on[b.key] for b in run}) == 1 for run in runs)
    assert_same_outputs(reference, tmp_path)


def test_two_runs_at_once_on_one_cluster_keep_their_own_blocks(mass_scene, models, tmp_path):
    """Two scenes refined at the same time through one scheduler (two users of a cluster):
    their block tasks must not be taken for each other's, so each output equals its local run."""
    from concurrent.futures import ThreadPoolExecutor

    from distributed import LocalCluster

    other = write_raster(tmp_path / "other.tif", massachusetts_pixels(900, 1100)[:, ::-1].copy())
    scenes = {"mass": mass_scene, "other": other}
    options = {"base": models["base"], "use_prn": False, "block_size": 512, "device": "cpu"}
    for stem, scene in scenes.items():
        refine(scene, tmp_path / "local" / stem, **options)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        ThreadPoolExecutor(2) as pool,
    ):
        runs = [
            pool.submit(
                refine,
                scene,
                tmp_path / "cluster" / stem,
                **options,
                scheduler=cluster.scheduler_address,
            )
            for stem, scene in scenes.items()
        ]
        for run in runs:
            assert run.result().blocks["computed"] == 6
    assert dask.config.get("scheduler", None) is None  # no closed client left as the default
    for stem in scenes:
        local, shared = tmp_path / "local" / stem, tmp_path / "cluster" / stem
        np.testing.assert_array_equal(read(local, "base", stem), read(shared, "base", stem))
        np.testing.assert_array_equal(mask(local, stem), mask(shared, stem))


def test_a_worker_lost_mid_run_recomputes_no_finished_block(tmp_path, models):
    """A worker process killed mid-run (a lost node): the scheduler recomputes the results it
    held, back along its run of blocks, but blocks already in the store are not computed again
    (their markers stay as written), and the outputs equal a local run's."""
    from concurrent.futures import ThreadPoolExecutor

    from distributed import LocalCluster

    scene = write_raster(tmp_path / f"{STEM}.tif", massachusetts_pixels(1500, 1500))
    options = {"base": models["base"], "prn": models["prn"], "block_size": 512, "device": "cpu"}
    refine(scene, tmp_path / "local", **options)
    out = tmp_path / "cluster"
    done = out / f".{STEM}.geoprn" / "done"

    def markers() -> list[Path]:
        return [marker for marker in done.glob("*_*") if marker.suffix != ".tmp"]

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        ThreadPoolExecutor(1) as pool,
    ):
        run = pool.submit(refine, scene, out, **options, scheduler=cluster.scheduler_address)
        by_worker: dict[str, list[str]] = {}
        while not run.done() and max(map(len, by_worker.values()), default=0) < 2:
            time.sleep(0.02)
            by_worker.clear()
            for marker in markers():
                by_worker.setdefault(json.loads(marker.read_text())["worker"], []).append(marker)
        victim = max(by_worker, key=lambda w: len(by_worker[w]))
        os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
        before = {marker.name: marker.stat().st_ino for marker in markers()}
        record = run.result()
    assert len(by_worker[victim]) >= 2 and len(before) < 9, "a worker must die mid-run"
    assert record.blocks["computed"] == 9
    assert {m.name: m.stat().st_ino for m in markers() if m.name in before} == before
    assert_same_outputs(tmp_path / "local", out)


def test_blocks_in_flight_are_a_workers_threads():
    """--batch-size auto on a GPU sizes batches for the blocks a process runs at once: the
    local scheduler's threads, or a distributed worker's."""
    from distributed import Client, LocalCluster

    assert blocks_in_flight(3) == 3
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        assert client.submit(blocks_in_flight, 3).result() == 2


def test_unreachable_scheduler_fails_fast(mass_scene, models, tmp_path):
    started = time.perf_counter()
    with pytest.raises(SchedulerError, match="cannot reach"):
        refine(
            mass_scene,
            tmp_path / "out",
            base=models["base"],
            prn=models["prn"],
            device="cpu",
            scheduler="tcp://127.0.0.1:9",
        )
    assert time.perf_counter() - started < 20
    assert not (tmp_path / "out").exists()  # nothing written before the scheduler answered


def test_killed_run_resumes_to_the_same_outputs(tmp_path, models):
    scene = write_raster(tmp_path / f"{STEM}.tif", massachusetts_pixels(1500, 1500))
    args = [
        sys.executable,
        "-m",
        "geoprn",
        "refine",
        str(scene),
        "--base",
        str(models["base"]),
        "--prn",
        str(models["prn"]),
        "--block-size",
        "512",
        "--device",
        "cpu",
    ]
    out = tmp_path / "killed"
    done = out / f".{STEM}.geoprn" / "done"
    proc = subprocess.Popen([*args, "-o", str(out)], stderr=subprocess.DEVNULL)
    while proc.poll() is None and len(list(done.glob("*_*"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(done.glob("*_*")))
    assert 2 <= finished < 9, "the run must be killed mid-way"
    assert not (out / f"{STEM}_mask.tif").exists()

    subprocess.run([*args, "-o", str(out)], check=True, capture_output=True)
    record = json.loads((out / f"{STEM}_run.json").read_text())["blocks"]
    assert record["resumed"] == finished and record["computed"] == 9 - finished
    subprocess.run([*args, "-o", str(tmp_path / "whole")], check=True, capture_output=True)
    assert_same_outputs(out, tmp_path / "whole")


def test_resuming_a_run_without_pieces_makes_them_from_the_store(mass_scene, models, tmp_path):
    """State left by an earlier version (plain-text markers, no pieces of the mask and the
    quicklook): a resumed run computes nothing again and still writes the whole mask and the
    same quicklook, from the stored probabilities."""
    options = {"base": models["base"], "use_prn": False, "block_size": 512, "device": "cpu"}
    refine(mass_scene, tmp_path, **options)
    quicklook = tmp_path / f"{STEM}_quicklook.png"
    before = rasterio.open(quicklook).read()
    state = tmp_path / f".{STEM}.geoprn"
    for piece in sorted((state / "mask").glob("*.tif"))[:2]:
        piece.unlink()
        (state / "quicklook" / f"{piece.stem}.npz").unlink()
        (state / "done" / piece.stem).write_text("computed")
    for output in (tmp_path / f"{STEM}_mask.tif", quicklook):
        output.unlink()
    record = refine(mass_scene, tmp_path, **options)
    assert record.blocks["resumed"] == 6 and record.blocks["computed"] == 0
    np.testing.assert_array_equal(mask(tmp_path), (read(tmp_path, "base") > 0.5).astype("uint8"))
    np.testing.assert_array_equal(rasterio.open(quicklook).read(), before)


def test_a_second_run_on_outputs_being_written_is_refused(tmp_path, models):
    """While one process writes a scene's outputs, another run on them (the same command, or
    one with overwrite) is refused at once and deletes nothing; the first ends intact."""
    scene = write_raster(tmp_path / f"{STEM}.tif", massachusetts_pixels(1500, 1500))
    out = tmp_path / "out"
    options = {"base": models["base"], "prn": models["prn"], "block_size": 512, "device": "cpu"}
    log = tmp_path / "first.log"  # a file, not a pipe: a full pipe would stall the first run
    with log.open("w") as err:  # the child keeps its own copy of the file
        first = subprocess.Popen(
            [sys.executable, "-m", "geoprn", "refine", str(scene), "-o", str(out)]
            + ["--base", str(models["base"]), "--prn", str(models["prn"])]
            + ["--block-size", "512", "--device", "cpu"],
            stderr=err,
        )
    done = out / f".{STEM}.geoprn" / "done"
    while first.poll() is None and not list(done.glob("*_*")):
        time.sleep(0.02)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="another geoprn run is writing"):
            refine(scene, out, **options, overwrite=overwrite)
        assert done.is_dir()  # nothing of the first run's was removed
    assert first.poll() is None, "the first run ended too soon for this test"
    assert first.wait(timeout=300) == 0, log.read_text()
    record = json.loads((out / f"{STEM}_run.json").read_text())["blocks"]
    assert record["computed"] == 9 and (out / f"{STEM}_mask.tif").is_file()


def test_nodata_is_nan_masked_and_empty_blocks_are_skipped(tmp_path, models):
    pixels = massachusetts_pixels(900, 1100)
    pixels[:, :512, :512] = 0  # one whole block without data
    pixels[:, 700:, 900:] = 0  # and a corner of another
    scene = write_raster(tmp_path / f"{STEM}.tif", pixels, nodata=0)
    record = refine(
        scene,
        tmp_path / "out",
        base=models["base"],
        prn=models["prn"],
        block_size=512,
        device="cpu",
    )
    assert record.blocks["skipped"] == 1 and record.blocks["computed"] == 5
    refined, m = read(tmp_path / "out", "refined"), mask(tmp_path / "out")
    nodata = (pixels == 0).all(axis=0)
    assert np.isnan(refined[nodata]).all() and np.isfinite(refined[~nodata]).all()
    assert (m[nodata] == 255).all() and (m[~nodata] <= 1).all()


def test_windows_without_valid_pixels_are_skipped_and_change_no_valid_pixel(
    reference, models, tmp_path
):
    pixels = massachusetts_pixels(900, 1100)
    valid = np.ones((900, 1100), bool)
    valid[:, :700] = False  # a nodata band wider than a window and its overlaps
    valid[850:, 1000:] = False  # a corner no window holds entirely
    model = load_cached(str(models["base"]), "test", "cpu")
    every, some = (predict_array(model, pixels, valid=v) for v in (None, valid))
    np.testing.assert_array_equal(every[valid], some[valid])
    assert not np.array_equal(every[~valid], some[~valid])  # windows were left out
    # refine skips them too: the reference ran the same grid on the whole scene
    pixels[:, ~valid] = 0
    scene = write_raster(tmp_path / f"{STEM}.tif", pixels, nodata=0)
    out = tmp_path / "out"
    record = refine(scene, out, base=models["base"], prn=models["prn"], block_size=1024)
    full = json.loads((reference / f"{STEM}_run.json").read_text())["windows"]
    assert 0 < record.windows < full
    assert np.isnan(read(out, "refined")[~valid]).all()


def test_all_nodata_scene_is_an_error_and_leaves_nothing(tmp_path, models):
    scene = write_raster(tmp_path / "empty.tif", np.zeros((3, 600, 600), np.uint8), nodata=0)
    with pytest.raises(InputError, match="no valid pixels"):
        refine(scene, tmp_path / "out", base=models["base"], prn=models["prn"], device="cpu")
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("shape", [(300, 700), (513, 513), (40, 90)])
def test_odd_and_small_scenes(tmp_path, models, shape):
    scene = write_raster(tmp_path / f"{STEM}.tif", massachusetts_pixels(*shape))
    refine(scene, tmp_path / "out", base=models["base"], prn=models["prn"], device="cpu")
    refined = read(tmp_path / "out", "refined")
    assert refined.shape == shape and np.isfinite(refined).all()


def test_scene_without_crs_gives_outputs_without_crs(tmp_path, models):
    scene = write_raster(tmp_path / f"{STEM}.tif", massachusetts_pixels(300, 400), crs=None)
    with pytest.warns(UserWarning, match="no CRS"):
        refine(scene, tmp_path / "out", base=models["base"], prn=models["prn"], device="cpu")
    with rasterio.open(tmp_path / "out" / f"{STEM}_mask.tif") as m:
        assert m.crs is None and m.shape == (300, 400)
    assert xr.open_zarr(tmp_path / "out" / f"{STEM}.zarr", decode_coords="all").rio.crs is None


def test_uint16_single_band_scene(tmp_path, models):
    scene = SHARED_DATA / "spacenet" / "solaris_pan_utm.tif"
    record = refine(scene, tmp_path, base=models["base1"], use_prn=False, device="cpu")
    base = read(tmp_path, "base", "solaris_pan_utm")
    assert base.shape == (900, 900) and np.isfinite(base).all()
    assert not (tmp_path / "solaris_pan_utm.zarr" / "refined").exists()
    assert record.blocks["computed"] == 1


def test_float32_scene_gives_what_its_uint8_twin_gives(tmp_path, models):
    pixels = massachusetts_pixels(400, 500)
    (tmp_path / "f").mkdir()
    (tmp_path / "u").mkdir()
    as_float = write_raster(tmp_path / "f" / f"{STEM}.tif", pixels.astype(np.float32))
    as_uint8 = write_raster(tmp_path / "u" / f"{STEM}.tif", pixels)
    refine(as_float, tmp_path / "f", base=models["base"], use_prn=False, device="cpu")
    refine(as_uint8, tmp_path / "u", base=models["base"], use_prn=False, device="cpu")
    np.testing.assert_array_equal(read(tmp_path / "f", "base"), read(tmp_path / "u", "base"))


def test_band_selection_and_band_count_errors(tmp_path, models):
    naip = SHARED_DATA / "naip" / "m_4709963_se_14_1_20190904.tif"
    refine(naip, tmp_path / "rgb", base=models["base"], use_prn=False, device="cpu")
    refine(
        naip, tmp_path / "bgr", base=models["base"], use_prn=False, device="cpu", bands=[3, 2, 1]
    )
    stem = naip.stem
    assert not np.array_equal(
        read(tmp_path / "rgb", "base", stem), read(tmp_path / "bgr", "base", stem)
    )
    one_band = SHARED_DATA / "spacenet" / "solaris_pan_utm.tif"
    with pytest.raises(InputError, match="has 1 band"):
        refine(one_band, tmp_path / "x", base=models["base"], device="cpu")
    with pytest.raises(InputError, match="reads 3 bands, 2 are given"):
        refine(naip, tmp_path / "y", base=models["base"], device="cpu", bands=[1, 2])


def test_refining_a_probability_raster(tmp_path, models, reference, mass_scene):
    with rasterio.open(mass_scene) as scene:
        profile = {**scene.profile, "count": 1, "dtype": "float32", "nodata": None}
    probs_path = tmp_path / "probs.tif"
    base = read(reference, "base")
    with rasterio.open(probs_path, "w", **profile) as dst:
        dst.write(base, 1)
    refine(mass_scene, tmp_path / "out", probs=probs_path, prn=models["prn"], device="cpu")
    np.testing.assert_array_equal(read(tmp_path / "out", "base"), base)
    refined = read(tmp_path / "out", "refined")
    assert np.isfinite(refined).all() and not np.array_equal(refined, base)
    shifted = tmp_path / "shifted.tif"
    with rasterio.open(shifted, "w", **{**profile, "width": 1000}) as dst:
        dst.write(base[:, :1000], 1)
    with pytest.raises(InputError, match="not on the grid"):
        refine(mass_scene, tmp_path / "bad", probs=shifted, prn=models["prn"], device="cpu")


def test_a_different_command_on_existing_outputs_is_refused(
    reference, mass_scene, models, tmp_path
):
    out = tmp_path / "out"
    refine(mass_scene, out, base=models["base"], use_prn=False, device="cpu")
    before = read(out, "base")
    with pytest.raises(OutputError, match="differs in: .*threshold"):
        refine(mass_scene, out, base=models["base"], use_prn=False, device="cpu", threshold=0.3)
    np.testing.assert_array_equal(read(out, "base"), before)
    refine(
        mass_scene,
        out,
        base=models["base"],
        prn=models["prn"],
        device="cpu",
        block_size=1024,
        overwrite=True,
    )
    assert_same_outputs(reference, out)


def test_unwritable_output_folder(mass_scene, models, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="cannot create output folder"):
        refine(mass_scene, blocker / "out", base=models["base"], device="cpu")


def test_quicklook_shows_image_base_and_refined(models, tmp_path):
    sample = Path(__file__).resolve().parents[1] / "data" / "sample" / "paris_img1447.tif"
    refine(sample, tmp_path, base=models["base"], prn=models["prn"], device="cpu")
    with rasterio.open(tmp_path / "paris_img1447_quicklook.png") as png:
        picture = png.read().astype(int)
    assert picture.shape == (3, 650, 3 * 650 + 2 * 8)  # three 650 px panels, 8 px gaps
    with rasterio.open(sample) as scene:
        pixels = scene.read()
    # the image panel follows the scene; each probability panel paints it red
    image = picture[:, :, :650]
    assert np.corrcoef(image[0].ravel(), pixels[0].ravel())[0, 1] > 0.9
    for name, start in (("base", 658), ("refined", 1316)):
        panel = picture[:, :, start : start + 650]
        probs = read(tmp_path, name, "paris_img1447")
        alpha = 0.85 * probs[None]
        painted = image * (1 - alpha) + np.array([255, 32, 32])[:, None, None] * alpha
        assert np.abs(panel - painted).max() <= 1.5  # the image, painted red by probability


def test_compiled_models_give_the_eager_outputs(reference, mass_scene, models, tmp_path):
    """refine --compile with three blocks in flight: no deadlock (each thread warms its models
    up before other torch work), one compilation per model (batches padded full, so no
    recompile) and the eager outputs up to bf16 rounding. In a subprocess, so a hang fails."""
    command = [sys.executable, "-m", "geoprn", "refine", str(mass_scene), "-o", str(tmp_path)]
    options = ["--base", str(models["base"]), "--prn", str(models["prn"]), "--device", "cpu"]
    options += ["--block-size", "512", "--threads", "3", "--compile"]
    env = {**os.environ, "TORCH_LOGS": "recompiles"}
    run = subprocess.run(command + options, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    # base and PRN share Predictor.forward: the second model is its one recompilation, for
    # its own input (1 band, not 3); a short last batch would add one for the batch size
    assert run.stderr.count("Recompiling function") == 1
    assert "mismatch at index 1. expected 3, actual 1" in run.stderr
    for name in ("base", "refined"):
        compiled, eager = read(tmp_path, name), read(reference, name)
        np.testing.assert_array_equal(np.isnan(compiled), np.isnan(eager))
        np.testing.assert_allclose(compiled, eager, atol=0.02)
    assert (mask(tmp_path) == mask(reference)).mean() > 0.999


def test_a_compiler_that_cannot_compile_is_one_line(mass_scene, models, tmp_path):
    """No C++ compiler for torch.compile (CXX names none, empty compile cache): one line
    naming the failure and the way out, exit 1, no traceback."""
    command = [sys.executable, "-m", "geoprn", "refine", str(mass_scene), "-o", str(tmp_path)]
    options = ["--base", str(models["base"]), "--no-prn", "--device", "cpu", "--compile"]
    env = {
        **os.environ,
        "CXX": "/nonexistent/c++",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    run = subprocess.run(command + options, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert "--compile failed" in run.stderr and "run without --compile" in run.stderr

"""Many scenes in one ``refine`` run against one process per scene, and remote reads against
local ones.

(a) ``--scenes`` small real scenes (default 16: the first crops of ``massachusetts_crops/test``,
    400 x 400 px at 1 m, written as GeoTIFFs on a UTM 19N grid) refined as one batch
    (``geoprn refine FOLDER -o OUT``) and as that many ``geoprn refine SCENE -o OUT``
    processes one after another; same weights (the shipped ones, the default refiner rule),
    same options. Printed: seconds of each, their ratio, and the share of the separate
    processes' time that starting one took: Python, imports, loading the models and the first
    (warm-up) forward pass, timed alone in fresh processes (median of 3).
(b) a real mosaic (``--tiles`` x ``--tiles`` Massachusetts tiles, 1500 px each, as a COG with
    512 px tiles) read from moto's S3-protocol server and from a plain HTTP server with byte
    ranges (``tests/servers.py``), each in a process of its own on 127.0.0.1, against the same
    file read locally: block by block as ``refine``'s block tasks read it (each block with
    the halo its windows need, ``--block-size`` px, default 1024 so the scene has several),
    and ``refine`` on the whole scene at that block size (base model only). Runs alternate
    local / S3 / HTTP, ``--repeats`` times; medians of tiles/s are printed.

(c) ``--cluster-scenes`` real Massachusetts tiles (default 6, 1500 px at 1 m, from the
    ``test`` and ``val`` splits) as one batch on a local two-worker ``distributed`` cluster
    (one thread each), scenes in flight one at a time against two at once
    (:data:`geoprn.batch.SCENES_IN_FLIGHT`), ``--block-size`` blocks, runs alternating,
    ``--repeats`` of each (at most 3); median seconds, their ratio, identical masks checked.

Everything runs on this machine's CPUs; about 12 minutes on 2 cores with the defaults.

    python benchmarks/batch.py
    python benchmarks/batch.py --scenes 8 --tiles 2 --repeats 3
    python benchmarks/batch.py --skip ab          # (c) alone
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from memory import build_mosaic  # noqa: E402

from geoprn.errors import run_script  # noqa: E402
from geoprn.pipeline import refine  # noqa: E402
from geoprn.raster import open_raster, read_region  # noqa: E402
from geoprn.tiling import block_grid, serpentine, stage_regions, window_origins  # noqa: E402
from tests.servers import http_server, put_objects, s3_server, to_cog  # noqa: E402

DATA = REPO.parent / "shared" / "data"
GEOPRN = [sys.executable, "-m", "geoprn"]
STARTUP = """
import time
started = time.perf_counter()
import torch
from geoprn.models.checkpoint import DEFAULT_BASE, file_sha256, load_cached
import geoprn.pipeline
model = load_cached(str(DEFAULT_BASE), file_sha256(DEFAULT_BASE), "cpu")
with torch.inference_mode():
    model(torch.zeros(1, 3, 512, 512))
print(time.perf_counter() - started)
"""


def write_scenes(folder: Path, count: int, sources: list[Path] | None = None) -> list[Path]:
    """The first ``count`` of ``sources`` (default: the crops of massachusetts_crops/test)
    as GeoTIFFs, 1 m, UTM 19N."""
    folder.mkdir(parents=True, exist_ok=True)
    found = sources or sorted((DATA / "massachusetts_crops" / "test" / "images").glob("*"))
    sources = found[:count]
    scenes = []
    for k, source in enumerate(sources):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(source) as src:
                pixels = src.read([1, 2, 3])
        path = folder / f"{source.stem}.tif"
        profile = {
            "driver": "GTiff", "width": pixels.shape[2], "height": pixels.shape[1], "count": 3,
            "dtype": "uint8", "crs": "EPSG:26919", "compress": "deflate",
            "transform": from_origin(300_000 + 1000 * k, 4_700_000, 1.0, 1.0),
        }  # fmt: skip
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(pixels)
        scenes.append(path)
    return scenes


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def batch_against_processes(root: Path, count: int) -> None:
    scenes = write_scenes(root / "scenes", count)
    startup = statistics.median(
        float(subprocess.run([sys.executable, "-c", STARTUP], check=True, capture_output=True,
                             text=True).stdout)
        for _ in range(3)
    )  # fmt: skip
    batch = timed([*GEOPRN, "refine", str(root / "scenes"), "-o", str(root / "batch")])
    separate = sum(
        timed([*GEOPRN, "refine", str(scene), "-o", str(root / "separate")]) for scene in scenes
    )
    rows = json.loads((root / "batch" / "batch.json").read_text())["scenes"]
    assert all(row["status"] == "done" for row in rows), rows
    for scene in scenes:  # the same outputs either way
        with (
            rasterio.open(root / "batch" / f"{scene.stem}_mask.tif") as a,
            rasterio.open(root / "separate" / f"{scene.stem}_mask.tif") as b,
        ):
            assert np.array_equal(a.read(), b.read()), scene
    print(f"\n(a) {count} scenes of 400 x 400 px, shipped weights, CPU")
    print("| run | seconds | per scene | ratio |")
    print("|---|---|---|---|")
    print(
        f"| {count} separate `refine` processes | {separate:.1f} | {separate / count:.2f} | 1.00 |"
    )
    print(
        f"| one batch (`refine FOLDER`) | {batch:.1f} | {batch / count:.2f} | "
        f"{separate / batch:.2f}x faster |"
    )
    print(
        f"starting a process (Python, imports, models, warm-up pass): {startup:.2f} s, "
        f"{100 * startup * count / separate:.0f} % of the separate processes' time"
    )


def read_blocks(path: str, block: int) -> int:
    """Read ``path`` as the block tasks of one stage do: each ``block`` px block of
    :func:`geoprn.tiling.block_grid`, with the halo its windows need
    (:func:`geoprn.tiling.stage_regions`), through :func:`geoprn.raster.read_region`; returns
    the scene's 512 px tiles read (each once, halos not counted)."""
    with open_raster(path) as ds:
        origins = (window_origins(ds.height, 512, 64), window_origins(ds.width, 512, 64))
        for b in serpentine(block_grid(ds.height, ds.width, block)):
            region = stage_regions(origins, b.rows, b.cols, 512, 1)[0]
            read_region(ds, [1, 2, 3], *region)
        return -(-ds.height // 512) * -(-ds.width // 512)


def remote_against_local(root: Path, tiles: int, repeats: int, block: int) -> None:
    mosaic = build_mosaic(root / "mosaic.tif", tiles, DATA / "massachusetts")
    cog = to_cog(mosaic, root / "mosaic_cog.tif", 512)
    with rasterio.open(cog) as ds:
        scene_tiles = ds.width * ds.height / 512**2
    reads: dict[str, list[float]] = {"local": [], "S3": [], "HTTP": []}
    runs: dict[str, list[float]] = {"local": [], "S3": [], "HTTP": []}
    with s3_server(root) as endpoint, http_server(cog.parent, own_process=True) as (url, _):
        put_objects(endpoint, "scenes", {"mosaic.tif": cog})
        where = {"local": str(cog), "S3": "s3://scenes/mosaic.tif", "HTTP": f"{url}/{cog.name}"}
        for repeat in range(repeats):
            for name, path in where.items():
                started = time.perf_counter()
                count = read_blocks(path, block)
                reads[name].append(count / (time.perf_counter() - started))
                out = root / f"refine_{name}_{repeat}"
                record = refine(path, out, use_prn=False, use_bpr=False, block_size=block)
                runs[name].append(scene_tiles / record.seconds["total"])
                shutil.rmtree(out)
    side = 1500 * tiles
    print(
        f"\n(b) a {side} x {side} px COG (512 px tiles, deflate), blocks of {block} px, "
        f"{repeats} runs each, medians"
    )
    print("| read from | tiles read/s (block reads) | `refine` tiles/s (base model) |")
    print("|---|---|---|")
    for name in reads:
        read, run = statistics.median(reads[name]), statistics.median(runs[name])
        print(f"| {name} | {read:.1f} | {run:.2f} |")
    for name in ("S3", "HTTP"):
        read_ratio = statistics.median(reads[name]) / statistics.median(reads["local"])
        run_ratio = statistics.median(runs[name]) / statistics.median(runs["local"])
        print(f"{name} / local: reads {read_ratio:.2f}, refine {run_ratio:.2f}")


def scenes_in_flight(root: Path, count: int, repeats: int, block: int) -> None:
    from distributed import LocalCluster

    from geoprn.batch import SCENES_IN_FLIGHT, gather_scenes, refine_batch

    folders = [DATA / "massachusetts" / split / "images" for split in ("test", "val")]
    tiles = [tile for folder in folders for tile in sorted(folder.glob("*.png"))]
    scenes = write_scenes(root / "tiles", count, tiles)
    sources = gather_scenes([str(p) for p in scenes])
    seconds: dict[int, list[float]] = {1: [], SCENES_IN_FLIGHT: []}
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        for repeat in range(min(repeats, 3)):
            for lanes in seconds:
                out = root / f"cluster_{lanes}_{repeat}"
                report = refine_batch(
                    sources, out, scheduler=cluster.scheduler_address, in_flight=lanes,
                    block_size=block, device="cpu",
                )  # fmt: skip
                assert not report.failed, report
                seconds[lanes].append(report.seconds)
    for scene in scenes:  # the same masks either way
        with (
            rasterio.open(root / "cluster_1_0" / f"{scene.stem}_mask.tif") as a,
            rasterio.open(root / f"cluster_{SCENES_IN_FLIGHT}_0" / f"{scene.stem}_mask.tif") as b,
        ):
            assert np.array_equal(a.read(), b.read()), scene
    one, both = (statistics.median(seconds[k]) for k in seconds)
    print(
        f"\n(c) {count} scenes of 1500 x 1500 px, blocks of {block} px, on a local cluster of 2 "
        f"single-threaded workers, shipped weights; {len(seconds[1])} runs each, medians"
    )
    print("| scenes in flight | seconds | per scene | ratio |")
    print("|---|---|---|---|")
    print(f"| 1 (one after another) | {one:.1f} | {one / count:.2f} | 1.00 |")
    print(
        f"| {SCENES_IN_FLIGHT} (the default on a cluster) | {both:.1f} | {both / count:.2f} | "
        f"{one / both:.2f}x faster |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--tiles", type=int, default=2, help="mosaic side, in 1500 px tiles")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=1024, help="refine's, and the reads'")
    parser.add_argument("--cluster-scenes", type=int, default=6)
    parser.add_argument("--skip", default="", help="any of a, b, c")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO.parent) as tmp:
        root = Path(tmp)
        if "a" not in args.skip:
            batch_against_processes(root, args.scenes)
        if "b" not in args.skip:
            remote_against_local(root, args.tiles, args.repeats, args.block_size)
        if "c" not in args.skip:
            scenes_in_flight(root, args.cluster_scenes, args.repeats, args.block_size)


if __name__ == "__main__":
    run_script(main)

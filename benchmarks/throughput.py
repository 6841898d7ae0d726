"""Throughput of ``geoprn.refine`` beside the models' own limit, a hand-written loop and TorchGeo.

Same scene, same weights, same device and batch size for every run:

(a) the limit: the forward passes alone (base, then PRN) over the windows that cover the scene
    once at ``refine``'s overlap, inputs already in memory as tensors, no I/O; the models run
    as ``refine`` runs them (batch norms folded, channels-last, ``--precision``);
(b) ``geoprn.refine`` end to end: reads, blending, halos, Zarr, COG mask, quicklook;
(c) the loop a user writes by hand: rasterio windows of 512 one by one, no overlap, batch 1,
    probabilities written to a GeoTIFF, the models as ``geoprn.models.checkpoint.load_model``
    gives them (eval mode, fp32: what a user's own loop runs);
(d) TorchGeo's GridGeoSampler + DataLoader, no overlap, the same GeoTIFF written, the models
    as in (c), when ``torchgeo`` is importable (an optional dependency of this benchmark only);
(e) the loop of (c) with the models run as ``refine`` runs them: the difference between (b)
    and (e) is the pipeline's alone (overlap, halos, blending, I/O), not the arithmetic's.

(a) and (b) run ``--repeats`` times in turn and their medians are printed (the spread too);
(c), (d) and (e) run once. Each prints seconds, scene tiles/s (the scene's area in 512 x 512
tiles over the seconds, so rates compare whatever each run computes), km²/h at the scene's
resolution and at 0.5 m/px (the GPU target's: the same tiles/s at 0.0655 km² a tile), and the
ratios of seconds (a)/(b), (c)/(b), (d)/(b), (e)/(b); then the recompute
factor, windows ``refine`` runs over the windows that cover the scene once (per stage), for
this scene and for larger ones.

The default scene is one Massachusetts test tile as a GeoTIFF on a UTM 19N grid at 1 m
(1500 x 1500 px, built by ``memory.py``; ``--tiles N`` mosaics N x N tiles); base + PRN on 2
CPU cores take about 7 minutes for all runs. Models and refine's modules are loaded before
any timing; every run sees the scene's own pixels (``resample="off"``). TorchGeo is not a
dependency of geoprn: install it beside it (``pip install torchgeo``) to time (d).

    python benchmarks/throughput.py                       # base + PRN, one tile, CPU
    python benchmarks/throughput.py --tiles 4 --no-prn    # base only, 6000 x 6000 px
    python benchmarks/throughput.py SCENE.tif --device cuda --batch-size 32 --skip c,d,e
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window, from_bounds

sys.path.insert(0, str(Path(__file__).parent))
from memory import build_mosaic  # noqa: E402

from geoprn.blocks import window_cache_bytes  # noqa: E402
from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import (  # noqa: E402
    PRECISIONS,
    autocast_dtype,
    fast_math,
    resolve_device,
    windows_run,
)
from geoprn.models.checkpoint import (  # noqa: E402
    DEFAULT_BASE,
    DEFAULT_PRN,
    file_sha256,
    load_cached,
    load_model,
    read_header,
)
from geoprn.models.header import reads_image  # noqa: E402
from geoprn.pipeline import refine  # noqa: E402  (imported before timing)
from geoprn.raster import SceneInfo, open_scene, read_region  # noqa: E402
from geoprn.tiling import block_grid, serpentine, window_origins  # noqa: E402

TILE = 512
Predict = Callable[..., torch.Tensor]


def load_predict(
    base: Path, prn: Path | None, device: torch.device, precision: str | None, compiled: bool
) -> Predict:
    """Base model then PRN; (N, C, H, W) in, probs out (on the host unless ``to_host`` is
    False). With a ``precision``, loaded and run as ``refine`` runs them (``compiled`` as
    ``refine --compile``); with None, as ``load_model`` gives them, in fp32."""
    paths = [p for p in (base, prn) if p]
    if precision is None:
        models = [load_model(p, device=device) for p in paths]
        layout, precision = torch.contiguous_format, "fp32"
    else:
        models = [load_cached(str(p), file_sha256(p), str(device), compiled) for p in paths]
        layout = torch.channels_last

    def predict(x: torch.Tensor, to_host: bool = True) -> torch.Tensor:
        with torch.inference_mode(), fast_math(device, precision):
            image = x = x.to(device, non_blocking=True).contiguous(memory_format=layout)
            for i, model in enumerate(models):
                if i and reads_image(model.geoprn_meta):  # the image beside the probabilities
                    x = torch.cat([x.to(image.dtype), image], 1).contiguous(memory_format=layout)
                x = model(x)
            return x[:, 0].float().cpu() if to_host else x

    return predict


def run_limit(
    info: SceneInfo,
    bands: list[int],
    predict: Predict,
    windows: int,
    batch_size: int,
    device: torch.device,
    full_batches: bool,
) -> float:
    """(a): seconds of the forward passes over ``windows`` windows in batches, after a
    warm-up; the inputs are real scene pixels, read once and kept in the device's memory, the
    outputs stay there. ``full_batches``: every batch full, as ``refine --compile`` pads them."""
    with rasterio.open(info.path) as ds:
        pixels, _ = read_region(ds, bands, (0, TILE), (0, TILE * batch_size))
    x = torch.from_numpy(np.stack(np.split(pixels.astype(np.float32), batch_size, axis=-1))).to(
        device
    )  # (batch, C, 512, 512): the scene's first row of windows
    sizes = [min(batch_size, windows - s) for s in range(0, windows, batch_size)]
    if full_batches:
        sizes = [batch_size] * len(sizes)
    predict(x[: sizes[-1]], to_host=False)
    synchronize(device)
    started = time.perf_counter()
    for size in sizes:
        predict(x[:size], to_host=False)
    synchronize(device)
    return time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU (timings end when the work has)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_tile(dst: rasterio.io.DatasetWriter, probs: np.ndarray, row: int, col: int) -> None:
    """Write a (512, 512) prediction whose top-left is scene pixel (row, col), clipped."""
    y0, x0 = max(row, 0), max(col, 0)
    y1, x1 = min(row + TILE, dst.height), min(col + TILE, dst.width)
    if y1 > y0 and x1 > x0:
        dst.write(
            probs[y0 - row : y1 - row, x0 - col : x1 - col],
            1,
            window=Window(x0, y0, x1 - x0, y1 - y0),
        )


def probability_profile(info: SceneInfo) -> dict:
    """A tiled float32 GeoTIFF on the scene's grid, what a user's loop writes."""
    return {
        "driver": "GTiff",
        "width": info.width,
        "height": info.height,
        "count": 1,
        "dtype": "float32",
        "crs": info.crs,
        "transform": info.transform,
        "tiled": True,
        "blockxsize": TILE,
        "blockysize": TILE,
        "compress": "deflate",
    }


def run_naive(info: SceneInfo, bands: list[int], predict: Predict, out: Path) -> tuple[float, int]:
    """(c): rasterio windows one by one, no overlap, batch 1 (edge windows zero-filled), after
    one warm-up window (which compiles the models of ``--compile``)."""
    predict(torch.zeros((1, len(bands), TILE, TILE)))
    started = time.perf_counter()
    count = 0
    with (
        rasterio.open(info.path) as src,
        rasterio.open(out, "w", **probability_profile(info)) as dst,
    ):
        for row in range(0, info.height, TILE):
            for col in range(0, info.width, TILE):
                window = Window(col, row, TILE, TILE)
                pixels = src.read(bands, window=window, boundless=True, fill_value=0)
                probs = predict(torch.from_numpy(pixels[None].astype(np.float32)))
                write_tile(dst, probs[0].numpy(), row, col)
                count += 1
    return time.perf_counter() - started, count


def run_torchgeo(
    info: SceneInfo, bands: list[int], predict: Predict, out: Path, batch_size: int, workers: int
) -> tuple[float, int]:
    """(d): TorchGeo GridGeoSampler (512 px, stride 512) + DataLoader, the GeoTIFF written
    from each sample's bounds. Raises ImportError without torchgeo."""
    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import GridGeoSampler

    class Scene(RasterDataset):
        filename_glob = Path(info.path).name

    started = time.perf_counter()
    dataset = Scene(paths=[info.path])
    sampler = GridGeoSampler(dataset, size=TILE, stride=TILE)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=stack_samples,
        num_workers=workers,
    )
    count = 0
    with rasterio.open(out, "w", **probability_profile(info)) as dst:
        for batch in loader:
            probs = predict(batch["image"][:, [b - 1 for b in bands]]).numpy()
            for (xs, ys, _), p in zip(batch["bounds"], probs, strict=True):
                window = from_bounds(xs.start, ys.start, xs.stop, ys.stop, info.transform)
                write_tile(dst, p, round(window.row_off), round(window.col_off))
            count += len(probs)
    return time.perf_counter() - started, count


def recompute_factors(
    height: int, width: int, tile: int, overlap: int, block_size: int, stages: int
) -> list[float]:
    """Per stage, the windows ``refine`` runs over those covering the scene once, its blocks
    run one after another on the local scheduler with its cache of shared windows."""
    origins = (window_origins(height, tile, overlap), window_origins(width, tile, overlap))
    blocks = serpentine(block_grid(height, width, block_size))  # the local scheduler's order
    runs = windows_run(origins, blocks, tile, stages, window_cache_bytes())
    return [run / (len(origins[0]) * len(origins[1])) for run in runs]


TILE_KM2_AT_HALF_METRE = TILE**2 * 0.5**2 / 1e6
"""A 512² tile at 0.5 m/px, the resolution of the issue's GPU target, in km²."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scene", nargs="?", help="GeoTIFF (default: a mosaic of test tiles)")
    parser.add_argument("--tiles", type=int, default=1, help="tiles per side of that mosaic")
    parser.add_argument("--no-prn", action="store_true", help="base model only")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="refine's")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, help="refine's (default: refine's default)")
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--threads", type=int, help="refine's blocks in flight")
    parser.add_argument(
        "--compile", action="store_true", help="refine --compile, and (a) and (e) compiled too"
    )
    parser.add_argument("--workers", type=int, default=0, help="TorchGeo DataLoader workers")
    parser.add_argument("--skip", default="", help="runs to leave out, e.g. c,d")
    parser.add_argument("--workdir", default="/tmp/geoprn-bench")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of (a) and (b), in turn; medians printed"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore", NotGeoreferencedWarning)  # (c)'s boundless reads warn

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mosaic = workdir / f"mosaic_{args.tiles}x{args.tiles}.tif"
    scene = Path(args.scene) if args.scene else build_mosaic(mosaic, args.tiles)
    info = open_scene(scene)
    device = resolve_device(args.device)
    prn = None if args.no_prn else DEFAULT_PRN
    bands = read_header(DEFAULT_BASE, "base")["bands"]
    stages = 1 if prn is None else 2
    predict = load_predict(DEFAULT_BASE, prn, device, args.precision, args.compile)
    user_predict = load_predict(DEFAULT_BASE, prn, device, None, False)

    grid = len(window_origins(info.height, TILE, args.overlap)) * len(
        window_origins(info.width, TILE, args.overlap)
    )
    scene_tiles = info.height * info.width / TILE**2
    km2 = info.height * info.width * (info.gsd or math.nan) ** 2 / 1e6
    runs: dict[str, tuple[float, int]] = {}
    limits, refines = [], []
    for _ in range(args.repeats):  # (a) and (b) in turn, so drift in the machine hits both
        limits.append(run_limit(info, bands, predict, grid, args.batch_size, device, args.compile))
        shutil.rmtree(workdir / "refine", ignore_errors=True)  # a new folder, as users run it
        started = time.perf_counter()
        record = refine(
            scene,
            workdir / "refine",
            use_prn=prn is not None,
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
            overlap=args.overlap,
            threads=args.threads,
            compile=args.compile,
            resample="off",  # every run sees the scene's own pixels
            **({"block_size": args.block_size} if args.block_size else {}),
        )
        refines.append(time.perf_counter() - started)
    runs["(a) limit: forward passes"] = (statistics.median(limits), grid * stages)
    runs["(b) geoprn.refine"] = (statistics.median(refines), record.windows)
    block_size = record.inputs["block_size"]
    if "c" not in args.skip:
        seconds, count = run_naive(info, bands, user_predict, workdir / "naive.tif")
        runs["(c) rasterio loop, batch 1"] = (seconds, count * stages)
    skipped = None
    if "d" not in args.skip:
        try:
            seconds, count = run_torchgeo(
                info, bands, user_predict, workdir / "torchgeo.tif", args.batch_size, args.workers
            )
            runs["(d) TorchGeo GridGeoSampler"] = (seconds, count * stages)
        except ImportError as exc:
            skipped = f"(d) skipped: torchgeo is not importable ({exc})"
    if "e" not in args.skip:
        seconds, count = run_naive(info, bands, predict, workdir / "naive.tif")
        runs["(e) loop of (c), refine's model settings"] = (seconds, count * stages)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"scene {scene.name} {info.width}x{info.height} px at {info.gsd:.2f} m ({km2:.2f} km², "
        f"{scene_tiles:.1f} tiles of 512²); {'base + PRN' if prn else 'base only'}; device "
        f"{name}, {torch.get_num_threads()} torch threads; precision {args.precision} "
        f"({autocast_dtype(device, args.precision) or 'fp32'}); batch {args.batch_size}; overlap "
        f"{args.overlap}; block size {block_size}{'; torch.compile' if args.compile else ''}"
    )
    print(
        "\n| run | windows | seconds | scene tiles/s | km²/h | km²/h at 0.5 m/px | (a)/(run) |\n"
        "|---|---|---|---|---|---|---|"
    )
    limit = runs["(a) limit: forward passes"][0]
    for label, (seconds, windows) in runs.items():
        at_half_metre = scene_tiles / seconds * TILE_KM2_AT_HALF_METRE * 3600
        print(
            f"| {label} | {windows} | {seconds:.1f} | {scene_tiles / seconds:.3f} | "
            f"{km2 / seconds * 3600:,.1f} | {at_half_metre:,.0f} | {limit / seconds:.3f} |"
        )
    refine_seconds = runs["(b) geoprn.refine"][0]
    print(
        f"\n(a) runs {', '.join(f'{t:.1f}' for t in limits)} s; "
        f"(b) runs {', '.join(f'{t:.1f}' for t in refines)} s (medians above)"
    )
    for label, (seconds, _) in runs.items():
        if not label.startswith("(b)"):
            print(f"{label[:3]}/(b) = {seconds / refine_seconds:.3f}")
    if skipped:
        print(skipped)
    print(
        f"refine: blocks {record.seconds['blocks']:.1f} s, COG mask + quicklook "
        f"{record.seconds['total'] - record.seconds['blocks']:.1f} s"
    )
    names = ["base", "PRN"][:stages]

    def factors(height: int, width: int) -> str:
        values = recompute_factors(height, width, TILE, args.overlap, block_size, stages)
        return ", ".join(f"{n} {v:.3f}" for n, v in zip(names, values, strict=True))

    measured = record.windows / (grid * stages)
    print(
        f"recompute factor (windows run / windows covering the scene once) at overlap "
        f"{args.overlap}, block size {block_size}: this scene {factors(info.height, info.width)} "
        f"(all stages {measured:.3f} as run); square scenes of 20000² {factors(20_000, 20_000)}; "
        f"100000² {factors(100_000, 100_000)}"
    )
    print(
        f"overlap factor (windows covering the scene once / 512² tiles without overlap): "
        f"{grid / (math.ceil(info.height / TILE) * math.ceil(info.width / TILE)):.3f}"
    )
    shutil.rmtree(workdir / "refine", ignore_errors=True)


if __name__ == "__main__":
    run_script(main)

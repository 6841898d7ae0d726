"""The block task and its scheduling: each task reads its pixels plus the halo its windows
need, runs the stages (base model, then the refiner) window batch by window batch, blends
overlapping windows with fixed weights, crops to its own pixels and writes them into the
Zarr store, and its pieces of the mask and the quicklook beside it. Blocks run on the local
threaded scheduler or on a ``distributed`` cluster."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import dask
import numpy as np
import rasterio
import torch
from dask.callbacks import Callback

from geoprn import store
from geoprn.errors import GeoprnWarning, InputError
from geoprn.inference import (
    SharedWindows,
    WindowCache,
    auto_batch_size,
    device_turn,
    predict_region,
    resolve_device,
    to_device,
    warm_up,
    windows_run,
)
from geoprn.models.bpr import BoundaryRefiner
from geoprn.models.checkpoint import load_cached
from geoprn.models.header import reads_image
from geoprn.models.predictor import averaged_over
from geoprn.quicklook import sample_block, sampling_step, save_piece, shown_bands
from geoprn.raster import (
    open_raster,
    read_region,
    write_mask_piece,
)
from geoprn.tiling import (
    Block,
    Range,
    block_grid,
    lanes,
    serpentine,
    stage_regions,
    window_origins,
)

if TYPE_CHECKING:
    from distributed import Client
from geoprn.job import ModelRef, RefineJob

log = logging.getLogger(__name__)


@dataclass
class BlockResult:
    """What one block task did."""

    key: str
    status: str  # computed | skipped
    windows: int = 0
    seconds: float = 0.0
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


def _read_probabilities(ds: rasterio.DatasetReader, rows: Range, cols: Range) -> np.ndarray:
    """A probability raster over a region as (1, H, W) float32 in [0, 1]; nodata becomes 0.

    Raises:
        InputError: a valid pixel lies outside [0, 1] (uint8 rasters: 0-255, scaled).
    """
    data, valid = read_region(ds, [1], rows, cols)
    scale = 255.0 if ds.dtypes[0] == "uint8" else 1.0
    values = data.astype(np.float32) / scale
    values[:, ~valid] = 0.0
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
        raise InputError(
            f"{ds.name} holds values from {low * scale:g} to {high * scale:g} near rows "
            f"{rows[0]}-{rows[1]}, columns {cols[0]}-{cols[1]}: probabilities lie in [0, 1] "
            "(or 0-255 as uint8)"
        )
    return np.nan_to_num(values, nan=0.0)


@dataclass
class Prediction:
    """What :func:`predict_stages` gives for a region."""

    probabilities: dict[str, np.ndarray]
    """Variable name -> (H, W) float32 probabilities, 0 at nodata."""
    windows: int
    """Windows run, all stages."""
    image: np.ndarray | None
    """The image bands read for the models, (C, H, W) (a view of the halo read), or None when
    none were read (``--probs`` without BPR)."""
    valid: np.ndarray
    """(H, W) bool, False at nodata."""


def predict_stages(
    job: RefineJob, rows: Range, cols: Range, on_windows: Callable[[int], None] | None = None
) -> Prediction:
    """Every stage's probabilities over work-grid pixels ``rows`` x ``cols``; ``on_windows``
    is called with the windows of each forward pass as it runs.

    Each stage runs the windows touching the region the next stage needs (its halo), so the
    region's values are those of the scene-wide blend, whatever the region. A region without
    a valid pixel runs no model (its probabilities are 0).
    """
    grid = job.grid
    origins = (
        window_origins(grid.height, job.tile, job.overlap),
        window_origins(grid.width, job.tile, job.overlap),
    )
    regions = stage_regions(origins, rows, cols, job.tile, len(job.stages))
    with grid.open(job.scene.path) as ds:
        image_bands = job.bands if job.probs is None or job.reads_image else None
        image, valid = read_region(ds, image_bands, *regions[0])
        source = image
        if job.probs is not None:
            with grid.open(job.probs) as probs:
                source = _read_probabilities(probs, *regions[0])

    (ry0, _), (rx0, _) = regions[0]
    (y0, y1), (x0, x1) = rows, cols
    own = np.s_[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]  # the region in the halo read
    own_image = None if image is None else image[(slice(None), *own)]
    if not valid[own].any():
        zeros = {name: np.zeros((y1 - y0, x1 - x0), np.float32) for name in job.variables}
        return Prediction(zeros, 0, own_image, valid[own])
    device = resolve_device(job.device)
    batch_size = job.batch_size or auto_batch_size(device, blocks_in_flight(job.threads))
    models = []
    for name, refs in job.stages:
        passes = job.symmetries if name == "base" else 1
        models.append(stage_model(refs, str(device), job.compile, passes, job.bpr_cut_off))
    if job.compile:  # before this thread does any other torch work
        for (name, _), model in zip(job.stages, models, strict=True):
            if not isinstance(model, BoundaryRefiner):
                channels = len(job.bands) if name == "base" else 1
                channels += len(job.bands) * (name != "base" and takes_image(model))
                shape = (batch_size, channels, job.tile, job.tile)
                warm_up(model, shape, device, job.precision)
    shared = shared_windows(job, origins)
    # each output: (probabilities on the device, top-left work-grid coordinate of the array);
    # they stay on the device from stage to stage, only the block's own pixels come back
    outputs: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}
    source = to_device(source, device)
    if job.probs is not None:
        outputs["base"] = source[0], (ry0, rx0)
    invalid = to_device(~valid, device)
    windows = 0
    with device_turn(device):  # queued without a wait until the copies back
        for (name, _), model, src_region, out_region, stage_shared in zip(
            job.stages, models, regions[:-1], regions[1:], shared, strict=True
        ):
            (sy0, sy1), (sx0, sx1) = src_region
            inside = np.s_[sy0 - ry0 : sy1 - ry0, sx0 - rx0 : sx1 - rx0]
            if name != "base" and takes_image(model):  # the image beside the probabilities
                crop = to_device(image[(slice(None), *inside)], device).float()
                source = torch.cat([source.float(), crop])
            probs, count = predict_region(
                model,
                source,
                src_region,
                out_region,
                origins,
                job.tile,
                job.overlap,
                batch_size,
                job.precision,
                valid[inside],
                stage_shared,
                full_batches=job.compile,
                on_batch=on_windows,
            )
            windows += count
            (oy0, oy1), (ox0, ox1) = out_region
            probs.masked_fill_(invalid[oy0 - ry0 : oy1 - ry0, ox0 - rx0 : ox1 - rx0], 0.0)
            outputs[name] = probs, (oy0, ox0)
            source = probs[None]
        cropped = {
            name: probs[y0 - oy : y1 - oy, x0 - ox : x1 - ox].cpu().numpy()
            for name, (probs, (oy, ox)) in outputs.items()
        }
    return Prediction(cropped, windows, own_image, valid[own])


def window_cache_bytes() -> int:
    """``GEOPRN_WINDOW_CACHE_MB`` in bytes, 1 GiB when unset.

    Raises:
        InputError: the value is not a whole number of MiB.
    """
    text = os.environ.get("GEOPRN_WINDOW_CACHE_MB", "1024")
    try:
        return max(int(text), 0) << 20
    except ValueError:
        raise InputError(
            f"GEOPRN_WINDOW_CACHE_MB={text!r} is not a whole number of MiB (unset: 1024)"
        ) from None


SHARED_WINDOWS = WindowCache()
"""The windows this process has run that blocks still to come need (one per Dask worker),
sized by ``GEOPRN_WINDOW_CACHE_MB`` as each block starts. 1 GiB holds every shared window of a
40,000 px square scene run at the default block size, so each window is computed once; larger
scenes recompute some of the windows shared between rows of blocks
(``benchmarks/throughput.py`` prints how many)."""


def shared_windows(job: RefineJob, origins: tuple[np.ndarray, np.ndarray]) -> list[SharedWindows]:
    """Per stage, which of its windows neighbouring blocks share, keyed by the job and its input
    files' sizes and times: each is computed once when blocks run one after another in a
    process."""
    blocks = block_grid(job.scene.height, job.scene.width, job.block_size)
    spans = (sorted({b.rows for b in blocks}), sorted({b.cols for b in blocks}))
    if job.grid.resampled:  # the blocks' regions on the work grid, as process_block asks them
        spans = tuple([job.grid.support(span) for span in axis] for axis in spans)
    SHARED_WINDOWS.max_bytes = window_cache_bytes()  # this process's setting
    probs = os.stat(job.probs) if job.probs else None  # (the scene's version is in the job)
    key = (repr(job), probs and (probs.st_size, probs.st_mtime_ns))
    return SharedWindows.chain(SHARED_WINDOWS, key, origins, spans, job.tile, len(job.stages))


def takes_image(model: torch.nn.Module) -> bool:
    """Whether a refiner stage reads the image beside the probabilities: BPR, or a PRN whose
    checkpoint says so (:func:`geoprn.models.header.reads_image`)."""
    return isinstance(model, BoundaryRefiner) or reads_image(model.geoprn_meta)


def stage_model(
    refs: list[ModelRef],
    device: str,
    compiled: bool = False,
    symmetries: int = 1,
    bpr_cut_off: float = 0.5,
) -> torch.nn.Module:
    """The model of one stage, loaded once per worker: a base model (its probabilities
    averaged over ``symmetries`` of each window), a PRN, or BPR run on each window (after
    PRN when both are given; alone, on the map recentred at ``bpr_cut_off``). ``compiled``:
    base model and PRN through ``torch.compile`` (BPR, whose boxes vary in number, runs as
    it is)."""
    models = [load_cached(ref.path, ref.sha256, device) for ref in refs]
    meta = models[-1].geoprn_meta
    if meta["kind"] != "bpr":
        model = load_cached(refs[0].path, refs[0].sha256, device, True) if compiled else models[0]
        return averaged_over(model, symmetries)
    before = models[0] if len(models) == 2 else None
    box, size, nms = meta["box"], meta["input_size"], meta["nms_iou"]
    return BoundaryRefiner(models[-1], before, box, size, nms, cut_off=bpr_cut_off)


def process_block(
    job: RefineJob, block: Block, on_windows: Callable[[int], None] | None = None
) -> BlockResult:
    """Compute one block, write it to the store and its pieces of the mask and the quicklook
    (runs on a Dask worker); ``on_windows`` as for :func:`predict_stages`."""
    started = time.perf_counter()
    grid = job.grid
    if grid.resampled:  # the models see the work grid; nodata is the scene's own pixels'
        with open_raster(job.scene.path) as ds:
            _, valid = read_region(ds, None, block.rows, block.cols)
        if not valid.any():
            return _finished(job, block, BlockResult(block.key, "skipped"))
        support = grid.support(block.rows), grid.support(block.cols)
        work = predict_stages(job, *support, on_windows)
        probs = {n: grid.to_scene(v, block.rows, block.cols) for n, v in work.probabilities.items()}
        windows, image = work.windows, None
    else:  # validity comes with the models' read
        prediction = predict_stages(job, block.rows, block.cols, on_windows)
        valid = prediction.valid
        if not valid.any():
            return _finished(job, block, BlockResult(block.key, "skipped"))
        probs, windows, image = prediction.probabilities, prediction.windows, prediction.image
    for values in probs.values():
        values[~valid] = np.nan
    _write_pieces(job, block, probs, valid, image)  # before the block's done marker
    store.write_block(job.paths, block, probs)
    seconds = time.perf_counter() - started
    return _finished(job, block, BlockResult(block.key, "computed", windows, seconds))


def _write_pieces(
    job: RefineJob,
    block: Block,
    probs: dict[str, np.ndarray],
    valid: np.ndarray,
    image: np.ndarray | None = None,
) -> None:
    """Write a block's pieces of the quicklook and the mask from its probabilities (NaN at
    nodata) and the image bands read for the models (read here when None)."""
    bands = shown_bands(job.bands, job.scene.count)  # the models' first three when they read any
    if image is None:
        with open_raster(job.scene.path) as ds:
            image = ds.read(bands, window=(block.rows, block.cols))
    step = sampling_step(job.scene.height, job.scene.width)
    piece = sample_block(image[: len(bands)], block.rows, block.cols, valid, probs, step)
    save_piece(job.paths.quicklook_piece(block), piece)
    write_mask_piece(job.paths.mask_piece(block), probs[job.variables[-1]], job.threshold)


def _finished(job: RefineJob, block: Block, result: BlockResult) -> BlockResult:
    """Mark ``block`` done in the store, recording ``result``."""
    store.mark_done(job.paths, block, asdict(result), job.variables)
    return result


class _BlockProgress(Callback):
    """Reports each finished block task of the local scheduler."""

    def __init__(self, report: Callable[[BlockResult], None]):
        super().__init__()
        self.report = report

    def _posttask(self, key, result, dsk, state, worker_id):
        if isinstance(result, BlockResult):
            self.report(result)


def blocks_in_flight(local: int) -> int:
    """Block tasks this process runs at once: its ``distributed`` worker's threads, or ``local``
    (the local scheduler's) outside a worker."""
    from distributed import get_worker

    try:
        return get_worker().state.nthreads
    except ValueError:  # not in a worker
        return local


def local_threads(device: str) -> int:
    """Blocks in flight on the local scheduler: one on the CPU, where the model already uses
    every core; three on a GPU, so one block's reading, blending and writing overlap with
    another's forward passes (each thread holds one block, so memory stays bounded)."""
    return 3 if resolve_device(device).type == "cuda" else 1


LANES_PER_THREAD = 1
"""On a cluster, the blocks are cut into this many runs of neighbours per worker thread; each
run goes to one process in order, so its blocks share that process's window cache (a cluster
otherwise places neighbours in different processes, which compute their shared windows
twice). One run per thread ran the fewest windows and was the fastest of 1, 2 and 4, also on
a scene whose runs are uneven for nodata (``benchmarks/cluster.py --lanes``)."""


def _after(previous: BlockResult | None, job: RefineJob, block: Block) -> BlockResult:
    """:func:`process_block`, run once ``previous`` (the block before it in its run) is done:
    the scheduler places it where ``previous`` ran.

    A block already done returns what it recorded: when a worker dies, the scheduler
    recomputes the results it held, back along the run, and those blocks are in the store.
    With outputs on a bucket (``job.bucket``), the task writes into this worker's own
    working copy and uploads the block itself (:meth:`geoprn.bucket.BucketOutputs.push_block`);
    such a block is computed again (the same bits).
    """
    if job.bucket is not None:
        from geoprn.bucket import BucketOutputs

        outputs = BucketOutputs(job.bucket, job.paths.stem)
        outputs.block_copy(job.variables)
        result = process_block(replace(job, paths=outputs.paths), block)
        outputs.push_block(block.key, drop=True)
        return result
    recorded = store.done_result(job.paths, block)
    return BlockResult(**recorded) if recorded else process_block(job, block)


def run_blocks(
    job: RefineJob,
    blocks: list[Block],
    client: Client | None,
    report: Callable[[BlockResult], None],
    threads: int = 1,
    on_windows: Callable[[int], None] | None = None,
) -> list[BlockResult]:
    """Run the block tasks on the local threaded scheduler or on a ``distributed`` cluster.

    ``on_windows`` is called with the windows run: after each forward pass on the local
    scheduler, after each block on a cluster (whose workers cannot call back)."""
    run = uuid.uuid4().hex[:12]  # this run's task keys: a shared cluster may run others at once
    if client is None:
        ordered = serpentine(blocks)  # neighbours in a row, so shared windows are reused soonest
        tasks = [  # the local scheduler runs independent tasks in descending key order
            dask.delayed(process_block, pure=False)(
                job, block, on_windows, dask_key_name=f"block-{run}-{len(ordered) - i:07d}"
            )
            for i, block in enumerate(ordered)
        ]
        with _BlockProgress(report):
            return list(dask.compute(*tasks, scheduler="threads", num_workers=threads))

    from distributed import as_completed

    cluster_threads = sum(client.nthreads().values()) or len(blocks)  # none yet: adaptive
    tasks = []
    for lane in lanes(blocks, LANES_PER_THREAD * cluster_threads):
        previous = None
        for block in lane:
            previous = dask.delayed(_after, pure=False)(
                previous, job, block, dask_key_name=f"block-{run}-{block.key}"
            )
            tasks.append(previous)
    results = []
    for future in as_completed(client.compute(tasks), loop=client.loop):
        results.append(future.result())
        if on_windows is not None and results[-1].status == "computed":
            on_windows(results[-1].windows)
        report(results[-1])
    return results


def planned_windows(job: RefineJob, blocks: list[Block]) -> int:
    """Windows ``blocks`` run, all stages, when run in order in one process with this
    process's window cache; fewer where windows hold no valid pixel."""
    grid = job.grid
    origins = (
        window_origins(grid.height, job.tile, job.overlap),
        window_origins(grid.width, job.tile, job.overlap),
    )
    if grid.resampled:  # the blocks' regions on the work grid, as process_block asks them
        blocks = [replace(b, rows=grid.support(b.rows), cols=grid.support(b.cols)) for b in blocks]
    stages = len(job.stages)
    return sum(windows_run(origins, serpentine(blocks), job.tile, stages, window_cache_bytes()))


def repair_blocks(job: RefineJob, blocks: list[Block]) -> int:
    """Forget the finished blocks whose chunks in the store are no longer what they wrote
    (:func:`geoprn.store.damaged_blocks`), so that they are computed again; return how many."""
    finished = store.finished_blocks(job.paths)
    damaged = store.damaged_blocks(job.paths, [b for b in blocks if b.key in finished])
    for block in damaged:
        store.forget(job.paths, block, job.variables)
    if damaged:
        warnings.warn(
            f"{len(damaged)} finished block(s) no longer match what they wrote to "
            f"{job.paths.zarr} (a chunk deleted or changed since): computing them again",
            GeoprnWarning,
            stacklevel=3,
        )
    return len(damaged)


def mask_pieces(job: RefineJob, blocks: list[Block]) -> list[tuple[Path, Range, Range]]:
    """The pieces of the mask of every computed block, each with the rows and columns it
    covers. A computed block without its pieces of the mask and the quicklook (a run of an
    earlier version being resumed) gets both from the store first."""
    pieces = []
    for block in blocks:
        mask, quicklook = job.paths.mask_piece(block), job.paths.quicklook_piece(block)
        if not (mask.is_file() and quicklook.is_file()):
            if (store.done_result(job.paths, block) or {}).get("status") != "computed":
                continue  # no valid pixel: the mask's nodata
            region = slice(*block.rows), slice(*block.cols)
            probs = {v: store.open_variable(job.paths, v)[region] for v in job.variables}
            _write_pieces(job, block, probs, ~np.isnan(probs[job.variables[-1]]))
        pieces.append((mask, block.rows, block.cols))
    return pieces

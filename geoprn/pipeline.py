"""``refine``: scene → base model → PRN → Zarr + COG, one Dask task per block.

Each block task reads its pixels plus the halo its windows need, runs the stages (base model,
then the refiner) window batch by window batch, blends overlapping windows with fixed weights,
crops to its own pixels and writes them into the Zarr store, and its pieces of the mask and
the quicklook beside it. Nothing holds the whole scene. When every block is done, the mask
COG and the quicklook are assembled from the pieces.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import numpy as np
import rasterio
import torch
from dask.callbacks import Callback

from geoprn import store
from geoprn.cluster import connect
from geoprn.errors import GeoprnWarning, InputError, WriteError
from geoprn.files import write_error, write_text
from geoprn.gain import qualifies
from geoprn.inference import (
    SharedWindows,
    WindowCache,
    auto_batch_size,
    autocast_dtype,
    device_turn,
    predict_region,
    resolve_device,
    to_device,
    warm_up,
    windows_run,
)
from geoprn.models.bpr import BoundaryRefiner
from geoprn.models.checkpoint import (
    DEFAULT_BASE,
    DEFAULT_BPR,
    DEFAULT_PRN,
    file_sha256,
    load_cached,
    read_header,
)
from geoprn.quicklook import sample_block, sampling_step, save_piece, shown_bands, write_quicklook
from geoprn.raster import (
    SceneInfo,
    WorkGrid,
    check_threshold,
    open_raster,
    open_scene,
    read_region,
    write_mask_cog,
    write_mask_piece,
)
from geoprn.tiling import (
    DEFAULT_BLOCK_SIZE,
    Block,
    Range,
    block_grid,
    lanes,
    serpentine,
    stage_regions,
    window_origins,
)
from geoprn.vectorize import extract_roads, write_roads

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """A checkpoint as workers see it: a path on a shared file system and its hash."""

    path: str
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> ModelRef:
        return cls(str(Path(path).resolve()), file_sha256(path))


@dataclass(frozen=True)
class RefineJob:
    """Everything a block task needs; small and picklable, sent once per task."""

    scene: SceneInfo
    paths: store.OutputPaths
    bands: list[int]
    base: ModelRef | None
    prn: ModelRef | None
    probs: str | None
    tile: int
    overlap: int
    batch_size: int | None
    """Windows per forward pass; None: :func:`~geoprn.inference.auto_batch_size` on each worker."""
    device: str
    grid: WorkGrid
    bpr: ModelRef | None = None
    precision: str = "auto"
    block_size: int = DEFAULT_BLOCK_SIZE
    compile: bool = False
    threads: int = 1
    """Blocks in flight on the local scheduler (a ``distributed`` worker counts its own)."""
    threshold: float = 0.5
    """Probability above which a pixel is road in the mask."""

    @property
    def stages(self) -> list[tuple[str, list[ModelRef]]]:
        """The model stages in order, each with the Zarr variable it fills and its models: the
        base model, then the refiners (PRN and/or BPR, run window by window)."""
        refiners = [ref for ref in (self.prn, self.bpr) if ref is not None]
        named = [("base", [self.base] if self.base else []), ("refined", refiners)]
        return [(name, refs) for name, refs in named if refs]

    @property
    def variables(self) -> list[str]:
        return ["base", "refined"] if self.prn or self.bpr else ["base"]


@dataclass
class BlockResult:
    """What one block task did."""

    key: str
    status: str  # computed | skipped
    windows: int = 0
    seconds: float = 0.0
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


@dataclass
class RunRecord:
    """The content of ``<stem>_run.json``."""

    inputs: dict[str, Any]
    blocks: dict[str, int] = field(default_factory=dict)
    windows: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


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
        image_bands = job.bands if job.probs is None or job.bpr is not None else None
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
    models = [stage_model(refs, str(device), job.compile) for _, refs in job.stages]
    if job.compile:  # before this thread does any other torch work
        for (name, _), model in zip(job.stages, models, strict=True):
            if not isinstance(model, BoundaryRefiner):
                channels = len(job.bands) if name == "base" else 1
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
            if isinstance(model, BoundaryRefiner):  # BPR sees the image beside the probabilities
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
    inputs = [job.scene.path, job.probs] if job.probs else [job.scene.path]
    key = (repr(job), *((st.st_size, st.st_mtime_ns) for st in map(os.stat, inputs)))
    return SharedWindows.chain(SHARED_WINDOWS, key, origins, spans, job.tile, len(job.stages))


def stage_model(refs: list[ModelRef], device: str, compiled: bool = False) -> torch.nn.Module:
    """The model of one stage, loaded once per worker: a base model, a PRN, or BPR run on
    each window (after PRN when both are given). ``compiled``: base model and PRN through
    ``torch.compile`` (BPR, whose boxes vary in number, runs as it is)."""
    models = [load_cached(ref.path, ref.sha256, device) for ref in refs]
    meta = models[-1].geoprn_meta
    if meta["kind"] != "bpr":
        return load_cached(refs[0].path, refs[0].sha256, device, True) if compiled else models[0]
    before = models[0] if len(models) == 2 else None
    return BoundaryRefiner(models[-1], before, meta["box"], meta["input_size"], meta["nms_iou"])


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
    """
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


def refine(
    scene: str | Path,
    outdir: str | Path,
    base: str | Path | None = None,
    prn: str | Path | None = None,
    probs: str | Path | None = None,
    use_prn: bool | None = None,
    bpr: str | Path | None = None,
    use_bpr: bool | None = None,
    bands: list[int] | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    overlap: int = 64,
    compile: bool = False,
    scheduler: str | None = None,
    threads: int | None = None,
    threshold: float = 0.5,
    overwrite: bool = False,
    zarr_format: int = 2,
    resample: str = "auto",
    vectors: bool = False,
    simplify_m: float = 1.0,
    min_length_m: float = 10.0,
    progress: Callable[[int, int, BlockResult | None], None] | None = None,
    on_windows: Callable[[int, int], None] | None = None,
) -> RunRecord:
    """Segment roads over a whole scene and write Zarr probabilities and a COG mask.

    Args:
        scene: the GeoTIFF (any raster GDAL reads) to process.
        outdir: output folder; see :mod:`geoprn.store` for its layout.
        base: base checkpoint; the shipped default when None.
        prn: refiner checkpoint; the shipped default when None and one is shipped.
        probs: a probability raster on the scene's grid, refined instead of running ``base``.
        use_prn: run PRN at all; None (with ``use_bpr`` None): the default rule,
            :func:`default_refiners`.
        bpr: Boundary Patch Refinement checkpoint; the shipped default when None.
        use_bpr: run BPR on each window after PRN (or after the base model without PRN);
            None: the default rule.
        bands: 1-based scene bands to feed the base model (default: the checkpoint's).
        device: ``auto``, ``cpu`` or ``cuda[:N]``; resolved on each worker.
        precision: ``auto`` (bf16 where the device computes it natively), ``fp32`` or
            ``bf16``; see :func:`geoprn.inference.autocast_dtype`.
        batch_size: windows per forward pass, or ``auto``: 1 on a CPU (fastest there), up to 32
            on a GPU as its memory allows (:func:`geoprn.inference.auto_batch_size`).
        block_size: pixels per block side, a multiple of 512; does not change the result.
        overlap: pixels shared by neighbouring 512 windows, blended linearly.
        compile: run base model and PRN through ``torch.compile`` (each worker compiles once,
            about 20 s on an H100; ``benchmarks/RESULTS.md`` has the speed-up).
        scheduler: address of a ``distributed`` scheduler; the local one when None.
        threads: blocks in flight on the local scheduler (default: :func:`local_threads`).
        threshold: probability above which a pixel is road in the mask.
        overwrite: replace outputs of a different command instead of refusing.
        zarr_format: 2 (read by GDAL, with its CRS) or 3 (not by GDAL 3.10 or older).
        resample: ``auto`` runs the models on the scene resampled to their training GSD when
            the two differ by more than 1.5x (probabilities come back to the scene grid
            bilinearly); ``off`` runs them on the scene's own pixels.
        vectors: also write road centrelines of the mask (see :mod:`geoprn.vectorize`),
            simplified with ``simplify_m`` and without spurs shorter than ``min_length_m``.
        progress: called as ``progress(done, total, result)`` after each block, and once
            with ``(0, total, None)`` before the first.
        on_windows: called as ``on_windows(run, planned)`` with the windows each forward pass
            ran (each block on a cluster), and once with ``(0, planned)`` before the first:
            ``planned`` is :func:`planned_windows`, an upper bound where windows are nodata.

    Returns:
        The run record, also written to ``<stem>_run.json``.
    """
    started = time.perf_counter()
    window_cache_bytes()  # a bad setting is refused before any work
    info = open_scene(scene)
    job = _plan(
        info,
        Path(outdir),
        base,
        prn,
        probs,
        use_prn,
        bpr,
        use_bpr,
        bands,
        device,
        precision,
        batch_size,
        block_size,
        overlap,
        resample,
        compile,
        threshold,
    )
    if job.grid.resampled:
        log.info("models run at %.3g x the scene's pixel size", job.grid.factor)
    if zarr_format not in (2, 3):
        raise InputError("--zarr-format must be 2 or 3")
    if vectors and info.crs is None:
        raise InputError(f"{info.path} has no CRS; road vectors need one (drop --vectors)")
    signature = _signature(job, zarr_format)
    # the scheduler first (a dead address changes nothing), then the outputs, held to the end
    with connect(scheduler) as client, store.exclusive(job.paths), _resumable(job.paths):
        resumed = store.prepare(job.paths, signature, overwrite)
        if not resumed:
            store.create(job.paths, info, job.variables, signature, zarr_format)
        blocks = block_grid(info.height, info.width, block_size)
        repaired = _repair(job, blocks) if resumed else 0
        done_before = store.finished_blocks(job.paths)
        todo = [b for b in blocks if b.key not in done_before]
        planned = planned_windows(job, todo)
        log.info(
            "%d blocks of %d px: %d to compute (about %d windows of %d px), %d done before",
            len(blocks),
            block_size,
            len(todo),
            planned,
            job.tile,
            len(done_before),
        )
        tick = None
        if on_windows is not None:
            on_windows(0, planned)
            ticking = threading.Lock()  # block threads report at once

            def tick(count: int) -> None:
                with ticking:
                    on_windows(count, planned)

        finished = itertools.count(1)

        def report(result: BlockResult) -> None:
            if progress is not None:
                progress(next(finished), len(todo), result)

        if progress is not None:
            progress(0, len(todo), None)

        threads = threads or local_threads(device)
        job = replace(job, threads=threads)
        results = run_blocks(job, todo, client, report, threads, tick)
        computed = [r for r in results if r.status == "computed"]
        if not computed and not done_before and blocks:
            store.remove_outputs(job.paths)
            raise InputError(f"{info.path} has no valid pixels: every block is nodata")
        blocks_seconds = time.perf_counter() - started
        windows = sum(r.windows for r in computed)
        log.info(
            "blocks: %.1f s, %d computed, %d skipped (nodata); %d windows, %.2f a second",
            blocks_seconds,
            len(computed),
            len(results) - len(computed),
            windows,
            windows / max(blocks_seconds, 1e-9),
        )

        pieces = _mask_pieces(job, blocks)
        with ThreadPoolExecutor(2) as pool:  # side by side: both only assemble pieces
            written = [
                pool.submit(write_mask_cog, pieces, info, job.paths.mask),
                pool.submit(
                    write_quicklook,
                    info.height,
                    info.width,
                    job.paths.quicklook_pieces,
                    job.variables,
                    job.paths.quicklook,
                ),
            ]
            for future in written:
                future.result()
        log.info("mask COG and quicklook: %.1f s", time.perf_counter() - started - blocks_seconds)
        outputs = {"zarr": job.paths.zarr, "mask": job.paths.mask, "quicklook": job.paths.quicklook}
        if vectors:
            before = time.perf_counter()
            roads = extract_roads(
                job.paths.zarr, threshold, job.variables[-1], simplify_m, min_length_m, block_size
            )
            outputs["roads"] = write_roads(roads, job.paths.roads, overwrite=True)
            seconds = time.perf_counter() - before
            log.info("road vectors: %.1f s, %d lines", seconds, len(roads.lines))
        record = RunRecord(
            inputs={
                **signature,
                "device": job.device,
                "batch_size": batch_size,
                "scheduler": scheduler or f"local, {threads} thread(s)",
            },
            blocks={
                "total": len(blocks),
                "computed": len(computed),
                "skipped": sum(r.status == "skipped" for r in results),
                "resumed": len(done_before),
                "repaired": repaired,
            },
            windows=windows,
            seconds={
                "blocks": round(blocks_seconds, 3),
                "total": round(time.perf_counter() - started, 3),
            },
            outputs={name: str(path) for name, path in outputs.items()},
        )
        write_text(job.paths.run_json, json.dumps(asdict(record), indent=1))
    return record


@contextlib.contextmanager
def _resumable(paths: store.OutputPaths) -> Iterator[None]:
    """Say, when a write fails (disk full...), that the run resumes: what was written is
    whole, and the blocks done are marked so."""
    try:
        yield
    except WriteError as exc:
        raise WriteError(f"{exc}; run the same command again to resume") from None
    except OSError as exc:  # a write no writer of ours named
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO):
            raise
        error = write_error(Path(exc.filename or paths.outdir), exc)
        raise WriteError(f"{error}; run the same command again to resume") from None


def _repair(job: RefineJob, blocks: list[Block]) -> int:
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


def _mask_pieces(job: RefineJob, blocks: list[Block]) -> list[tuple[Path, Range, Range]]:
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


def _plan(
    info: SceneInfo,
    outdir: Path,
    base: str | Path | None,
    prn: str | Path | None,
    probs: str | Path | None,
    use_prn: bool | None,
    bpr: str | Path | None,
    use_bpr: bool | None,
    bands: list[int] | None,
    device: str,
    precision: str,
    batch_size: int | str,
    block_size: int,
    overlap: int,
    resample: str,
    compile: bool = False,
    threshold: float = 0.5,
) -> RefineJob:
    """Check the models, bands and options against the scene; build the job."""
    base_ref = None
    tile = 512
    gsd = None  # the ground sampling distance the models were trained at
    if probs is None:
        base = Path(base) if base is not None else DEFAULT_BASE
        header = read_header(base, "base")
        tile, gsd = header["tile_size"], header.get("gsd")
        bands = _model_bands(header, base, bands, info)
        base_ref = ModelRef.of(base)
    else:
        _check_probabilities(Path(probs), info)
    if use_prn is None or use_bpr is None:
        use_prn, use_bpr = default_refiners(prn, bpr, base_ref)
    bpr_ref = None
    if use_bpr:  # BPR reads the base model's bands (the image is read once)
        bpr = Path(bpr) if bpr is not None else DEFAULT_BPR
        header = read_header(bpr, "bpr")
        bands = _model_bands(header, bpr, bands, info)
        tile, gsd = header["tile_size"], gsd or header.get("gsd")
        bpr_ref = ModelRef.of(bpr)
    bands = bands or []
    prn_ref = None
    if use_prn:
        if prn is None and DEFAULT_PRN.is_file():
            prn = DEFAULT_PRN
        if prn is None:
            warnings.warn(
                "no PRN weights given or shipped: running the base model only",
                GeoprnWarning,
                stacklevel=2,
            )
        else:
            header = read_header(prn, "prn")
            tile, gsd = header["tile_size"], gsd or header.get("gsd")
            prn_ref = ModelRef.of(prn)
            _check_pair(header, prn_ref, base_ref)
    if not 0 <= overlap < tile // 2 or overlap % 2:
        raise InputError(f"--overlap must be even and below {tile // 2}")
    if batch_size != "auto" and (not str(batch_size).isdigit() or int(batch_size) < 1):
        raise InputError(f"--batch-size must be 'auto' or at least 1, not {batch_size!r}")
    check_threshold(threshold)
    if block_size <= 0 or block_size % store.CHUNK:
        raise InputError(f"--block-size must be a positive multiple of {store.CHUNK}")
    autocast_dtype(resolve_device(device), precision)  # fail early; workers resolve it again
    stem = Path(info.path).stem
    return RefineJob(
        info,
        store.OutputPaths(outdir, stem),
        bands,
        base_ref,
        prn_ref,
        str(Path(probs).resolve()) if probs else None,
        tile,
        overlap,
        None if batch_size == "auto" else int(batch_size),
        device,
        WorkGrid.choose(info, gsd, resample),
        bpr_ref,
        precision,
        block_size,
        compile,
        threshold=threshold,
    )


def default_refiners(
    prn: str | Path | None, bpr: str | Path | None, base: ModelRef | None
) -> tuple[bool, bool]:
    """Which refiners run when none is asked for by name (``--refiner auto``).

    A checkpoint given by path runs: that is asking for it. A shipped one runs only if it
    records a gain on held-out places above zero with its interval, measured after this very
    base model (and, for BPR, after the PRN that runs or right after the base model):
    :func:`geoprn.gain.qualifies`. When no refiner runs, says once where the mask comes from.
    """
    base_sha = base.sha256 if base is not None else None
    reasons = []

    def choose(given: str | Path | None, shipped: Path, kind: str, after: str | None) -> bool:
        if given is not None:
            return True
        if not shipped.is_file():
            reasons.append(f"no {kind.upper()} is shipped")
            return False
        header = read_header(shipped, kind)
        ok, why = qualifies(header, base_sha)
        if ok and (header["validated_gain"].get("prn_sha256") != after):
            ok, why = False, "its gain was measured after another refiner chain"
        if not ok:
            reasons.append(f"{shipped.name}: {why}")
        return ok

    use_prn = choose(prn, DEFAULT_PRN, "prn", None)
    prn_sha = ModelRef.of(prn or DEFAULT_PRN).sha256 if use_prn else None
    use_bpr = choose(bpr, DEFAULT_BPR, "bpr", prn_sha)
    if not use_prn and not use_bpr:
        source = "base model" if base is not None else "given probabilities"
        warnings.warn(
            f"the mask comes from the {source}, unrefined: no shipped refiner has a validated "
            f"gain for it ({'; '.join(reasons)}); --refiner prn runs PRN anyway",
            GeoprnWarning,
            stacklevel=3,
        )
    return use_prn, use_bpr


def _model_bands(header: dict, path: Path, bands: list[int] | None, info: SceneInfo) -> list[int]:
    """The scene bands a model reads (``bands`` if given, else its checkpoint's), checked."""
    bands = bands or header["bands"]
    if len(bands) != len(header["bands"]):
        raise InputError(
            f"{path} reads {len(header['bands'])} bands, {len(bands)} are given "
            "(by --bands or the base model)"
        )
    if max(bands) > info.count or min(bands) < 1:
        raise InputError(
            f"{info.path} has {info.count} band(s); the model reads band(s) "
            f"{','.join(map(str, bands))} (choose others with --bands)"
        )
    return bands


def _check_pair(prn_header: dict, prn: ModelRef, base: ModelRef | None) -> None:
    """Warn when a PRN refines a base model other than the one it was trained for."""
    trained_for = prn_header.get("base", {}).get("sha256")
    if base is not None and trained_for is not None and trained_for != base.sha256:
        warnings.warn(
            f"{Path(prn.path).name} was trained for another base model "
            f"({prn_header['base'].get('file', trained_for[:12])}), not {Path(base.path).name}: "
            "the refined map may be worse than the base one",
            GeoprnWarning,
            stacklevel=3,
        )


def _check_probabilities(path: Path, info: SceneInfo) -> None:
    """A probability raster must be one band on exactly the scene's grid."""
    other = open_scene(path)
    if other.shape != info.shape or other.transform != info.transform or other.crs != info.crs:
        raise InputError(
            f"{path} ({other.width}x{other.height}) is not on the grid of the scene "
            f"({info.width}x{info.height}, same CRS and transform needed)"
        )
    if other.count != 1:
        raise InputError(f"{path} has {other.count} bands; a probability raster has one")


def _signature(job: RefineJob, zarr_format: int) -> dict:
    """What makes two runs the same command: everything that changes the outputs."""
    scene = Path(job.scene.path)
    stat = scene.stat()
    return {
        "scene": str(scene),
        "scene_bytes": stat.st_size,
        "scene_mtime_ns": stat.st_mtime_ns,
        "base": job.base and asdict(job.base),
        "prn": job.prn and asdict(job.prn),
        "bpr": job.bpr and asdict(job.bpr),
        "probs": job.probs,
        "bands": job.bands,
        "tile": job.tile,
        "overlap": job.overlap,
        "block_size": job.block_size,
        "threshold": job.threshold,
        "zarr_format": zarr_format,
        "resample_factor": job.grid.factor,
        "precision": job.precision,
    }

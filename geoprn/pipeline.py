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
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoprn import store
from geoprn.blocks import (
    BlockResult,
    local_threads,
    mask_pieces,
    planned_windows,
    repair_blocks,
    run_blocks,
    window_cache_bytes,
)
from geoprn.bucket import is_bucket, refine_into_bucket
from geoprn.cluster import connect
from geoprn.errors import InputError, WriteError
from geoprn.files import write_error, write_text
from geoprn.job import RefineJob, open_inputs, run_signature, scene_stem
from geoprn.quicklook import write_quicklook
from geoprn.raster import write_mask_cog
from geoprn.tiling import DEFAULT_BLOCK_SIZE, Block, block_grid
from geoprn.vectorize import extract_roads, write_roads

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)


@dataclass
class RunRecord:
    """The content of ``<stem>_run.json``."""

    inputs: dict[str, Any]
    blocks: dict[str, int] = field(default_factory=dict)
    windows: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    area_km2: float | None = None
    """The scene's ground area, where its CRS says it."""


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
    threshold: float | str = "auto",
    symmetries: int | str = "auto",
    overwrite: bool = False,
    zarr_format: int = 2,
    resample: str = "auto",
    vectors: bool = False,
    simplify_m: float = 1.0,
    min_length_m: float = 10.0,
    progress: Callable[[int, int, BlockResult | None], None] | None = None,
    on_windows: Callable[[int, int], None] | None = None,
    name: str | None = None,
    client: Client | None = None,
    bucket: str | None = None,
) -> RunRecord:
    """Segment roads over a whole scene and write Zarr probabilities and a COG mask.

    The data flow of DESIGN.md in five steps: :func:`open_inputs` (check everything before
    writing), :func:`plan_blocks` (create or resume the outputs), :func:`compute_blocks` (the
    block tasks on the scheduler), :func:`assemble_outputs` (mask COG, quicklook, vectors) and
    :func:`record_run` (``<stem>_run.json``).

    Args:
        scene: the GeoTIFF (any raster GDAL reads) to process.
        outdir: output folder (see :mod:`geoprn.store` for its layout), or an ``s3://``
            prefix (:mod:`geoprn.bucket`).
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
        threshold: probability above which a pixel is road in the mask; ``"auto"``: the
            cut-off the last model's checkpoint records, else 0.5
            (:func:`geoprn.job.mask_threshold`).
        symmetries: 1, 4 or 8 symmetries of each window the base model's probabilities are
            averaged over (flips, then quarter turns; that many passes), or ``"auto"``: as
            its checkpoint records (:func:`geoprn.job.base_symmetries`).
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
        name: what the outputs are named after (default: the scene's file name).
        client: a connected ``distributed`` client to run the blocks on, instead of
            ``scheduler`` (:func:`geoprn.batch.refine_batch` shares one between scenes).
        bucket: set by :func:`geoprn.bucket.refine_into_bucket` on a cluster: the ``s3://``
            prefix the block tasks write their outputs to themselves.

    Returns:
        The run record, also written to ``<stem>_run.json``.
    """
    if is_bucket(outdir):  # the run in a working copy kept in step with the bucket
        options = {k: v for k, v in locals().items() if k not in ("scene", "outdir", "name")}
        name = name or scene_stem(str(scene))
        return refine_into_bucket(refine, str(scene), str(outdir), name, **options)
    started = time.perf_counter()
    window_cache_bytes()  # a bad setting is refused before any work
    job = open_inputs(
        scene, outdir, base, prn, probs, use_prn, bpr, use_bpr, bands, device, precision,
        batch_size, block_size, overlap, resample, compile, threshold, zarr_format, vectors,
        name, symmetries,
    )  # fmt: skip
    if job.grid.resampled:
        log.info("models run at %.3g x the scene's pixel size", job.grid.factor)
    signature = run_signature(job, zarr_format)
    # the scheduler first (a dead address changes nothing), then the outputs, held to the end
    connected = contextlib.nullcontext(client) if client is not None else connect(scheduler)
    with connected as client, store.exclusive(job.paths), _resumable(job.paths):
        plan = plan_blocks(job, signature, zarr_format, overwrite)
        job = replace(job, threads=threads or local_threads(device), bucket=bucket)
        results = compute_blocks(job, plan, client, progress, on_windows)
        blocks_seconds = time.perf_counter() - started
        outputs = assemble_outputs(job, plan, vectors, simplify_m, min_length_m)
        inputs = {
            **signature,
            "device": job.device,
            "batch_size": batch_size,
            "scheduler": scheduler or f"local, {job.threads} thread(s)",
        }
        seconds = {"blocks": blocks_seconds, "total": time.perf_counter() - started}
        return record_run(job, inputs, plan, results, outputs, seconds)


@dataclass
class BlockPlan:
    """The scene's blocks and where a run stands on them."""

    blocks: list[Block]
    todo: list[Block]
    """The blocks to compute: not done before (or done, but damaged since)."""
    done_before: set[str]
    repaired: int
    """Blocks recorded done whose chunks were damaged or missing, computed again."""
    planned: int
    """Windows the blocks to compute hold, at most (:func:`~geoprn.blocks.planned_windows`)."""


def plan_blocks(job: RefineJob, signature: dict, zarr_format: int, overwrite: bool) -> BlockPlan:
    """Step 2: create the outputs, or resume those of the same command (a rerun recomputes
    the blocks whose chunks are damaged or gone), and list the blocks still to compute."""
    resumed = store.prepare(job.paths, signature, overwrite)
    if not resumed:
        store.create(job.paths, job.scene, job.variables, signature, zarr_format)
    blocks = block_grid(job.scene.height, job.scene.width, job.block_size)
    repaired = repair_blocks(job, blocks) if resumed else 0
    done_before = store.finished_blocks(job.paths)
    todo = [b for b in blocks if b.key not in done_before]
    plan = BlockPlan(blocks, todo, done_before, repaired, planned_windows(job, todo))
    log.info(
        "%d blocks of %d px: %d to compute (about %d windows of %d px), %d done before",
        len(blocks), job.block_size, len(todo), plan.planned, job.tile, len(done_before),
    )  # fmt: skip
    return plan


def compute_blocks(
    job: RefineJob,
    plan: BlockPlan,
    client: Client | None,
    progress: Callable[[int, int, BlockResult | None], None] | None,
    on_windows: Callable[[int, int], None] | None,
) -> list[BlockResult]:
    """Step 3: run the block tasks still to do on the scheduler, reporting blocks and windows
    as they finish.

    Raises:
        InputError: the scene has no valid pixel (its outputs are removed).
    """
    started = time.perf_counter()
    tick = None
    if on_windows is not None:
        on_windows(0, plan.planned)
        ticking = threading.Lock()  # block threads report at once

        def tick(count: int) -> None:
            with ticking:
                on_windows(count, plan.planned)

    finished = itertools.count(1)

    def report(result: BlockResult) -> None:
        if progress is not None:
            progress(next(finished), len(plan.todo), result)

    if progress is not None:
        progress(0, len(plan.todo), None)
    results = run_blocks(job, plan.todo, client, report, job.threads, tick)
    computed = [r for r in results if r.status == "computed"]
    if not computed and not plan.done_before and plan.blocks:
        store.remove_outputs(job.paths)
        raise InputError(f"{job.scene.path} has no valid pixels: every block is nodata")
    seconds = time.perf_counter() - started
    windows = sum(r.windows for r in computed)
    log.info(
        "blocks: %.1f s, %d computed, %d skipped (nodata); %d windows, %.2f a second",
        seconds, len(computed), len(results) - len(computed), windows,
        windows / max(seconds, 1e-9),
    )  # fmt: skip
    return results


def assemble_outputs(
    job: RefineJob, plan: BlockPlan, vectors: bool, simplify_m: float, min_length_m: float
) -> dict[str, Path]:
    """Step 4: the mask COG and the quicklook from the blocks' pieces (side by side), and the
    road vectors of the mask when asked for."""
    started = time.perf_counter()
    pieces = mask_pieces(job, plan.blocks)
    info = job.scene
    with ThreadPoolExecutor(2) as pool:  # side by side: both only assemble pieces
        written = [
            pool.submit(write_mask_cog, pieces, info, job.paths.mask),
            pool.submit(
                write_quicklook, info.height, info.width, job.paths.quicklook_pieces,
                job.variables, job.paths.quicklook,
            ),
        ]  # fmt: skip
        for future in written:
            future.result()
    log.info("mask COG and quicklook: %.1f s", time.perf_counter() - started)
    outputs = {"zarr": job.paths.zarr, "mask": job.paths.mask, "quicklook": job.paths.quicklook}
    if vectors:
        before = time.perf_counter()
        roads = extract_roads(
            job.paths.zarr, job.threshold, job.variables[-1], simplify_m, min_length_m,
            job.block_size,
        )  # fmt: skip
        outputs["roads"] = write_roads(roads, job.paths.roads, overwrite=True)
        log.info("road vectors: %.1f s, %d lines", time.perf_counter() - before, len(roads.lines))
    return outputs


def record_run(
    job: RefineJob,
    inputs: dict[str, Any],
    plan: BlockPlan,
    results: list[BlockResult],
    outputs: dict[str, Path],
    seconds: dict[str, float],
) -> RunRecord:
    """Step 5: what the run did, written to ``<stem>_run.json`` (last: a run whose record is
    there finished)."""
    computed = [r for r in results if r.status == "computed"]
    record = RunRecord(
        inputs=inputs,
        blocks={
            "total": len(plan.blocks),
            "computed": len(computed),
            "skipped": sum(r.status == "skipped" for r in results),
            "resumed": len(plan.done_before),
            "repaired": plan.repaired,
        },
        windows=sum(r.windows for r in computed),
        seconds={name: round(value, 3) for name, value in seconds.items()},
        outputs={name: str(path) for name, path in outputs.items()},
        area_km2=job.scene.area_km2 and round(job.scene.area_km2, 6),
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

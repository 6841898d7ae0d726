"""The output folder: the georeferenced Zarr store, per-block done markers, and resume rules.

Layout of ``OUTDIR`` for a scene ``<stem>``::

    <stem>.zarr/         variables base, refined (float32, NaN at nodata, 512 chunks, Blosc LZ4)
    <stem>_mask.tif      COG mask, written when every block is done
    <stem>_quicklook.png the scene beside its base and refined probabilities
    <stem>_roads.gpkg    road centrelines (``refine --vectors``)
    <stem>_run.json      what ran, on what, how long
    .<stem>.geoprn/      run state: signature.json, done/<row>_<col> markers (each block
                         task's result and the store chunks it wrote with their SHA-256,
                         JSON) and the blocks' pieces of the mask and the quicklook,
                         mask/<row>_<col>.tif and quicklook/<row>_<col>.npz
    .<stem>.lock         exists, locked, while a run writes these outputs

A run writes its signature first, then the empty store, then ``done/``, which says the store
is complete; a block's marker is written only after its data and pieces are. So a run killed
at any point resumes by the same command: a store left incomplete is made again, and only the
blocks without a marker are computed, or whose chunks are no longer what their marker records
(deleted or changed since: :func:`damaged_blocks`). A different command on the same outputs
is refused unless the caller asks to overwrite, and so is any run while another one writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from numcodecs import Blosc
from rasterio.crs import CRS
from zarr.codecs import BloscCodec
from zarr.core.sync import sync as on_zarr_loop

from geoprn.errors import InputError, OutputError, WriteError
from geoprn.files import write_text, writing
from geoprn.raster import SceneInfo, check_threshold
from geoprn.tiling import Block

CHUNK = 512


def compressor(zarr_format: int) -> Blosc | BloscCodec:
    """The probability chunks' compressor: Blosc LZ4 with byte shuffle. On real probabilities
    its chunks are 5 % larger than with zarr's default Zstd, and written 2.1x and read 1.6x
    as fast (format 2, ``benchmarks/zarr_codecs.py``). GDAL reads it (in format 2)."""
    if zarr_format == 2:
        return Blosc("lz4", 5, Blosc.SHUFFLE)
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


@dataclass(frozen=True)
class OutputPaths:
    """Where one scene's outputs go."""

    outdir: Path
    stem: str

    @property
    def zarr(self) -> Path:
        return self.outdir / f"{self.stem}.zarr"

    @property
    def mask(self) -> Path:
        return self.outdir / f"{self.stem}_mask.tif"

    @property
    def quicklook(self) -> Path:
        return self.outdir / f"{self.stem}_quicklook.png"

    @property
    def roads(self) -> Path:
        return self.outdir / f"{self.stem}_roads.gpkg"

    @property
    def run_json(self) -> Path:
        return self.outdir / f"{self.stem}_run.json"

    @property
    def state(self) -> Path:
        return self.outdir / f".{self.stem}.geoprn"

    @property
    def done(self) -> Path:
        return self.state / "done"

    @property
    def quicklook_pieces(self) -> Path:
        """The blocks' pieces of the quicklook (see :mod:`geoprn.quicklook`)."""
        return self.state / "quicklook"

    def quicklook_piece(self, block: Block) -> Path:
        """A block's piece of the quicklook (see :func:`geoprn.quicklook.save_piece`)."""
        return self.quicklook_pieces / f"{block.key}.npz"

    def mask_piece(self, block: Block) -> Path:
        """A block's piece of the mask (see :func:`geoprn.raster.write_mask_piece`)."""
        return self.state / "mask" / f"{block.key}.tif"

    def outputs(self) -> list[Path]:
        """Every path this scene's run writes."""
        return [self.zarr, self.mask, self.quicklook, self.roads, self.run_json, self.state]


@contextlib.contextmanager
def exclusive(paths: OutputPaths) -> Iterator[None]:
    """Hold the scene's output lock (an advisory ``flock`` on ``.<stem>.lock``, removed at the
    end) while a run writes: a second run on the same outputs is refused at once instead of
    racing the first (or deleting its files with ``--overwrite``). The system releases the
    lock when the process ends, however it ends, so a killed run can be resumed.

    Raises:
        OutputError: another process holds the lock, or the folder cannot be created or
            written to.
    """
    try:
        paths.outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {paths.outdir}: {exc.strerror}") from None
    if not os.access(paths.outdir, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {paths.outdir} is not writable")
    path = paths.outdir / f".{paths.stem}.lock"
    while True:
        lock = open(path, "a")  # noqa: SIM115  (closed below, after the run)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise OutputError(
                f"another geoprn run is writing the outputs of '{paths.stem}' in "
                f"{paths.outdir}; wait for it to end"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.stat(path), os.fstat(lock.fileno())):
                break
        lock.close()  # a run that just ended removed the file we locked: lock the new one
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        lock.close()


def prepare(paths: OutputPaths, signature: dict[str, Any], overwrite: bool) -> bool:
    """Make the output folder (made and locked by :func:`exclusive`) ready for this run;
    return True when an unfinished run is being resumed.

    Raises:
        OutputError: it holds outputs of a different command (or outputs with no run state)
            and ``overwrite`` is false.
    """
    existing = [p for p in paths.outputs() if p.exists()]
    if overwrite or existing == [paths.state] and _nothing_recorded(paths):
        remove_outputs(paths)  # (or a run killed before it recorded its signature)
        return False
    if not existing:
        return False
    signature_file = paths.state / "signature.json"
    if signature_file.is_file():
        previous = _read_signature(signature_file)
        if previous == signature and paths.done.is_dir():
            return True
        if previous == signature:  # killed while creating the store: make it again
            remove_outputs(paths)
            return False
        changed = sorted(
            k for k in signature.keys() | previous.keys() if signature.get(k) != previous.get(k)
        )
        raise OutputError(
            f"{paths.outdir} holds outputs of '{paths.stem}' from a different command "
            f"(differs in: {', '.join(changed)}); use --overwrite to replace them"
        )
    names = ", ".join(p.name for p in existing)
    raise OutputError(f"{paths.outdir} already holds {names}; use --overwrite to replace them")


def _nothing_recorded(paths: OutputPaths) -> bool:
    """Whether the run state folder holds nothing but a signature being written: what a run
    killed before its signature was complete leaves."""
    return {p.name for p in paths.state.iterdir()} <= {"signature.json.tmp"}


def _read_signature(path: Path) -> dict[str, Any]:
    """The signature a run recorded (:func:`create`).

    Raises:
        OutputError: it is not a JSON object (a damaged or foreign file).
    """
    try:
        previous = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        previous = exc
    if not isinstance(previous, dict):
        raise OutputError(
            f"{path} is damaged (not the JSON object a run records), so these outputs cannot "
            "be resumed; use --overwrite to replace them"
        )
    return previous


def remove_outputs(paths: OutputPaths) -> None:
    """Delete this scene's outputs (and nothing else in the folder)."""
    for path in paths.outputs():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def gdal_crs(crs: CRS) -> dict[str, Any]:
    """The ``_CRS`` attribute GDAL's Zarr driver reads from an array (every GDAL with the
    driver, 3.4 on; CF ``grid_mapping`` only from 3.9): WKT2, PROJJSON and, for an EPSG CRS,
    its OGC URL, the keys GDAL itself writes."""
    value: dict[str, Any] = {
        "wkt": crs.to_wkt(version="WKT2_2019"),
        "projjson": crs.to_dict(projjson=True),
    }
    code = crs.to_epsg(confidence_threshold=100)
    if code is not None:
        value["url"] = f"http://www.opengis.net/def/crs/EPSG/0/{code}"
    return value


def _dataset(scene: SceneInfo, variables: list[str]) -> xr.Dataset:
    """The scene's empty probability variables, georeferenced as GIS clients read it.

    x/y hold pixel-centre coordinates with their CF ``units``, ``standard_name`` and ``axis``
    (rioxarray's ``write_coordinate_system``), ``spatial_ref`` the CF grid mapping and
    transform (read by rioxarray and GDAL 3.9 on), and each variable GDAL's ``_CRS``
    attribute (read by GDAL 3.4 on). A scene without a geotransform gets no coordinates and no
    transform, and one without a CRS no CRS: nothing is made up.
    """
    empty = da.full(scene.shape, np.nan, dtype="float32", chunks=CHUNK)
    ds = xr.Dataset({name: (("y", "x"), empty) for name in variables})
    if scene.has_transform:
        transform = scene.transform
        ds = ds.assign_coords(
            x=transform.c + transform.a * (np.arange(scene.width) + 0.5),
            y=transform.f + transform.e * (np.arange(scene.height) + 0.5),
        )
    if scene.crs is not None:
        ds = ds.rio.write_crs(scene.crs)
    if scene.has_transform:  # (without a CRS, the coordinates get their axis only)
        ds = ds.rio.write_transform(scene.transform).rio.write_coordinate_system()
    for name in variables:
        ds[name].encoding.pop("grid_mapping", None)
        ds[name].attrs["long_name"] = f"{name} road probability"
        if "spatial_ref" in ds.coords:
            ds[name].attrs["grid_mapping"] = "spatial_ref"
        if scene.crs is not None:
            ds[name].attrs["_CRS"] = gdal_crs(scene.crs)
    return ds


def create(
    paths: OutputPaths,
    scene: SceneInfo,
    variables: list[str],
    signature: dict[str, Any],
    zarr_format: int = 2,
) -> None:
    """Create the run state and the empty, georeferenced store (metadata and coordinates only).

    Data chunks are not written: unwritten chunks read as NaN. See :func:`_dataset` for the
    georeferencing. The signature is written first and ``done/`` last, so that a run killed
    in between is recognised and its store made again (:func:`prepare`).

    Raises:
        WriteError: the file system refused a write (disk full...).
    """
    paths.state.mkdir(parents=True, exist_ok=True)
    write_text(paths.state / "signature.json", json.dumps(signature, indent=1, sort_keys=True))
    ds = _dataset(scene, variables)
    encoding = {
        name: {
            "chunks": (CHUNK, CHUNK),
            "_FillValue": np.nan,
            "compressors": [compressor(zarr_format)],
        }
        for name in variables
    }
    with writing_zarr(paths.zarr):
        ds.to_zarr(paths.zarr, mode="w", compute=False, zarr_format=zarr_format, encoding=encoding)
    paths.done.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def writing_zarr(path: Path) -> Iterator[None]:
    """:func:`~geoprn.files.writing` for zarr's writes. When one of them fails, the others of the
    same call still run on zarr's I/O loop (it gathers them without waiting for the rest):
    wait for them to end, each moving or removing its temporary file, before the one-line error
    is raised, so none is left behind to keep the disk full."""
    try:
        with writing(path):
            yield
    except WriteError:
        on_zarr_loop(_zarr_writes_ended())
        raise


async def _zarr_writes_ended() -> None:
    """Wait on zarr's I/O loop for all its other tasks (their failures are theirs to report)."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    await asyncio.gather(*others, return_exceptions=True)


def write_block(paths: OutputPaths, block: Block, arrays: dict[str, np.ndarray]) -> None:
    """Write one block's arrays into the store (:func:`mark_done` records it finished); zarr
    writes each chunk whole or not at all.

    Raises:
        WriteError: the file system refused a write (disk full...).
    """
    rows, cols = slice(*block.rows), slice(*block.cols)
    for name, values in arrays.items():
        with writing_zarr(paths.zarr / name):
            zarr.open_array(paths.zarr / name, mode="r+")[rows, cols] = values


def mark_done(
    paths: OutputPaths, block: Block, result: dict[str, Any], variables: list[str]
) -> None:
    """Record that a block is finished, with what its task returned (``status``: computed or
    skipped) and the chunks of ``variables`` it left in the store (:func:`block_chunks`),
    atomically.

    Raises:
        WriteError: the file system refused the write (disk full...).
    """
    chunks = block_chunks(paths, block, variables)
    write_text(paths.done / block.key, json.dumps({**result, "chunks": chunks}))


def block_chunks(paths: OutputPaths, block: Block, variables: list[str]) -> dict[str, str | None]:
    """The store's chunks of ``block`` (blocks are whole chunks), each key
    (``<variable>/<chunk key>``, as zarr names it in the store) with the SHA-256 of its stored
    bytes, or None where there is no chunk (never written, or all nodata: it reads as NaN)."""
    return {key: _digest(paths.zarr / key) for key in _chunk_keys(paths, block, variables)}


def _chunk_keys(paths: OutputPaths, block: Block, variables: list[str]) -> list[str]:
    """The keys of ``block``'s chunks of ``variables`` in the store, as zarr names them."""
    (r0, r1), (c0, c1) = block.rows, block.cols
    indices = [
        (i, j)
        for i in range(r0 // CHUNK, -(-r1 // CHUNK))
        for j in range(c0 // CHUNK, -(-c1 // CHUNK))
    ]
    keys = []
    for name in variables:
        metadata = zarr.open_array(paths.zarr / name, mode="r").metadata
        keys += [f"{name}/{metadata.encode_chunk_key(index)}" for index in indices]
    return keys


def _digest(path: Path) -> str | None:
    """SHA-256 of a file's bytes (a stored chunk, compressed as it is), None when absent."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _recorded_chunks(paths: OutputPaths, block: Block) -> dict[str, str | None] | None:
    """The chunks a finished block's marker records, or None (no marker, or one of an
    earlier version, which records none)."""
    try:
        recorded = json.loads((paths.done / block.key).read_text())
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    chunks = recorded.get("chunks") if isinstance(recorded, dict) else None
    return chunks if isinstance(chunks, dict) else None


def damaged_blocks(paths: OutputPaths, blocks: list[Block]) -> list[Block]:
    """The finished ``blocks`` whose chunks in the store are no longer what their markers
    record: a chunk deleted, changed, or present where the block left none. Reads each
    recorded chunk's stored bytes once (no decompression); blocks whose markers record no
    chunks (earlier versions) are trusted."""

    def damaged(block: Block) -> bool:
        chunks = _recorded_chunks(paths, block)
        return chunks is not None and any(
            _digest(paths.zarr / key) != digest for key, digest in chunks.items()
        )

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # hashing frees the GIL
        return [b for b, bad in zip(blocks, pool.map(damaged, blocks), strict=True) if bad]


def forget(paths: OutputPaths, block: Block, variables: list[str]) -> None:
    """Undo a finished block, so that the next run computes it again: remove its marker, its
    chunks of ``variables`` (damaged ones included) and its pieces of the mask and the
    quicklook."""
    (paths.done / block.key).unlink(missing_ok=True)
    for key in _chunk_keys(paths, block, variables):
        (paths.zarr / key).unlink(missing_ok=True)
    paths.mask_piece(block).unlink(missing_ok=True)
    paths.quicklook_piece(block).unlink(missing_ok=True)


def finished_blocks(paths: OutputPaths) -> set[str]:
    """Keys of the blocks already done."""
    if not paths.done.is_dir():
        return set()
    return {p.name for p in paths.done.iterdir() if not p.name.endswith(".tmp")}


def done_result(paths: OutputPaths, block: Block) -> dict[str, Any] | None:
    """What a finished block's task returned (as :func:`mark_done` recorded it), or None when
    the block is not done."""
    try:
        text = (paths.done / block.key).read_text()
    except FileNotFoundError:
        return None
    try:
        recorded = json.loads(text)
    except json.JSONDecodeError:  # a marker of an earlier version: its status only
        return {"key": block.key, "status": text}
    recorded.pop("chunks", None)  # what the block wrote, not what its task returned
    return recorded


def open_variable(paths: OutputPaths, name: str) -> zarr.Array:
    """One probability variable of the store, for reading."""
    return zarr.open_array(paths.zarr / name, mode="r")


def run_inputs(zarr_path: Path) -> dict[str, Any]:
    """The ``inputs`` of the run record (``<stem>_run.json``) beside a ``refine`` store; {}
    when there is none.

    Raises:
        InputError: the record is not one refine wrote (not JSON, or no object).
    """
    run = zarr_path.with_name(f"{zarr_path.stem}_run.json")
    if not run.is_file():
        return {}
    try:
        inputs = json.loads(run.read_text()).get("inputs", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{run} is not a run record refine wrote ({exc})") from None
    return inputs if isinstance(inputs, dict) else {}


def mask_variable(variables: Iterable[str]) -> str:
    """The variable a ``refine`` store's mask came from, of the ones it holds: ``refined``
    where a refiner ran, else ``base``."""
    return "refined" if "refined" in variables else "base"


def mask_cut_offs(zarr_path: Path, inputs: dict[str, Any]) -> dict[str, float]:
    """The cut-off of the variable a ``refine`` store's mask came from
    (:func:`mask_variable`), as its run's ``inputs`` (:func:`run_inputs`) record it; {}
    without one.

    Raises:
        InputError: the recorded cut-off is no number in [0, 1).
    """
    recorded = inputs.get("threshold")
    if recorded is None:
        return {}
    try:
        cut = check_threshold(float(recorded))
    except (TypeError, ValueError, InputError):
        raise InputError(
            f"the run record beside {zarr_path}: its threshold, {recorded!r}, is no cut-off "
            "in [0, 1)"
        ) from None
    return {mask_variable(zarr.open_group(str(zarr_path), mode="r")): cut}

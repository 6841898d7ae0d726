"""The output folder: the georeferenced Zarr store, per-block done markers, and resume rules.

Layout of ``OUTDIR`` for a scene ``<stem>``::

    <stem>.zarr/         variables base, refined (float32, NaN at nodata, 512 chunks, Blosc LZ4)
    <stem>_mask.tif      COG mask, written when every block is done
    <stem>_quicklook.png the scene beside its base and refined probabilities
    <stem>_roads.gpkg    road centrelines (``refine --vectors``)
    <stem>_run.json      what ran, on what, how long
    .<stem>.geoprn/      run state: signature.json, done/<row>_<col> markers (each block
                         task's result, JSON) and the blocks' pieces of the mask and the
                         quicklook, mask/<row>_<col>.tif and quicklook/<row>_<col>.npz
    .<stem>.lock         exists, locked, while a run writes these outputs

A block's marker is written only after its data and pieces are, so a run killed at any point
resumes by computing the blocks without a marker. A different command on the same outputs
is refused unless the caller asks to overwrite, and so is any run while another one writes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec

from geoprn.errors import OutputError
from geoprn.raster import SceneInfo
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
    if overwrite:
        remove_outputs(paths)
        return False
    if not existing:
        return False
    signature_file = paths.state / "signature.json"
    if signature_file.is_file():
        previous = json.loads(signature_file.read_text())
        if previous == signature:
            return True
        changed = sorted(
            k for k in signature.keys() | previous.keys() if signature.get(k) != previous.get(k)
        )
        raise OutputError(
            f"{paths.outdir} holds outputs of '{paths.stem}' from a different command "
            f"(differs in: {', '.join(changed)}); use --overwrite to replace them"
        )
    names = ", ".join(p.name for p in existing)
    raise OutputError(f"{paths.outdir} already holds {names}; use --overwrite to replace them")


def remove_outputs(paths: OutputPaths) -> None:
    """Delete this scene's outputs (and nothing else in the folder)."""
    for path in paths.outputs():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def create(
    paths: OutputPaths,
    scene: SceneInfo,
    variables: list[str],
    signature: dict[str, Any],
    zarr_format: int = 2,
) -> None:
    """Create the empty, georeferenced store (metadata and coordinates only) and run state.

    Data chunks are not written: unwritten chunks read as NaN. xarray writes the CF
    ``spatial_ref`` grid mapping (via rioxarray), which both ``xarray.open_zarr`` +
    rioxarray and GDAL's Zarr driver read back.
    """
    transform = scene.transform
    xs = transform.c + transform.a * (np.arange(scene.width) + 0.5)
    ys = transform.f + transform.e * (np.arange(scene.height) + 0.5)
    empty = da.full(scene.shape, np.nan, dtype="float32", chunks=CHUNK)
    ds = xr.Dataset({name: (("y", "x"), empty) for name in variables}, coords={"x": xs, "y": ys})
    if scene.crs is not None:
        ds = ds.rio.write_crs(scene.crs)
    ds = ds.rio.write_transform(transform)
    for name in variables:
        ds[name].encoding.pop("grid_mapping", None)
        ds[name].attrs.update(grid_mapping="spatial_ref", long_name=f"{name} road probability")
    encoding = {
        name: {
            "chunks": (CHUNK, CHUNK),
            "_FillValue": np.nan,
            "compressors": [compressor(zarr_format)],
        }
        for name in variables
    }
    ds.to_zarr(paths.zarr, mode="w", compute=False, zarr_format=zarr_format, encoding=encoding)
    paths.done.mkdir(parents=True, exist_ok=True)
    (paths.state / "signature.json").write_text(json.dumps(signature, indent=1, sort_keys=True))


def write_block(paths: OutputPaths, block: Block, arrays: dict[str, np.ndarray]) -> None:
    """Write one block's arrays into the store (:func:`mark_done` records it finished)."""
    rows, cols = slice(*block.rows), slice(*block.cols)
    for name, values in arrays.items():
        zarr.open_array(paths.zarr / name, mode="r+")[rows, cols] = values


def mark_done(paths: OutputPaths, block: Block, result: dict[str, Any]) -> None:
    """Record that a block is finished, with what its task returned (``status``: computed or
    skipped), atomically."""
    marker = paths.done / block.key
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(marker)


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
        return json.loads(text)
    except json.JSONDecodeError:  # a marker of an earlier version: its status only
        return {"key": block.key, "status": text}


def open_variable(paths: OutputPaths, name: str) -> zarr.Array:
    """One probability variable of the store, for reading."""
    return zarr.open_array(paths.zarr / name, mode="r")

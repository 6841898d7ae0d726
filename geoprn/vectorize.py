"""Road centrelines from a road mask, block by block, and the file that holds them.

A scene is cut into blocks; each is read with a halo of context and traced into pieces of
centreline on the current Dask scheduler (:mod:`geoprn.road_graph`). Pieces are small, so
all of them come back to one place, where they are joined across block borders into one
graph, cleaned, simplified and georeferenced. Only the mask's blocks are ever in memory, never
the whole mask. Lines are written with pyogrio as a GeoPackage, GeoJSON or FlatGeobuf.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pyogrio
import pyogrio.errors
import rasterio
import shapely
import zarr
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from geoprn import raster
from geoprn.errors import InputError, OutputError
from geoprn.files import writing
from geoprn.road_graph import RoadNetwork, network, trace_block
from geoprn.tiling import Range, block_grid

HALO = 64
"""Pixels of context read around each block: thinning and node clusters near a block border
then come out as they would on the whole mask (roads up to about twice this wide)."""
DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON", ".fgb": "FlatGeobuf"}
GPKG_VERSION = "1.3"
"""GeoPackage version written: GDAL's default, 1.4, makes GDAL 3.6 and QGIS 3.22 warn on
every open, and GDAL 3.6's ``validate_gpkg`` fails it (its R-tree triggers are 1.4's)."""

# ---------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class RoadSource:
    """A road raster read block by block: a mask GeoTIFF, a probability raster or a Zarr
    variable written by ``refine``. Integer rasters are masks (non-zero, non-nodata is road);
    float rasters and Zarr variables are probabilities, road above ``threshold``."""

    path: str
    variable: str | None
    height: int
    width: int
    transform: Affine
    crs: CRS | None
    probabilities: bool
    threshold: float

    @classmethod
    def open(cls, path: str | Path, variable: str = "auto", threshold: float | None = None):
        """Open and check a source; raises InputError when it cannot be one. ``variable``
        ``auto``: of a ``refine`` store, the one its mask came from
        (:func:`geoprn.store.mask_variable`). ``threshold`` None: for that variable, the
        cut-off its run recorded (:func:`geoprn.store.mask_cut_offs`), else 0.5."""
        if threshold is not None:
            raster.check_threshold(threshold)
        path = Path(path)
        if not path.exists():
            raise InputError(f"file not found: {path}")
        if path.suffix == ".zarr" or (path / ".zgroup").exists() or (path / "zarr.json").exists():
            return cls._open_zarr(path, variable, threshold)
        threshold = 0.5 if threshold is None else threshold
        if path.is_dir():
            raise InputError(f"{path} is a folder, not a road mask")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(path) as ds:
                    if ds.count != 1:
                        raise InputError(f"{path} has {ds.count} bands; a road mask has one")
                    probabilities = np.dtype(ds.dtypes[0]).kind == "f"
                    return cls(
                        str(path),
                        None,
                        ds.height,
                        ds.width,
                        ds.transform,
                        ds.crs,
                        probabilities,
                        threshold,
                    )
        except RasterioError as exc:
            raise InputError(f"{path} is not a raster GDAL can read ({exc})") from None

    @classmethod
    def _open_zarr(cls, path: Path, variable: str, threshold: float | None) -> RoadSource:
        import rioxarray  # noqa: F401  (registers the .rio accessor)
        import xarray as xr

        from geoprn.store import mask_cut_offs, mask_variable, run_inputs

        try:
            ds = xr.open_zarr(path, decode_coords="all")
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{path} is not a Zarr store geoprn can read ({exc})") from None
        variable = mask_variable(ds) if variable == "auto" else variable
        if threshold is None:
            threshold = mask_cut_offs(path, run_inputs(path)).get(variable, 0.5)
        if variable not in ds:
            raise InputError(f"{path} has no variable {variable!r} (it has {', '.join(ds)})")
        array = ds[variable]
        height, width = array.shape
        return cls(
            str(path),
            variable,
            height,
            width,
            array.rio.transform(),
            array.rio.crs,
            True,
            threshold,
        )

    def read(self, rows: Range, cols: Range) -> tuple[np.ndarray, np.ndarray | None]:
        """Road mask and probabilities of rows × cols; outside the scene is background."""
        (r0, r1), (c0, c1) = rows, cols
        if self.variable is not None:
            values = _padded(zarr.open_array(Path(self.path) / self.variable, mode="r"), rows, cols)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(self.path) as ds:
                    window = Window(c0, r0, c1 - c0, r1 - r0)
                    values = ds.read(1, window=window, boundless=True, masked=True)
            values = values.astype(np.float32).filled(np.nan)
        if self.probabilities:
            return np.nan_to_num(values, nan=0.0) > self.threshold, values
        return np.nan_to_num(values, nan=0.0) != 0, None


def _padded(array, rows: Range, cols: Range) -> np.ndarray:
    """``array[rows, cols]`` as float32, NaN where the window lies outside the array."""
    height, width = array.shape
    out = np.full((rows[1] - rows[0], cols[1] - cols[0]), np.nan, np.float32)
    r0, r1 = max(rows[0], 0), min(rows[1], height)
    c0, c1 = max(cols[0], 0), min(cols[1], width)
    if r0 < r1 and c0 < c1:
        out[r0 - rows[0] : r1 - rows[0], c0 - cols[0] : c1 - cols[0]] = array[r0:r1, c0:c1]
    return out


# ---------------------------------------------------------------------------------------------
# Public API


def extract_roads(
    source: str | Path,
    threshold: float | None = None,
    variable: str = "auto",
    simplify_m: float = 1.0,
    min_length_m: float = 10.0,
    block_size: int = 2048,
    halo: int = HALO,
) -> RoadNetwork:
    """Centrelines of a road raster on disk, computed block by block on the current Dask
    scheduler.

    Args:
        source: a mask GeoTIFF, a probability raster, or a ``refine`` Zarr store.
        threshold: road above this probability (probability sources only); None: as
            :meth:`RoadSource.open` says.
        variable: which Zarr variable to read (``refined`` or ``base``; ``auto``: the one a
            ``refine`` store's mask came from).
        simplify_m: Douglas-Peucker tolerance in metres.
        min_length_m: spurs and isolated lines shorter than this are dropped.
        block_size: pixels per block side; the result does not depend on it.
        halo: pixels of context around each block.

    Raises:
        InputError: the source cannot be read or has no CRS.
    """
    road_source = RoadSource.open(source, variable, threshold)
    if road_source.crs is None:
        raise InputError(f"{source} has no CRS; road vectors need one to be placed in a GIS")
    blocks = block_grid(road_source.height, road_source.width, block_size)
    tasks = [
        dask.delayed(trace_block)(road_source.read, b.rows, b.cols, road_source.width, halo)
        for b in blocks
    ]
    pieces = [p for block_pieces in dask.compute(*tasks) for p in block_pieces]
    size = raster.pixel_size_m(road_source.crs, road_source.transform, road_source.height)
    return network(
        pieces,
        road_source.transform,
        road_source.crs,
        size,
        simplify_m,
        min_length_m,
        road_source.width,
    )


def roads_from_array(
    road: np.ndarray,
    transform: Affine | None = None,
    crs: CRS | None = None,
    probs: np.ndarray | None = None,
    pixel_size_m: tuple[float, float] | None = None,
    simplify_m: float = 1.0,
    min_length_m: float = 10.0,
    block_size: int | None = None,
    halo: int = HALO,
) -> RoadNetwork:
    """Centrelines of an in-memory road mask (see :func:`extract_roads`).

    Args:
        road: (H, W) road mask, bool or 0/1.
        transform, crs: georeferencing of the mask; none gives pixel coordinates
            (x = column, y = row, of pixel centres at +0.5).
        probs: (H, W) road probabilities for the lines' ``mean_probability``.
        pixel_size_m: (y, x) metres per pixel; from ``crs`` when None, else 1 m.
        block_size: trace in blocks of this many pixels (the result does not depend on it).
    """
    road = np.asarray(road).astype(bool)
    height, width = road.shape
    transform = transform or Affine.identity()

    def read(rows: Range, cols: Range) -> tuple[np.ndarray, np.ndarray | None]:
        window = _padded(road, rows, cols) > 0
        return window, None if probs is None else _padded(probs, rows, cols)

    if pixel_size_m is None:
        pixel_size_m = (1.0, 1.0) if crs is None else raster.pixel_size_m(crs, transform, height)
    blocks = block_grid(height, width, block_size or max(height, width))
    pieces = [p for b in blocks for p in trace_block(read, b.rows, b.cols, width, halo)]
    return network(pieces, transform, crs, pixel_size_m, simplify_m, min_length_m, width)


def check_output(path: str | Path, overwrite: bool = False) -> str:
    """The OGR driver for a roads file; refuses unknown extensions, existing files and
    folders the file cannot be written in (before any work, so a run does not fail at its end).

    Raises:
        OutputError: unknown extension, the file exists and ``overwrite`` is false, or its
            folder is missing or not writable.
    """
    path = Path(path)
    driver = DRIVERS.get(path.suffix.lower())
    if driver is None:
        raise OutputError(f"{path}: write roads as {', '.join(DRIVERS)}")
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give the roads file's name")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; use --overwrite to replace it")
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: the folder {folder} is not writable")
    return driver


def write_roads(
    roads: RoadNetwork,
    path: str | Path,
    overwrite: bool = False,
    gpkg_version: str = GPKG_VERSION,
    rfc7946: bool = True,
) -> Path:
    """Write centrelines as a GeoPackage, GeoJSON or FlatGeobuf (by extension) with pyogrio.

    One layer, ``roads``: LineStrings with ``road_id``, ``length_m`` and ``mean_probability``
    (empty when the raster held no probabilities), and the CRS. The file is written beside
    its final name and moved into place when complete; no roads writes a valid empty layer.

    Args:
        gpkg_version: GeoPackage version (see :data:`GPKG_VERSION`).
        rfc7946: GeoJSON as RFC 7946 (reprojected to WGS 84 longitude/latitude, 7 decimals),
            which web maps read; False keeps the CRS, in the obsolete ``crs`` member. GeoJSON
            has no schema, so a ``mean_probability`` with every value empty is left out
            there (readers would type it String).

    Raises:
        OutputError: see :func:`check_output`.
    """
    path = Path(path)
    driver = check_output(path, overwrite)
    tmp = path.with_name(f".{path.stem}.part{path.suffix}")
    tmp.unlink(missing_ok=True)
    wkb = shapely.to_wkb(np.array(roads.lines, dtype=object)) if roads.lines else []
    columns = {
        "road_id": np.array(roads.road_id, dtype=object),
        "length_m": np.asarray(roads.length_m, np.float64),
        "mean_probability": np.asarray(roads.mean_probability, np.float64),
    }
    options: dict[str, dict[str, str]] = {}
    if driver == "GPKG":
        options["dataset_options"] = {"VERSION": gpkg_version}
    if driver == "GeoJSON":
        if np.isnan(columns["mean_probability"]).all():
            del columns["mean_probability"]
        if rfc7946 and roads.crs is not None:
            options["layer_options"] = {"RFC7946": "YES"}
    try:
        with writing(path, extra=(pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError)):
            pyogrio.raw.write(
                tmp,
                geometry=wkb,
                field_data=list(columns.values()),
                fields=list(columns),
                geometry_type="LineString",
                crs=None if roads.crs is None else roads.crs.to_wkt(),
                driver=driver,
                layer="roads",
                **options,
            )
            tmp.replace(path)
    finally:  # a failed write leaves nothing (SQLite's journal of a GeoPackage included)
        for leftover in tmp.parent.glob(f"{tmp.name}*"):
            leftover.unlink(missing_ok=True)
    return path

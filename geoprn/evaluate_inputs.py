"""What ``geoprn evaluate`` scores: a prediction and its labels, opened on one grid.

A prediction is a refine output folder (its ``<stem>.zarr``), a ``.zarr`` store, a mask
GeoTIFF (0/1, 255 nodata) or a probability raster (float in [0, 1], or uint8 0-255). Labels
are a raster on the prediction's grid or centreline vectors burnt onto it
(:mod:`geoprn.labels`). Both read any region of the grid on demand, so the scene is never
held whole.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import shapely.affinity
from affine import Affine

from geoprn.errors import GeoprnWarning, InputError
from geoprn.labels import DEFAULT_ROAD_WIDTH, VECTOR_SUFFIXES, burn_roads, read_roads
from geoprn.raster import SceneInfo, open_raster, open_scene, pixel_size_m, read_region
from geoprn.store import mask_cut_offs, run_inputs
from geoprn.tiling import Range

VARIABLES = ("base", "refined")
"""Probability variables of a refine store, in the order they are reported."""


@dataclass(frozen=True)
class Grid:
    """A raster grid: shape, georeferencing, and pixel size in metres ((1, 1) without CRS)."""

    height: int
    width: int
    transform: Affine
    crs: Any

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def pixel_m(self) -> tuple[float, float]:
        """(y, x) metres per pixel."""
        if self.crs is None:
            return 1.0, 1.0
        return pixel_size_m(self.crs, self.transform, self.height)

    def frame(self, row: int = 0, col: int = 0) -> Affine:
        """Pixel (x = column, y = row) of a region starting at (row, col) -> metres frame."""
        py, px = self.pixel_m
        return Affine.scale(px, py) @ Affine.translation(col, row)

    def same_as(self, other: Grid) -> bool:
        """Same size, CRS (when both have one) and transform (to a thousandth of a pixel)."""
        if self.shape != other.shape:
            return False
        if self.crs is not None and other.crs is not None and self.crs != other.crs:
            return False
        a, b = self.transform, other.transform
        size = max(abs(a.a), abs(a.e), 1e-12)
        return all(abs(u - v) <= 1e-3 * size for u, v in zip(a[:6], b[:6], strict=True))


def grid_of(info: SceneInfo) -> Grid:
    return Grid(info.height, info.width, info.transform, info.crs)


@dataclass
class Prediction:
    """A prediction to score: one raster, or a refine store with several variables."""

    path: Path
    name: str
    variables: list[str]
    grid: Grid
    image: Path | None = None
    bands: list[int] = field(default_factory=lambda: [1, 2, 3])
    scale: float = 1.0
    cut_offs: dict[str, float] = field(default_factory=dict)
    """Road cut-off per variable where the prediction records one: the ``threshold`` of the
    ``refine`` run that made the store (its mask's), for the variable the mask came from."""
    _store: Path | None = None

    def cut_off(self, variable: str, given: float | None = None) -> float:
        """The cut-off ``variable`` is scored at: ``given``, else its recorded one, else 0.5."""
        return given if given is not None else self.cut_offs.get(variable, 0.5)

    def read(self, variable: str, rows: Range, cols: Range) -> np.ndarray:
        """(H, W) float32 road probabilities over a region inside the grid, NaN at nodata."""
        if self._store is not None:
            import zarr

            array = zarr.open_array(self._store / variable, mode="r")
            return np.asarray(array[slice(*rows), slice(*cols)], dtype=np.float32)
        with open_raster(self.path) as ds:
            data, valid = read_region(ds, [1], rows, cols)
        values = data[0].astype(np.float32) / self.scale
        return np.where(valid & np.isfinite(values), values, np.float32(np.nan))


def open_prediction(path: str | Path) -> Prediction:
    """A refine output folder, a ``.zarr`` store, a mask or a probability raster.

    Raises:
        InputError: missing, unreadable, several stores in a folder, or not one band.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    if path.is_dir() and path.suffix != ".zarr":
        stores = sorted(path.glob("*.zarr"))
        if len(stores) != 1:
            found = ", ".join(s.name for s in stores) or "no .zarr store"
            raise InputError(f"{path} holds {found}; give the .zarr store of the scene to score")
        path = stores[0]
    if path.suffix == ".zarr":
        return _open_store(path)
    info = open_scene(path)
    if info.count != 1:
        raise InputError(f"{path} has {info.count} bands; a mask or probabilities have one")
    kind = _raster_kind(path, info)
    scale = 255.0 if kind == "probability" and info.dtype == "uint8" else 1.0
    return Prediction(path, path.stem, [kind], grid_of(info), scale=scale)


def _raster_kind(path: Path, info: SceneInfo) -> str:
    """``mask`` for integer 0/1 rasters (255 nodata), else ``probability``."""
    if np.issubdtype(np.dtype(info.dtype), np.floating):
        return "probability"
    if info.nodata == 255 or _max_value(path) <= 1:
        return "mask"
    if info.dtype != "uint8":
        raise InputError(f"{path}: integer predictions must be a 0/1 mask or uint8 0-255")
    return "probability"


def _max_value(path: Path) -> float:
    """The largest valid value of a one-band raster, read block by block."""
    top = -math.inf
    with open_raster(path) as ds:
        for _, window in ds.block_windows(1):
            data = ds.read(1, window=window, masked=True)
            if data.count():
                top = max(top, float(data.max()))
    return top


def _open_store(path: Path) -> Prediction:
    """A refine Zarr store; its scene (from ``<stem>_run.json`` beside it) for pictures."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    try:
        ds = xr.open_zarr(path, decode_coords="all")
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path} is not a refine store ({exc})") from None
    variables = [v for v in VARIABLES if v in ds.data_vars]
    if not variables:
        raise InputError(f"{path} holds no base or refined probabilities")
    height, width = ds.rio.shape
    grid = Grid(height, width, ds.rio.transform(), ds.rio.crs)
    prediction = Prediction(path, path.stem, variables, grid, _store=path)
    inputs = run_inputs(path)
    prediction.cut_offs = mask_cut_offs(path, inputs)
    if inputs.get("scene") and Path(inputs["scene"]).is_file():
        prediction.image = Path(inputs["scene"])
        prediction.bands = list(inputs.get("bands") or [1, 2, 3])[:3]
    return prediction


@dataclass
class Labels:
    """Road labels on a prediction's grid: a raster, or centreline vectors burnt onto it."""

    path: Path
    grid: Grid
    road_width: float = DEFAULT_ROAD_WIDTH
    lines: list[shapely.Geometry] | None = None
    """Vector labels: the lines in the grid's CRS (None for a label raster)."""
    lines_m: list[shapely.Geometry] | None = None
    """Vector labels: the lines in the metres frame."""
    tree: shapely.STRtree | None = None
    """Vector labels: a spatial index of ``lines_m``."""

    def read(self, rows: Range, cols: Range) -> tuple[np.ndarray, np.ndarray]:
        """(road, valid) bool arrays over a region inside the grid; no road at nodata."""
        shape = (rows[1] - rows[0], cols[1] - cols[0])
        if self.lines is None:
            with open_raster(self.path) as ds:
                data, valid = read_region(ds, [1], rows, cols)
            return (data[0] != 0) & valid, valid
        # Burn with a margin wider than half a road, so the widened lines are whole inside.
        py, px = self.grid.pixel_m
        m = math.ceil(self.road_width / min(py, px)) + 1
        transform = self.grid.transform @ Affine.translation(cols[0] - m, rows[0] - m)
        road = burn_roads(
            self.lines,
            (shape[0] + 2 * m, shape[1] + 2 * m),
            transform,
            self.grid.crs,
            self.road_width,
        )
        return road[m:-m, m:-m] > 0, np.ones(shape, bool)


def open_labels(path: str | Path, grid: Grid, road_width: float = DEFAULT_ROAD_WIDTH) -> Labels:
    """Labels for predictions on ``grid``: a raster on it, or vectors (read once).

    Raises:
        InputError: missing or unreadable, a raster on another grid, vectors without CRS
            on either side.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    if path.suffix.lower() in VECTOR_SUFFIXES:
        lines = read_roads(path, grid.crs)
        frame = grid.frame() @ ~grid.transform
        matrix = [frame.a, frame.b, frame.d, frame.e, frame.c, frame.f]
        lines_m = [shapely.affinity.affine_transform(g, matrix) for g in lines]
        return Labels(path, grid, road_width, lines, lines_m, shapely.STRtree(lines_m))
    info = open_scene(path)
    other = grid_of(info)
    if not other.same_as(grid):
        raise InputError(
            f"labels {path} ({info.width}x{info.height} px) are not on the prediction's grid "
            f"({grid.width}x{grid.height} px, same CRS and transform needed)"
        )
    return Labels(path, grid, road_width)


def warn_if_no_crs(grid: Grid) -> None:
    """Network metrics assume 1 m pixels on a grid without CRS; say so."""
    if grid.crs is None:
        warnings.warn(
            "the prediction has no CRS; centreline metrics take its pixels as 1 m",
            GeoprnWarning,
            stacklevel=2,
        )


def check_image(path: str | Path, grid: Grid) -> Path:
    """The scene to draw the report's pictures from; it must be on the prediction's grid.

    Raises:
        InputError: missing, unreadable or on another grid.
    """
    info = open_scene(path)
    if not grid_of(info).same_as(grid):
        raise InputError(
            f"image {path} ({info.width}x{info.height} px) is not on the prediction's grid "
            f"({grid.width}x{grid.height} px)"
        )
    return Path(path)

"""Road labels from centreline vectors: LineStrings burnt onto a raster grid with a width.

GIS users have roads as centrelines (OpenStreetMap, GeoPackage, GeoJSON, Shapefile) in any
CRS. They are read with pyogrio, reprojected to the grid's CRS (rasterio.warp), burnt onto
the grid (every pixel a line touches), then widened to ``road_width`` metres with an
elliptical structuring element sized by the grid's pixel size in metres along each axis, so
the width is right in a projected or a geographic CRS alike.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pyogrio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.warp import transform_geom
from skimage.draw import ellipse
from skimage.morphology import dilation

from geoprn.errors import InputError
from geoprn.raster import pixel_size_m

VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".shp", ".fgb")
DEFAULT_ROAD_WIDTH = 4.0
"""Metres; the width of a two-lane road, and what ``--road-width`` defaults to."""


def parse_metres(text: str | float, what: str = "a road width", allow_zero: bool = False) -> float:
    """``"4m"``, ``"4 m"`` or ``4`` -> 4.0 metres.

    Raises:
        InputError: not a positive (or, with ``allow_zero``, zero) length in metres; ``what``
            names the quantity in the message.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(m)?\s*", str(text))
    if not match or (float(match.group(1)) <= 0 and not (allow_zero and match.group(1))):
        kind = "a length" if allow_zero else "a positive length"
        raise InputError(f"{what} is {kind} in metres, like 4m, not {text!r}")
    return float(match.group(1))


def rasterize_roads(
    path: str | Path,
    shape: tuple[int, int],
    transform: Affine,
    crs: CRS | None,
    road_width: float = DEFAULT_ROAD_WIDTH,
) -> np.ndarray:
    """Burn the (Multi)LineStrings of a vector file onto a grid as a road mask.

    Args:
        path: any vector file GDAL reads (GeoPackage, GeoJSON, Shapefile, FlatGeobuf).
        shape: (height, width) of the grid.
        transform, crs: the grid's georeferencing.
        road_width: full road width in metres.

    Returns:
        (H, W) uint8, 1 on roads.

    Raises:
        InputError: unreadable file, no CRS on either side, or no line geometry.
    """
    return burn_roads(read_roads(path, crs), shape, transform, crs, road_width)


def read_roads(path: str | Path, crs: CRS | None) -> list[shapely.Geometry]:
    """The (Multi)LineStrings of a vector file, 2-D, reprojected to ``crs``.

    Raises:
        InputError: unreadable file, no CRS on either side, or no line geometry.
    """
    try:
        meta, _, wkb, _ = pyogrio.raw.read(path)
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
        raise InputError(f"cannot read road vectors {path}: {exc}") from None
    if meta["crs"] is None:
        raise InputError(f"{path} has no CRS; road vectors must say where they are")
    geometries = [g for g in shapely.from_wkb(wkb) if g is not None and not g.is_empty]
    lines = [g for g in geometries if g.geom_type in ("LineString", "MultiLineString")]
    if geometries and not lines:
        raise InputError(f"{path} holds {geometries[0].geom_type}s, not road centrelines")
    if crs is None:
        raise InputError("road vectors need a georeferenced image to be burnt onto")
    source = CRS.from_user_input(meta["crs"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [
            shapely.geometry.shape(
                transform_geom(source, crs, shapely.geometry.mapping(shapely.force_2d(g)))
            )
            for g in lines
        ]


def burn_roads(
    lines: list[shapely.Geometry],
    shape: tuple[int, int],
    transform: Affine,
    crs: CRS,
    road_width: float = DEFAULT_ROAD_WIDTH,
) -> np.ndarray:
    """Burn lines in the grid's CRS onto the grid (every pixel touched), ``road_width`` m wide.

    Returns:
        (H, W) uint8, 1 on roads.
    """
    py, px = pixel_size_m(crs, transform, shape[0])
    burnt = np.zeros(shape, np.uint8)
    if lines:
        burnt = rasterize(
            [(g, 1) for g in lines], out_shape=shape, transform=transform, all_touched=True
        )
    half = road_width / 2
    ry, rx = max(half / py - 0.5, 0.0), max(half / px - 0.5, 0.0)
    footprint = np.zeros((2 * int(ry) + 1, 2 * int(rx) + 1), bool)
    footprint[ellipse(int(ry), int(rx), ry + 0.5, rx + 0.5, shape=footprint.shape)] = True
    return dilation(burnt, footprint).astype(np.uint8)

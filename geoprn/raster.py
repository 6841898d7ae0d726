"""Scene opening and validation, reflect-padded window reads, and the COG mask writer."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from geoprn.errors import GeoprnWarning, InputError
from geoprn.tiling import Range

log = logging.getLogger(__name__)

MIN_SIDE = 16
"""Scenes narrower than this (in pixels) are refused: no road can be told apart in them."""


@dataclass(frozen=True)
class SceneInfo:
    """What the pipeline needs to know of a raster, read once from its header."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs: Any
    transform: Any
    nodata: float | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def pixel_area_m2(self) -> float | None:
        """Area of one pixel in square metres, when the CRS is projected in metres."""
        if self.crs is None or not self.crs.is_projected:
            return None
        return abs(self.transform.a * self.transform.e) * self.crs.linear_units_factor[1] ** 2


def open_scene(path: str | Path) -> SceneInfo:
    """Open and validate a raster: it exists, GDAL reads it, it is whole and large enough.

    A scene without a CRS is accepted with a warning; its outputs carry no CRS either.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    if path.is_dir() and not path.suffix == ".zarr":
        raise InputError(f"{path} is a folder, not a raster")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                info = SceneInfo(
                    path=str(path.resolve()),
                    width=ds.width,
                    height=ds.height,
                    count=ds.count,
                    dtype=ds.dtypes[0],
                    crs=ds.crs,
                    transform=ds.transform,
                    nodata=ds.nodata,
                )
                _check_complete(ds, path)
    except RasterioError as exc:
        raise InputError(f"{path} is not a raster GDAL can read ({_first_line(exc)})") from None
    if min(info.width, info.height) < MIN_SIDE:
        raise InputError(
            f"{path} is {info.width}x{info.height} px; scenes need at least {MIN_SIDE} px a side"
        )
    if info.crs is None:
        warnings.warn(
            f"{path} has no CRS; outputs will carry none either", GeoprnWarning, stacklevel=2
        )
    return info


def _check_complete(ds: rasterio.DatasetReader, path: Path) -> None:
    """Refuse a GeoTIFF whose last block lies past the end of the file (truncated copy)."""
    if ds.driver != "GTiff":
        return
    size = os.path.getsize(path)
    rows, cols = (-(-n // b) for n, b in zip(ds.shape, ds.block_shapes[0], strict=True))
    for band in range(1, ds.count + 1):
        offset = ds.get_tag_item(f"BLOCK_OFFSET_{cols - 1}_{rows - 1}", "TIFF", bidx=band)
        length = ds.get_tag_item(f"BLOCK_SIZE_{cols - 1}_{rows - 1}", "TIFF", bidx=band)
        if offset and length and int(offset) + int(length) > size:
            raise InputError(f"{path} is truncated: its data ends before its last block")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def reflect_index(coords: np.ndarray, length: int) -> np.ndarray:
    """Map coordinates on an unbounded axis to ``[0, length)`` by mirroring at the edges.

    The mirror is about the scene's own edges (numpy's ``reflect``), so the same padded
    coordinate maps to the same pixel whichever block asks for it.
    """
    if length == 1:
        return np.zeros_like(coords)
    period = 2 * (length - 1)
    folded = np.mod(coords, period)
    return np.where(folded < length, folded, period - folded)


def read_region(
    ds: rasterio.DatasetReader,
    bands: list[int] | None,
    rows: Range,
    cols: Range,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Read bands and validity over a region that may extend past the scene, reflect-padded.

    Args:
        ds: an open raster.
        bands: 1-based band indexes in model order, or None to read validity alone.
        rows, cols: half-open pixel ranges in scene coordinates; may be negative or past the end.

    Returns:
        ``(data, valid)``: data (C, H, W) in the raster's dtype (None without bands), and
        valid (H, W) bool from the dataset mask (nodata value, alpha band or internal mask).
    """
    iy = reflect_index(np.arange(*rows), ds.height)
    ix = reflect_index(np.arange(*cols), ds.width)
    y0, x0 = int(iy.min()), int(ix.min())
    window = Window(x0, y0, int(ix.max()) + 1 - x0, int(iy.max()) + 1 - y0)
    grid = np.ix_(iy - y0, ix - x0)
    try:
        valid = (ds.dataset_mask(window=window) > 0)[grid]
        data = None if bands is None else ds.read(bands, window=window)[(slice(None), *grid)]
    except RasterioError as exc:
        raise InputError(f"cannot read {window} of {ds.name}: {_first_line(exc)}") from None
    return data, valid


def write_mask_cog(
    probabilities, scene: SceneInfo, path: Path, threshold: float, chunk: int = 512
) -> None:
    """Threshold a (H, W) probability array (NaN = nodata) into a uint8 COG, streamed by rows.

    ``probabilities`` is anything sliceable with ``[rows, cols]`` (a Zarr array). The mask is
    1 for road, 0 for background and 255 (declared nodata) where the scene has no data. It is
    written to a temporary GeoTIFF strip by strip, then copied into a COG with overviews, and
    moved into place only when complete.
    """
    tmp = path.with_name(path.name + ".part.tif")
    profile = {
        "driver": "GTiff",
        "width": scene.width,
        "height": scene.height,
        "count": 1,
        "dtype": "uint8",
        "nodata": 255,
        "crs": scene.crs,
        "transform": scene.transform,
        "tiled": True,
        "blockxsize": chunk,
        "blockysize": chunk,
        "compress": "deflate",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **profile) as dst:
            for y0 in range(0, scene.height, chunk):
                y1 = min(y0 + chunk, scene.height)
                strip = np.asarray(probabilities[y0:y1, :])
                mask = np.where(np.isnan(strip), 255, strip > threshold).astype("uint8")
                dst.write(mask, 1, window=Window(0, y0, scene.width, y1 - y0))
        final = path.with_name(path.name + ".part")
        rasterio.shutil.copy(
            tmp,
            final,
            driver="COG",
            compress="deflate",
            blocksize=chunk,
            overview_resampling="nearest",
        )
    tmp.unlink()
    final.replace(path)

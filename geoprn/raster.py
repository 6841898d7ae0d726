"""Scene opening and validation, reflect-padded window reads, and the COG mask writer."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from geoprn.errors import GeoprnWarning, InputError
from geoprn.files import replacing
from geoprn.remote import is_remote, read_settings, remote_version
from geoprn.tiling import Range

log = logging.getLogger(__name__)

GDAL_CACHE_MB = 128
"""GDAL's raster block cache. Its default, 5 % of RAM, fills as a scene is read and made peak
memory grow with the scene (1.42x from 9 to 144 Mpx); capped, it stays flat (1.09x,
``benchmarks/memory.py --scales 1,4,16``). A GDAL_CACHEMAX the user sets is kept."""
os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MB))

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
    has_transform: bool = True
    """False when the raster has no geotransform (``transform`` is then rasterio's identity
    stand-in, which the outputs do not carry)."""
    version: dict[str, Any] = field(default_factory=dict)
    """What identifies the file's content when opened: size and modification time, or for a
    remote scene what its server reports (:func:`geoprn.remote.remote_version`)."""

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def gsd(self) -> float | None:
        """Ground sampling distance in metres per pixel (geometric mean of y and x), if known."""
        if self.crs is None:
            return None
        y, x = pixel_size_m(self.crs, self.transform, self.height)
        return float(np.sqrt(y * x))

    @property
    def area_km2(self) -> float | None:
        """The scene's ground area in km², if its CRS is known."""
        if self.crs is None or not self.has_transform:
            return None
        y, x = pixel_size_m(self.crs, self.transform, self.height)
        return y * x * self.width * self.height / 1e6

    @property
    def pixel_area_m2(self) -> float | None:
        """Area of one pixel in square metres, when the CRS is projected in metres."""
        if self.crs is None or not self.crs.is_projected:
            return None
        return abs(self.transform.a * self.transform.e) * self.crs.linear_units_factor[1] ** 2


def pixel_size_m(crs: Any, transform: Affine, height: int) -> tuple[float, float]:
    """(y, x) size of a pixel in metres.

    Projected CRSs use their linear unit; geographic ones convert degrees at the grid's centre
    latitude (WGS 84 ellipsoid, good to a fraction of a percent at this scale).
    """
    a, e = abs(transform.a), abs(transform.e)
    if crs.is_projected:
        unit = crs.linear_units_factor[1]
        return e * unit, a * unit
    latitude = np.radians(transform.f + transform.e * height / 2)
    return (
        float(e * (111_132.92 - 559.82 * np.cos(2 * latitude))),
        float(a * (111_412.84 * np.cos(latitude) - 93.5 * np.cos(3 * latitude))),
    )


def open_scene(path: str | Path) -> SceneInfo:
    """Open and validate a raster: it exists, GDAL reads it, it is whole and large enough.

    A scene without a CRS is accepted with a warning; its outputs carry no CRS either. A
    remote scene (``https://``, ``s3://``, ``/vsi...``: :mod:`geoprn.remote`) is read through
    GDAL's virtual file systems; its ``version`` is what the server says of it.
    """
    remote = is_remote(path)
    if remote:
        version = remote_version(str(path))
        name = str(path)
    else:
        path = Path(path)
        if not path.exists():
            raise InputError(f"file not found: {path}")
        if path.is_dir() and not path.suffix == ".zarr":
            raise InputError(f"{path} is a folder, not a raster")
        stat = path.stat()
        version = {"scene_bytes": stat.st_size, "scene_mtime_ns": stat.st_mtime_ns}
        name = str(path.resolve())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.Env(**read_settings(path)), rasterio.open(path) as ds:
                info = SceneInfo(
                    path=name,
                    width=ds.width,
                    height=ds.height,
                    count=ds.count,
                    dtype=ds.dtypes[0],
                    crs=ds.crs,
                    transform=ds.transform,
                    nodata=ds.nodata,
                    has_transform=has_geotransform(ds),
                    version=version,
                )
                if not remote:
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


def has_geotransform(ds: rasterio.DatasetReader) -> bool:
    """Whether GDAL found a geotransform in ``ds``: rasterio returns the identity matrix in
    place of a missing one (warning when there are no GCPs or RPCs either)."""
    if not ds.transform.is_identity:
        return True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NotGeoreferencedWarning)
        ds.read_transform()
    missing = any(issubclass(w.category, NotGeoreferencedWarning) for w in caught)
    return not (missing or ds.gcps[0] or ds.rpcs)


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


GDAL_THREADS = "ALL_CPUS"
"""Threads GDAL decodes and compresses raster blocks with (GeoTIFF, COG): one read of a
block's region or one COG spans many 512 px blocks, which GDAL then handles in parallel."""


@contextlib.contextmanager
def open_raster(path: str | Path) -> Iterator[rasterio.DatasetReader]:
    """Open a raster for reading, decoding its blocks on ``GDAL_THREADS`` threads (no warning
    for a raster without georeferencing: ``open_scene`` has decided about those)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        settings = {"GDAL_NUM_THREADS": GDAL_THREADS, **read_settings(path)}
        with rasterio.Env(**settings), rasterio.open(path) as ds:
            yield ds


def mirrored(
    read: Callable[[Window], np.ndarray], rows: Range, cols: Range, height: int, width: int
) -> np.ndarray:
    """``[..., rows, cols]`` of a ``height`` x ``width`` raster whose ``read(window)`` gives
    (..., h, w) arrays, for ranges that may extend past its edges: mirrored there as
    :func:`reflect_index` mirrors.

    Where one mirror covers the margins (any block of a scene larger than its halo), only the
    part inside is read and the margins are mirrored with ``np.pad``; otherwise (tiny scenes)
    the covering window is read and indexed.
    """
    spans = [_inside_and_margins(rows, height), _inside_and_margins(cols, width)]
    if None not in spans:
        (y0, y1, *ypad), (x0, x1, *xpad) = spans
        data = read(Window(x0, y0, x1 - x0, y1 - y0))
        if any(ypad) or any(xpad):
            data = np.pad(data, [(0, 0)] * (data.ndim - 2) + [ypad, xpad], mode="reflect")
        return data
    iy = reflect_index(np.arange(*rows), height)
    ix = reflect_index(np.arange(*cols), width)
    y0, x0 = int(iy.min()), int(ix.min())
    data = read(Window(x0, y0, int(ix.max()) + 1 - x0, int(iy.max()) + 1 - y0))
    return data[(..., *np.ix_(iy - y0, ix - x0))]


def _inside_and_margins(span: Range, length: int) -> tuple[int, int, int, int] | None:
    """(start, stop, before, after): ``span`` is the axis' ``[start, stop)`` with ``before``
    and ``after`` pixels beyond it; None when a margin is too wide to mirror once."""
    start, stop = max(span[0], 0), min(span[1], length)
    before, after = start - span[0], span[1] - stop
    return (start, stop, before, after) if max(before, after) < stop - start else None


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
        In a floating-point raster a pixel NaN or infinite in any band is nodata too, declared
        or not, and reads as 0: it would otherwise spread through every window it falls in.
    """
    try:
        valid = mirrored(lambda w: ds.dataset_mask(window=w) > 0, rows, cols, ds.height, ds.width)
        data = None
        if np.dtype(ds.dtypes[0]).kind == "f":
            every = mirrored(lambda w: ds.read(window=w), rows, cols, ds.height, ds.width)
            finite = np.isfinite(every).all(axis=0)
            valid &= finite
            if bands is not None:
                data = every[[b - 1 for b in bands]]
                data[:, ~finite] = 0
        elif bands is not None:
            data = mirrored(lambda w: ds.read(bands, window=w), rows, cols, ds.height, ds.width)
    except RasterioError as exc:
        raise InputError(f"cannot read {rows} x {cols} of {ds.name}: {_first_line(exc)}") from None
    return data, valid


def read_ahead(read: Callable[[Any], np.ndarray], items: Iterable, ahead: int = 4) -> Iterator:
    """``read(item)`` for each item, in order, with up to ``ahead`` reads running in threads
    ahead of the consumer: decompression overlaps writing, memory stays bounded."""
    with ThreadPoolExecutor(ahead) as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(read, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


MASK_NODATA = 255


def check_threshold(threshold: float) -> float:
    """``threshold`` if it can cut road from background, else InputError: 1 and above (or NaN)
    would leave no road in any mask, below 0 no background."""
    if not 0 <= threshold < 1:
        raise InputError(f"--threshold must lie in [0, 1), not {threshold}")
    return threshold


def road_mask(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) probabilities (NaN = nodata) as the uint8 mask: 1 road, 0 background, 255 nodata."""
    mask = (probabilities > threshold).view(np.uint8)  # no int64 temporary, as np.where makes
    mask[np.isnan(probabilities)] = MASK_NODATA
    return mask


def _mask_profile(height: int, width: int, chunk: int = 512) -> dict[str, Any]:
    """A tiled uint8 GeoTIFF for mask pixels that are written once and read once: PackBits is
    the fastest GDAL codec to write and read, and the COG compresses them again."""
    return {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 1,
        "dtype": "uint8",
        "nodata": MASK_NODATA,  # blocks never written read as nodata
        "tiled": True,
        "blockxsize": chunk,
        "blockysize": chunk,
        "compress": "packbits",
    }


def write_mask_piece(path: Path, probabilities: np.ndarray, threshold: float) -> None:
    """Write a block's part of the mask (:func:`road_mask` of its probabilities) as
    ``path``, complete or not at all; :func:`write_mask_cog` assembles the pieces."""
    mask = road_mask(probabilities, threshold)
    with replacing(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **_mask_profile(*mask.shape)) as dst:
            dst.write(mask, 1)


def write_mask_cog(
    pieces: list[tuple[Path, Range, Range]], scene: SceneInfo, path: Path, chunk: int = 512
) -> None:
    """Assemble the uint8 mask COG from the blocks' pieces (:func:`write_mask_piece`).

    Each piece is a file and the rows and columns of the scene it covers; pixels no piece
    covers are nodata (255). The pieces are copied into a temporary GeoTIFF, which is then
    copied into a COG with overviews and moved into place only when complete; neither
    temporary file is left behind, whatever happens.

    Raises:
        WriteError: the file system refused a write (disk full...).
    """
    tmp = path.with_name(path.name + ".part.tif")
    profile = {**_mask_profile(scene.height, scene.width, chunk), "crs": scene.crs}
    if scene.has_transform:  # none made up: rasterio would write its identity stand-in
        profile["transform"] = scene.transform

    def read_piece(piece: Path) -> np.ndarray:
        with rasterio.open(piece) as src:
            return src.read(1)

    with replacing(path) as final, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(tmp, "w", **profile) as dst:
                files = [file for file, _, _ in pieces]
                pixels = read_ahead(read_piece, files)
                for (_, rows, cols), mask in zip(pieces, pixels, strict=True):
                    dst.write(mask, 1, window=Window(cols[0], rows[0], *mask.shape[::-1]))
            rasterio.shutil.copy(
                tmp,
                final,
                driver="COG",
                compress="deflate",
                blocksize=chunk,
                overview_resampling="nearest",
                num_threads=GDAL_THREADS,
            )
        finally:
            tmp.unlink(missing_ok=True)


RESAMPLE_BEYOND = 1.5
"""``--resample auto`` resamples when scene and model GSDs differ by more than this factor."""


@dataclass(frozen=True)
class WorkGrid:
    """The pixel grid the models run on: the scene's own, or the scene at the models' GSD.

    ``factor`` is the model pixel size over the scene pixel size (4 for a 0.25 m scene and a
    1 m model). Work pixel ``i`` covers scene pixels ``[i * factor, (i + 1) * factor)``, so the
    grid is anchored at the scene origin whatever the block, and so is everything computed on
    it. Probabilities come back to the scene grid by bilinear interpolation.
    """

    factor: float = 1.0
    height: int = 0
    width: int = 0

    @classmethod
    def choose(cls, scene: SceneInfo, model_gsd: float | None, mode: str) -> WorkGrid:
        """The grid for ``scene``: resampled when ``mode`` is ``auto`` and the GSDs differ by
        more than :data:`RESAMPLE_BEYOND`, the scene's own otherwise."""
        if mode not in ("auto", "off"):
            raise InputError(f"--resample must be auto or off, not {mode}")
        gsd = scene.gsd
        if mode == "off" or not model_gsd or not gsd:
            return cls(1.0, scene.height, scene.width)
        factor = model_gsd / gsd
        if max(factor, 1 / factor) <= RESAMPLE_BEYOND:
            return cls(1.0, scene.height, scene.width)
        height, width = math.ceil(scene.height / factor), math.ceil(scene.width / factor)
        if min(height, width) < MIN_SIDE:
            raise InputError(
                f"{scene.path} is {scene.width}x{scene.height} px at {gsd:.2f} m: only "
                f"{width}x{height} px at the model's {model_gsd:g} m (--resample off runs it "
                "as it is)"
            )
        return cls(factor, height, width)

    @property
    def resampled(self) -> bool:
        return self.factor != 1.0

    def support(self, span: Range) -> Range:
        """The work-grid range that bilinear interpolation onto scene pixels ``span`` reads."""
        start = math.floor((span[0] + 0.5) / self.factor - 0.5)
        stop = math.floor((span[1] - 0.5) / self.factor - 0.5) + 2
        return start, stop

    def to_scene(self, values: np.ndarray, rows: Range, cols: Range) -> np.ndarray:
        """Bilinear values at the centres of scene pixels ``rows`` x ``cols`` from ``values``,
        which covers ``support(rows)`` x ``support(cols)`` of the work grid."""
        for axis, span in ((0, rows), (1, cols)):
            centres = (np.arange(*span) + 0.5) / self.factor - 0.5
            low = np.floor(centres)
            weight = (centres - low).astype(np.float32)
            index = (low - self.support(span)[0]).astype(np.int64)
            a, b = np.take(values, index, axis=axis), np.take(values, index + 1, axis=axis)
            shape = [-1, 1] if axis == 0 else [1, -1]
            values = a + (b - a) * weight.reshape(shape)
        return values

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[rasterio.io.DatasetReaderBase]:
        """Open a raster on the scene's grid as seen on this grid (a WarpedVRT when resampled,
        averaging scene pixels into work pixels)."""
        with open_raster(path) as ds:
            if not self.resampled:
                yield ds
                return
            transform = ds.transform @ Affine.scale(self.factor)
            with WarpedVRT(
                ds,
                crs=ds.crs,
                transform=transform,
                width=self.width,
                height=self.height,
                resampling=Resampling.average,
            ) as vrt:
                yield vrt

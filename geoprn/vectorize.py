"""Road centrelines from a road mask: mask → skeleton → graph → LineStrings, block by block.

A scene is cut into blocks. Each block is read with a halo of context, holes of a few pixels
are filled and the mask is thinned to a one-pixel skeleton (scikit-image). Skeleton pixels
with two neighbours are *path* pixels; the others are *nodes*: ends (one neighbour) and
junctions (three or more), where 8-connected node pixels form one node at their centroid.
A block traces the paths through the pixels it owns into pieces; a piece ends at a node or
where its path leaves the block, as the pair (last pixel, next pixel). Pieces are small, so
all of them come back to one place, where pieces cut at block borders are joined by matching
those pairs: a road crossing a border becomes one line again, with nothing doubled or lost,
whatever the block size. Only the mask's blocks are ever in memory, never the whole mask.

Then the graph is cleaned: spurs (an end joined to a junction) and isolated lines shorter
than ``min_length_m`` are dropped, lines meeting at a node of degree two are merged (one
feature per edge between junctions or ends), and lines are simplified with a tolerance in
metres (Douglas-Peucker, shapely). Lengths are measured in metres along the simplified line.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
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
from scipy import ndimage
from skimage.morphology import skeletonize

from geoprn import raster
from geoprn.errors import InputError, OutputError
from geoprn.files import writing
from geoprn.tiling import Range, block_grid

HALO = 64
"""Pixels of context read around each block: thinning and node clusters near a block border
then come out as they would on the whole mask (roads up to about twice this wide)."""
HOLE_AREA = 64
"""Holes in the road mask smaller than this (in pixels) are filled before thinning, so a
speckle inside a road does not split its centreline into a loop."""
DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON", ".fgb": "FlatGeobuf"}
GPKG_VERSION = "1.3"
"""GeoPackage version written: GDAL's default, 1.4, makes GDAL 3.6 and QGIS 3.22 warn on
every open, and GDAL 3.6's ``validate_gpkg`` fails it (its R-tree triggers are 1.4's)."""
EIGHT = np.ones((3, 3), bool)

Reader = Callable[[Range, Range], tuple[np.ndarray, np.ndarray | None]]
"""Reads rows × cols of a scene (pixels outside it read as background): road mask (bool)
and road probability (float, NaN unknown) or None."""


@dataclass(frozen=True)
class RoadNetwork:
    """Road centrelines of a scene, in its CRS (pixel coordinates when it has none)."""

    lines: list[shapely.LineString]
    length_m: np.ndarray
    mean_probability: np.ndarray
    road_id: list[str]
    crs: CRS | None

    @property
    def total_length_m(self) -> float:
        return float(self.length_m.sum())


@dataclass
class _Piece:
    """A run of path pixels traced inside one block: (n, 2) scene (row, col) coordinates.

    Each end is ``("node", key, row, col)``, ``("open", pixel, next_pixel)`` (the path goes on
    in another block; both as linear scene indices) or ``("ring",)`` for a closed loop.
    """

    pixels: np.ndarray
    ends: list[tuple]
    prob_sum: float
    prob_count: int


@dataclass
class _Edge:
    """A line of the assembled graph: (row, col) vertices and the nodes at its ends."""

    coords: np.ndarray
    nodes: list[object]
    prob_sum: float
    prob_count: int
    npixels: int
    metric: shapely.LineString | None = None
    """The simplified line in metres (see :func:`_metric_line`), once measured."""


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
        dask.delayed(_trace_block)(road_source.read, b.rows, b.cols, road_source.width, halo)
        for b in blocks
    ]
    pieces = [p for block_pieces in dask.compute(*tasks) for p in block_pieces]
    size = raster.pixel_size_m(road_source.crs, road_source.transform, road_source.height)
    return _network(
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
    pieces = [p for b in blocks for p in _trace_block(read, b.rows, b.cols, width, halo)]
    return _network(pieces, transform, crs, pixel_size_m, simplify_m, min_length_m, width)


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


# ---------------------------------------------------------------------------------------------
# Tracing one block


def _trace_block(
    read: Reader, rows: Range, cols: Range, scene_width: int, halo: int
) -> list[_Piece]:
    """The pieces of skeleton path owned by one block (rows × cols), read with a halo."""
    top, left = rows[0] - halo, cols[0] - halo
    road, probs = read((top, rows[1] + halo), (left, cols[1] + halo))
    skeleton = skeletonize(_fill_small_holes(road))
    degree = ndimage.convolve(skeleton.astype(np.uint8), EIGHT.astype(np.uint8), mode="constant")
    degree = np.where(skeleton, degree.astype(np.int16) - 1, 0)
    skeleton &= degree > 0
    node = skeleton & (degree != 2)
    core = np.zeros_like(skeleton)
    core[halo : halo + rows[1] - rows[0], halo : halo + cols[1] - cols[0]] = True
    paths, count = ndimage.label(skeleton & (degree == 2) & core, EIGHT)
    if count == 0:
        return []
    node_of = _node_keys(node, top, left, scene_width)

    def linear(r: int, c: int) -> int:
        return (r + top) * scene_width + (c + left)

    pieces = []
    for label, box in enumerate(ndimage.find_objects(paths), start=1):
        rr, cc = np.nonzero(paths[box] == label)
        members = set(zip((rr + box[0].start).tolist(), (cc + box[1].start).tolist(), strict=True))
        ordered = _walk(members)
        ends = []
        for tip in (ordered[0], ordered[-1]) if len(ordered) > 1 else (ordered[0],):
            for q in _neighbours(tip, skeleton):
                if q in members:
                    continue
                if node[q]:
                    ends.append(("node", *node_of[q]))
                else:
                    ends.append(("open", linear(*tip), linear(*q)))
        if not ends:
            ends = [("ring",), ("ring",)]
        if len(ends) != 2:
            continue  # not a simple path (cannot happen on a thinned skeleton); skip safely
        pr, pc = np.array(ordered).T
        values = None if probs is None else probs[pr, pc]
        known = 0 if values is None else int(np.count_nonzero(~np.isnan(values)))
        pieces.append(
            _Piece(
                pixels=np.stack([pr + top, pc + left], axis=1).astype(np.int64),
                ends=ends,
                prob_sum=0.0 if values is None else float(np.nansum(values, dtype=np.float64)),
                prob_count=known,
            )
        )
    return pieces


def _fill_small_holes(road: np.ndarray) -> np.ndarray:
    """Fill background specks smaller than HOLE_AREA enclosed by road (not at the window edge)."""
    holes, count = ndimage.label(~road)
    if count == 0:
        return road
    sizes = np.bincount(holes.ravel(), minlength=count + 1)
    edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    small = sizes < HOLE_AREA
    small[edge] = False
    small[0] = False
    return road | small[holes]


def _node_keys(node: np.ndarray, top: int, left: int, width: int) -> dict:
    """For each node pixel (window coordinates): its node's key and centroid in the scene.

    A node is an 8-connected cluster of node pixels; its key is its first pixel's linear
    scene index, the same from whichever block it is seen.
    """
    labels, count = ndimage.label(node, EIGHT)
    rr, cc = np.nonzero(labels)
    ids = labels[rr, cc]
    index = (rr + top).astype(np.int64) * width + (cc + left)
    first = np.full(count + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, ids, index)
    n = np.bincount(ids, minlength=count + 1).astype(np.float64)
    mean_r = np.bincount(ids, weights=rr + top, minlength=count + 1) / np.maximum(n, 1)
    mean_c = np.bincount(ids, weights=cc + left, minlength=count + 1) / np.maximum(n, 1)
    return {
        (r, c): (int(first[i]), float(mean_r[i]), float(mean_c[i]))
        for r, c, i in zip(rr.tolist(), cc.tolist(), ids.tolist(), strict=True)
    }


OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _neighbours(pixel: tuple[int, int], skeleton: np.ndarray) -> list[tuple[int, int]]:
    r, c = pixel
    h, w = skeleton.shape
    return [
        (r + dr, c + dc)
        for dr, dc in OFFSETS
        if 0 <= r + dr < h and 0 <= c + dc < w and skeleton[r + dr, c + dc]
    ]


def _walk(members: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """Order the pixels of a simple path (or ring) from one end to the other."""

    def inside(p: tuple[int, int]) -> list[tuple[int, int]]:
        return [(p[0] + dr, p[1] + dc) for dr, dc in OFFSETS if (p[0] + dr, p[1] + dc) in members]

    start = min((p for p in members if len(inside(p)) < 2), default=min(members))
    ordered, previous, current = [start], None, start
    while True:
        step = [q for q in inside(current) if q != previous and q != start]
        if not step or len(ordered) == len(members):
            return ordered
        previous, current = current, step[0]
        ordered.append(current)


# ---------------------------------------------------------------------------------------------
# Assembling the graph


def _assemble(pieces: list[_Piece]) -> list[_Edge]:
    """Join pieces across block borders into edges between nodes (or rings)."""
    by_open = {}
    for i, piece in enumerate(pieces):
        for side, end in enumerate(piece.ends):
            if end[0] == "open":
                by_open[(end[1], end[2])] = (i, side)

    def node_of(end: tuple) -> object:
        if end[0] == "node":
            return end[1]
        return ("tip", end[1])  # a path cut off where the other block saw no continuation

    def follow(i: int, entry: int, visited: set[int]) -> tuple[list[tuple[int, bool]], tuple]:
        chain = []
        while True:
            visited.add(i)
            forward = entry == 0
            chain.append((i, forward))
            exit_end = pieces[i].ends[1 - entry]
            if exit_end[0] != "open":
                return chain, exit_end
            match = by_open.get((exit_end[2], exit_end[1]))
            if match is None or match[0] in visited:
                return chain, exit_end
            i, entry = match

    edges, visited = [], set()
    for i, piece in enumerate(pieces):
        if i in visited:
            continue
        starts = [
            s for s, e in enumerate(piece.ends) if e[0] != "open" or (e[2], e[1]) not in by_open
        ]
        if piece.ends[0][0] == "ring":
            edges.append(_edge([(i, True)], pieces, piece.ends[0], piece.ends[1]))
            visited.add(i)
        elif starts:
            chain, last = follow(i, starts[0], visited)
            edges.append(_edge(chain, pieces, piece.ends[starts[0]], last, node_of))
    for i in range(len(pieces)):
        if i not in visited:  # a ring cut by block borders: every end matched
            chain, last = follow(i, 0, visited)
            edges.append(_edge(chain, pieces, ("ring",), ("ring",)))
    return edges


def _edge(chain, pieces, first: tuple, last: tuple, node_of=None) -> _Edge:
    parts = [pieces[i].pixels if forward else pieces[i].pixels[::-1] for i, forward in chain]
    coords = np.concatenate(parts).astype(np.float64)
    if first[0] == "ring":  # start at the ring's first pixel, whichever block it was cut by
        start = np.lexsort((coords[:, 1], coords[:, 0]))[0]
        coords = np.roll(coords, -start, axis=0)
        coords = np.vstack([coords, coords[:1]])
    if first[0] == "node":
        coords = np.vstack([[first[2], first[3]], coords])
    if last[0] == "node":
        coords = np.vstack([coords, [last[2], last[3]]])
    nodes = [None, None] if node_of is None else [node_of(first), node_of(last)]
    return _Edge(
        coords=coords,
        nodes=nodes,
        prob_sum=sum(pieces[i].prob_sum for i, _ in chain),
        prob_count=sum(pieces[i].prob_count for i, _ in chain),
        npixels=sum(len(pieces[i].pixels) for i, _ in chain),
    )


def _clean(edges: list[_Edge], min_length: float) -> list[_Edge]:
    """Drop short spurs and isolated bits, then merge edges through nodes of degree two."""
    degree: dict[object, int] = {}
    for edge in edges:
        for node in edge.nodes:
            if node is not None:
                degree[node] = degree.get(node, 0) + 1

    def keep(edge: _Edge) -> bool:
        if edge.metric.length >= min_length:
            return True
        a, b = edge.nodes
        if a is None or a == b:
            return False  # a short ring or a small loop at a junction
        return degree[a] > 1 and degree[b] > 1  # short links between junctions stay

    edges = [e for e in edges if keep(e)]
    return _merge_through(edges)


def _merge_through(edges: list[_Edge]) -> list[_Edge]:
    """Merge pairs of edges that meet at a node no other edge touches."""
    at: dict[object, list[_Edge]] = {}
    for edge in edges:
        for node in edge.nodes:
            if node is not None:
                at.setdefault(node, []).append(edge)
    alive = {id(e): e for e in edges}
    for node in sorted(at, key=str):
        touching = [e for e in at[node] if id(e) in alive]
        if len(touching) != 2 or touching[0] is touching[1]:
            continue
        a, b = touching
        a_coords = a.coords if a.nodes[1] == node else a.coords[::-1]
        b_coords = b.coords if b.nodes[0] == node else b.coords[::-1]
        a_far = a.nodes[0] if a.nodes[1] == node else a.nodes[1]
        b_far = b.nodes[1] if b.nodes[0] == node else b.nodes[0]
        merged = _Edge(
            coords=np.vstack([a_coords, b_coords[1:]]),
            nodes=[a_far, b_far],
            prob_sum=a.prob_sum + b.prob_sum,
            prob_count=a.prob_count + b.prob_count,
            npixels=a.npixels + b.npixels,
        )
        del alive[id(a)], alive[id(b)]
        alive[id(merged)] = merged
        for far in (a_far, b_far):
            if far is not None:
                at[far] = [merged if e is a or e is b else e for e in at[far]]
    return list(alive.values())


def _network(
    pieces: list[_Piece],
    transform: Affine,
    crs: CRS | None,
    pixel_size: tuple[float, float],
    simplify_m: float,
    min_length_m: float,
    width: int,
) -> RoadNetwork:
    """Assemble, clean, simplify and georeference the traced pieces."""
    py, px = pixel_size
    edges = _assemble(pieces)
    for edge in edges:
        edge.metric = _metric_line(edge.coords, py, px, simplify_m)
    edges = _clean(edges, min_length_m)
    rows = []
    for edge in edges:
        metric = edge.metric or _metric_line(edge.coords, py, px, simplify_m)  # merged: new
        xy = shapely.get_coordinates(metric) / [px, py] + 0.5  # (col, row) of pixel centres
        if _key(xy[-1]) < _key(xy[0]):
            xy = xy[::-1]
        x, y = rasterio.transform.xy(transform, xy[:, 1], xy[:, 0], offset="ul")
        mean = edge.prob_sum / edge.prob_count if edge.prob_count else np.nan
        ident = hashlib.blake2b(
            np.round(xy[[0, -1]], 3).tobytes() + str(edge.npixels).encode(), digest_size=8
        ).hexdigest()
        rows.append((shapely.LineString(np.stack([x, y], axis=1)), metric.length, mean, ident))
    rows.sort(key=lambda row: row[3])
    return RoadNetwork(
        lines=[r[0] for r in rows],
        length_m=np.array([r[1] for r in rows], np.float64),
        mean_probability=np.array([r[2] for r in rows], np.float32),
        road_id=[r[3] for r in rows],
        crs=crs,
    )


def _key(point: np.ndarray) -> tuple[float, float]:
    return (round(float(point[1]), 6), round(float(point[0]), 6))


def _metric_line(coords: np.ndarray, py: float, px: float, tolerance: float) -> shapely.LineString:
    """The (row, col) polyline in metres (x = col · px, y = row · py), simplified."""
    xy = np.stack([coords[:, 1] * px, coords[:, 0] * py], axis=1)
    if len(xy) == 1:
        xy = np.vstack([xy, xy])
    return shapely.simplify(shapely.LineString(xy), tolerance)

"""``geoprn evaluate``: pixel and road-network metrics of predictions against labels.

A prediction is a refine output folder (its ``<stem>.zarr``: ``base`` and ``refined``, scored
as two rows), a ``.zarr`` store, a mask GeoTIFF (0/1, 255 nodata) or a probability raster
(float in [0, 1], or uint8 0-255). Labels are a raster on the prediction's grid (0 background,
nonzero road, its nodata left out) or centreline vectors, burnt ``road_width`` metres wide onto
the prediction's grid (:mod:`geoprn.labels`). Nodata of either side counts in no metric.

Everything is read block by block, never the whole scene:

- pixel metrics (road IoU, mIoU, mBA; :mod:`geoprn.metrics`) on blocks of ``block_size``
  pixels, each read with a halo of ``d`` pixels so that boundary bands are those of the whole
  scene: the pooled counts are exact whatever the block size;
- network metrics on *chips* of about ``chip_m`` metres (SpaceNet's 400 m), each read with a
  halo wider than the buffer: predicted centrelines come from the thresholded prediction
  (:func:`geoprn.vectorize.roads_from_array`), reference ones from the label vectors (or from
  the label raster, vectorized the same way), both clipped to the chip's valid pixels.
  Completeness / correctness / quality pool their lengths over chips; APLS is the mean of the
  chips' APLS, as SpaceNet scores a city (:mod:`geoprn.network_metrics`).

Lines are measured in a planar frame in metres: ``(column * x pixel size, row * y pixel
size)``, pixel sizes from the grid's CRS (:func:`geoprn.raster.pixel_size_m`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
import shapely.affinity
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import shapes

from geoprn import metrics
from geoprn.errors import GeoprnWarning, InputError, OutputError
from geoprn.labels import DEFAULT_ROAD_WIDTH, VECTOR_SUFFIXES, burn_roads, read_roads
from geoprn.network_metrics import BUFFER_M, LengthCounts, apls, length_counts
from geoprn.raster import SceneInfo, check_threshold, open_scene, pixel_size_m, read_region
from geoprn.store import mask_cut_offs, run_inputs
from geoprn.tiling import Block, Range

log = logging.getLogger(__name__)

VARIABLES = ("base", "refined")
"""Probability variables of a refine store, in the order they are reported."""
BLOCK_SIZE = 512
"""Default side of the blocks pixel metrics (and the report's per-block figures) use."""
CHIP_M = 400.0
"""Default side of the chips network metrics use, in metres (SpaceNet 3's chips are 400 m)."""
CONTEXT_PX = 32
"""Pixels of context beyond the buffer read around a chip, so that centrelines near its
border come out as they would on the whole scene."""
METRICS = ("road_iou", "miou", "mba", "completeness", "correctness", "quality", "apls")
HEADERS = {
    "road_iou": "road IoU",
    "miou": "mIoU",
    "mba": "mBA",
    "completeness": "completeness",
    "correctness": "correctness",
    "quality": "quality",
    "apls": "APLS",
}


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


def _grid(info: SceneInfo) -> Grid:
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


def open_raster(path: Path):
    """rasterio.open without the warning of a raster that has no CRS."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


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
    return Prediction(path, path.stem, [kind], _grid(info), scale=scale)


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
    other = _grid(info)
    if not other.same_as(grid):
        raise InputError(
            f"labels {path} ({info.width}x{info.height} px) are not on the prediction's grid "
            f"({grid.width}x{grid.height} px, same CRS and transform needed)"
        )
    return Labels(path, grid, road_width)


def even_blocks(height: int, width: int, size: int) -> list[Block]:
    """Blocks of at most ``size`` pixels a side, all of nearly the same size."""

    def cuts(n: int) -> list[int]:
        return np.linspace(0, n, math.ceil(n / size) + 1).round().astype(int).tolist()

    ys, xs = cuts(height), cuts(width)
    return [
        Block(r, c, (y0, y1), (x0, x1))
        for r, (y0, y1) in enumerate(zip(ys, ys[1:], strict=False))
        for c, (x0, x1) in enumerate(zip(xs, xs[1:], strict=False))
    ]


def _grow(span: Range, by: int, limit: int) -> Range:
    return max(span[0] - by, 0), min(span[1] + by, limit)


@dataclass
class Row:
    """The pooled counts of one prediction variable, and its metrics."""

    prediction: str
    model: str
    path: str
    threshold: float = 0.5
    """The road cut-off the row's probabilities are scored at."""
    confusion: metrics.Confusion = field(default_factory=metrics.Confusion)
    boundary: metrics.BoundaryCounts = field(default_factory=metrics.BoundaryCounts)
    lengths: LengthCounts = field(default_factory=LengthCounts)
    chip_apls: list[float] = field(default_factory=list)

    @property
    def apls(self) -> float:
        """Mean APLS of the chips that hold a path (NaN when none does)."""
        scores = [s for s in self.chip_apls if not math.isnan(s)]
        return float(np.mean(scores)) if scores else math.nan

    def metrics(self) -> dict[str, float]:
        """Every metric as a fraction in [0, 1] (APLS NaN when undefined)."""
        return {
            **metrics.summary(self.confusion, self.boundary),
            "completeness": self.lengths.completeness,
            "correctness": self.lengths.correctness,
            "quality": self.lengths.quality,
            "apls": self.apls,
        }


@dataclass
class Evaluation:
    """The scores of one prediction: a row per variable, and per-block confusion counts."""

    prediction: Prediction
    labels: Labels
    rows: list[Row]
    blocks: list[Block]
    block_confusion: dict[str, list[metrics.Confusion]]

    def threshold(self, variable: str) -> float:
        """The cut-off ``variable`` was scored at."""
        return next(row.threshold for row in self.rows if row.model == variable)


@dataclass(frozen=True)
class Settings:
    """What the metrics depend on."""

    threshold: float | None = None
    """The road cut-off of every row; None: each row's recorded one (:meth:`Prediction.cut_off`)."""
    road_width: float = DEFAULT_ROAD_WIDTH
    buffer_m: float = BUFFER_M
    d: int = metrics.DEFAULT_D
    block_size: int = BLOCK_SIZE
    chip_m: float = CHIP_M

    def __post_init__(self) -> None:
        if self.threshold is not None:
            check_threshold(self.threshold)


def evaluate(
    prediction: Prediction,
    labels: Labels,
    settings: Settings = Settings(),
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Score every variable of a prediction against labels on its grid.

    Args:
        prediction, labels: from :func:`open_prediction` and :func:`open_labels`.
        settings: threshold, road width, buffer, boundary band d, block and chip sizes.
        progress: called with (parts done, parts in all) as blocks and chips finish.
    """
    grid = prediction.grid
    rows = [
        Row(prediction.name, v, str(prediction.path), prediction.cut_off(v, settings.threshold))
        for v in prediction.variables
    ]
    blocks = even_blocks(grid.height, grid.width, settings.block_size)
    py, px = grid.pixel_m
    chip_px = max(16, round(settings.chip_m / math.sqrt(py * px)))
    chips = even_blocks(grid.height, grid.width, chip_px)
    total, done = len(blocks) + len(chips), 0
    per_block: dict[str, list[metrics.Confusion]] = {v: [] for v in prediction.variables}
    for block in blocks:
        scores = _score_block(prediction, labels, block, settings, [r.threshold for r in rows])
        for row, (conf, bnd) in zip(rows, scores, strict=True):
            row.confusion, row.boundary = row.confusion + conf, row.boundary + bnd
            per_block[row.model].append(conf)
        done += 1
        if progress:
            progress(done, total)
    for chip in chips:
        for row in rows:
            lengths, score = _score_chip(prediction, labels, chip, row, settings)
            row.lengths = row.lengths + lengths
            row.chip_apls.append(score)
        done += 1
        if progress:
            progress(done, total)
    return Evaluation(prediction, labels, rows, blocks, per_block)


def _score_block(
    prediction: Prediction,
    labels: Labels,
    block: Block,
    settings: Settings,
    thresholds: list[float],
) -> list[tuple[metrics.Confusion, metrics.BoundaryCounts]]:
    """Confusion and boundary counts of each variable, cut at its threshold, over one block
    (read with a d halo)."""
    grid = prediction.grid
    rows = _grow(block.rows, settings.d + 1, grid.height)
    cols = _grow(block.cols, settings.d + 1, grid.width)
    truth, label_valid = labels.read(rows, cols)
    inner = (
        slice(block.rows[0] - rows[0], block.rows[1] - rows[0]),
        slice(block.cols[0] - cols[0], block.cols[1] - cols[0]),
    )
    core = np.zeros(truth.shape, bool)
    core[inner] = True
    out = []
    for variable, threshold in zip(prediction.variables, thresholds, strict=True):
        probs = prediction.read(variable, rows, cols)
        valid = label_valid & ~np.isnan(probs)
        pred = np.nan_to_num(probs, nan=0.0) > threshold
        conf = metrics.confusion(pred[inner], truth[inner], valid[inner])
        out.append((conf, metrics.boundary_counts(pred, truth, valid & core, settings.d)))
    return out


def predicted_lines(
    prediction: Prediction, variable: str, rows: Range, cols: Range, threshold: float
) -> tuple[list[shapely.Geometry], np.ndarray]:
    """Centrelines (metres frame) of the thresholded prediction over a region, and its
    valid pixels."""
    from geoprn.vectorize import roads_from_array

    probs = prediction.read(variable, rows, cols)
    valid = ~np.isnan(probs)
    grid = prediction.grid
    roads = roads_from_array(
        np.nan_to_num(probs, nan=0.0) > threshold,
        transform=grid.frame(rows[0], cols[0]),
        pixel_size_m=grid.pixel_m,
    )
    return list(roads.lines), valid


def reference_lines(
    labels: Labels, rows: Range, cols: Range
) -> tuple[list[shapely.Geometry], np.ndarray]:
    """Reference centrelines (metres frame) over a region, and its valid label pixels."""
    grid = labels.grid
    frame = grid.frame(rows[0], cols[0])
    h, w = rows[1] - rows[0], cols[1] - cols[0]
    if labels.lines_m is not None:
        box = _box(frame, (0, h), (0, w))
        near = labels.tree.query(box) if labels.tree is not None else []
        clipped = [shapely.intersection(labels.lines_m[i], box) for i in sorted(near)]
        return [g for g in clipped if not g.is_empty and g.length > 0], np.ones((h, w), bool)
    from geoprn.vectorize import roads_from_array

    truth, valid = labels.read(rows, cols)
    roads = roads_from_array(truth, transform=frame, pixel_size_m=grid.pixel_m)
    return list(roads.lines), valid


def _box(frame: Affine, rows: Range, cols: Range) -> shapely.Polygon:
    """Pixel rows x cols of a region whose frame is ``frame``, as a box in metres."""
    x0, y0 = frame.c + frame.a * cols[0], frame.f + frame.e * rows[0]
    return shapely.box(x0, y0, frame.c + frame.a * cols[1], frame.f + frame.e * rows[1])


def _valid_region(valid: np.ndarray, frame: Affine) -> shapely.Geometry:
    """The valid pixels of a region as a polygon in the metres frame."""
    polygons = [
        shapely.geometry.shape(geom)
        for geom, _ in shapes(valid.astype(np.uint8), mask=valid, transform=frame)
    ]
    return shapely.union_all(polygons) if polygons else shapely.Polygon()


def _score_chip(
    prediction: Prediction, labels: Labels, chip: Block, row: Row, settings: Settings
) -> tuple[LengthCounts, float]:
    """Centreline lengths and APLS of one row's variable over one chip."""
    grid = prediction.grid
    py, px = grid.pixel_m
    halo = math.ceil(settings.buffer_m / min(py, px)) + CONTEXT_PX
    rows, cols = _grow(chip.rows, halo, grid.height), _grow(chip.cols, halo, grid.width)
    pred, pred_valid = predicted_lines(prediction, row.model, rows, cols, row.threshold)
    ref, ref_valid = reference_lines(labels, rows, cols)
    frame = grid.frame(rows[0], cols[0])
    y0, x0 = chip.rows[0] - rows[0], chip.cols[0] - cols[0]
    y1, x1 = chip.rows[1] - rows[0], chip.cols[1] - cols[0]
    region = _box(frame, (y0, y1), (x0, x1))
    valid = (pred_valid & ref_valid)[y0:y1, x0:x1]
    if not valid.all():
        region = shapely.intersection(
            region, _valid_region(valid, frame @ Affine.translation(x0, y0))
        )
    lengths = length_counts(ref, pred, settings.buffer_m, region)
    inside = [
        [g for g in (shapely.intersection(line, region) for line in lines) if g.length > 0]
        for lines in (ref, pred)
    ]
    return lengths, apls(*inside).score


def results_table(evaluations: Sequence[Evaluation]) -> list[dict[str, Any]]:
    """One record per row: prediction, model, path, cut-off and every metric (fractions)."""
    return [
        {
            "prediction": row.prediction,
            "model": row.model,
            "path": row.path,
            "threshold": row.threshold,
            **row.metrics(),
        }  # fmt: skip
        for ev in evaluations
        for row in ev.rows
    ]


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The metrics as an aligned plain-text table, in percent."""
    header = ["prediction", "model", "cut-off", *(f"{HEADERS[m]} %" for m in METRICS)]
    lines = [
        [r["prediction"], r["model"], f"{r['threshold']:.2f}", *(percent(r[m]) for m in METRICS)]
        for r in records
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines, strict=True)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i < 2 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


def percent(value: float) -> str:
    """A fraction as a percentage with two decimals; n/a when undefined (NaN)."""
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def check_outputs(paths: Sequence[Path | None], overwrite: bool) -> None:
    """Refuse to replace existing output files unless ``overwrite``.

    Raises:
        OutputError: a file exists, or its folder does not.
    """
    for path in paths:
        if path is None:
            continue
        if path.exists() and not overwrite:
            raise OutputError(f"{path} exists; use --overwrite to replace it")
        if not path.parent.is_dir():
            raise OutputError(f"cannot write {path}: folder {path.parent} does not exist")


def write_csv(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """The records as CSV, metrics as fractions (empty when undefined)."""
    columns = ["prediction", "model", "threshold", *METRICS, "path"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for record in records:
            writer.writerow(
                {
                    k: "" if isinstance(record[k], float) and math.isnan(record[k]) else record[k]
                    for k in columns
                }
            )
    return path


def write_json(
    records: Sequence[dict[str, Any]], settings: Settings, labels: str, path: Path
) -> Path:
    """The records and the settings as JSON, metrics as fractions (null when undefined)."""
    clean = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
        for r in records
    ]
    document = {"labels": labels, "settings": settings.__dict__, "results": clean}
    path.write_text(json.dumps(document, indent=1))
    return path


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
    if not _grid(info).same_as(grid):
        raise InputError(
            f"image {path} ({info.width}x{info.height} px) is not on the prediction's grid "
            f"({grid.width}x{grid.height} px)"
        )
    return Path(path)

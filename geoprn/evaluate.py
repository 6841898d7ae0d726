"""``geoprn evaluate``: pixel and road-network metrics of predictions against labels.

A prediction is a refine output folder (its ``<stem>.zarr``: ``base`` and ``refined``, scored
as two rows), a ``.zarr`` store, a mask GeoTIFF (0/1, 255 nodata) or a probability raster
(float in [0, 1], or uint8 0-255). Labels are a raster on the prediction's grid (0 background,
nonzero road, its nodata left out) or centreline vectors, burnt ``road_width`` metres wide onto
the prediction's grid (:mod:`geoprn.labels`); both are opened by :mod:`geoprn.evaluate_inputs`.
Nodata of either side counts in no metric.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import shapely.affinity
from affine import Affine
from rasterio.features import shapes

from geoprn import metrics
from geoprn.errors import OutputError
from geoprn.evaluate_inputs import Labels, Prediction
from geoprn.labels import DEFAULT_ROAD_WIDTH
from geoprn.network_metrics import BUFFER_M, LengthCounts, apls, length_counts
from geoprn.raster import check_threshold
from geoprn.tiling import Block, Range

log = logging.getLogger(__name__)

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

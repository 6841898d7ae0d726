"""The HTML report of ``geoprn evaluate``: one self-contained file a person can look at.

It holds the metrics table (base and refined side by side), per-block road IoU (a map and a
table), and before/after panels of the worst and best blocks: the image, each model's road
probability, each model's errors (false positives and false negatives in two colours), and
the reference and predicted centrelines over the image. Images are PNGs embedded as base64
data URIs, so the file can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from geoprn.evaluate import (
    HEADERS,
    METRICS,
    Evaluation,
    Settings,
    percent,
    predicted_lines,
    reference_lines,
    results_table,
)
from geoprn.metrics import Confusion
from geoprn.quicklook import NODATA, ROAD, _stretch
from geoprn.raster import open_raster
from geoprn.tiling import Block

PANEL_SIDE = 400
"""Panels are shown at most this many pixels a side (blocks are reduced by a whole factor)."""
MAP_SIDE = 480
"""The per-block maps' longest side, in pixels."""
TABLE_ROWS = 200
"""The per-block table lists at most this many blocks (the worst first beyond that)."""
FALSE_POSITIVE = np.array([255.0, 70.0, 40.0])
FALSE_NEGATIVE = np.array([40.0, 150.0, 255.0])
TRUE_POSITIVE = np.array([235.0, 235.0, 235.0])
REFERENCE_LINE = (40, 230, 90)
PREDICTED_LINE = (255, 0, 220)

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px}h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f1f1f1}td.l,th.l{text-align:left}
.better{color:#11772b;font-weight:600}.worse{color:#b3261e;font-weight:600}
.panels{display:grid;grid-template-columns:repeat(3,minmax(0,420px));gap:10px}
figure{margin:0}figure img{width:100%;image-rendering:pixelated;border:1px solid #bbb}
figcaption{font-size:12px;color:#444}.note{font-size:13px;color:#444;max-width:1000px}
.key{display:inline-block;width:12px;height:12px;vertical-align:middle;margin:0 4px 0 10px}
.scroll{max-height:420px;overflow:auto;display:inline-block}
"""


def png_uri(rgb: np.ndarray) -> str:
    """(H, W, 3) uint8 -> ``data:image/png;base64,...``."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(uri: str, caption: str) -> str:
    return (
        f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _metrics_table(evaluations: Sequence[Evaluation]) -> str:
    """Every row's metrics in percent; a refined row's figures coloured by the change from
    base."""
    head = "".join(f"<th>{HEADERS[m]} %</th>" for m in METRICS)
    out = [f'<table><tr><th class="l">prediction</th><th class="l">model</th>{head}</tr>']
    for ev in evaluations:
        base = None
        for record in results_table([ev]):
            cells = []
            for m in METRICS:
                value, css = record[m], ""
                if base is not None and not (math.isnan(value) or math.isnan(base[m])):
                    css = "better" if value > base[m] else "worse" if value < base[m] else ""
                cells.append(f'<td class="{css}">{percent(value)}</td>')
            out.append(
                f'<tr><td class="l">{html.escape(record["prediction"])}</td>'
                f'<td class="l">{html.escape(record["model"])}</td>{"".join(cells)}</tr>'
            )
            base = base or (record if record["model"] == "base" else None)
    out.append("</table>")
    return "".join(out)


def _candidates(ev: Evaluation) -> list[int]:
    """Blocks with reference road, ordered by the last model's road IoU (worst first)."""
    last = ev.block_confusion[ev.rows[-1].model]
    with_road = [i for i, c in enumerate(last) if c.tp + c.fn > 0]
    return sorted(with_road, key=lambda i: (last[i].road_iou, i))


def pick_blocks(ev: Evaluation, count: int) -> tuple[list[int], list[int]]:
    """Indices of the ``count`` worst and ``count`` best blocks (no block in both)."""
    order = _candidates(ev)
    worst = order[:count]
    best = [i for i in reversed(order) if i not in worst][:count]
    return worst, best


def _block_map(ev: Evaluation, values: Sequence[float], colour) -> np.ndarray:
    """A small picture of the scene with each block filled by ``colour(value)``."""
    grid = ev.prediction.grid
    step = max(1, math.ceil(max(grid.shape) / MAP_SIDE))
    canvas = np.full((math.ceil(grid.height / step), math.ceil(grid.width / step), 3), 200.0)
    for block, value in zip(ev.blocks, values, strict=True):
        ys = slice(block.rows[0] // step, math.ceil(block.rows[1] / step))
        xs = slice(block.cols[0] // step, math.ceil(block.cols[1] / step))
        canvas[ys, xs] = colour(value)
        canvas[ys.start, xs] = canvas[ys, xs.start] = 255.0  # block borders
    return canvas.astype(np.uint8)


def _iou_colour(value: float) -> np.ndarray:
    if math.isnan(value):
        return np.array([200.0, 200.0, 200.0])
    return np.array([255.0 * (1 - value), 60 + 160.0 * value, 60.0])


def _gain_colour(value: float) -> np.ndarray:
    if math.isnan(value):
        return np.array([200.0, 200.0, 200.0])
    t = float(np.clip(value / 0.1, -1, 1))
    white = np.array([245.0, 245.0, 245.0])
    end = np.array([30.0, 150.0, 60.0]) if t > 0 else np.array([200.0, 40.0, 30.0])
    return white + (end - white) * abs(t)


def _iou(conf: Confusion) -> float:
    return conf.road_iou if conf.tp + conf.fn + conf.fp > 0 else math.nan


def _per_block(ev: Evaluation) -> str:
    """The per-block maps and table of one prediction."""
    models = [r.model for r in ev.rows]
    ious = {m: [_iou(c) for c in ev.block_confusion[m]] for m in models}
    last = models[-1]
    figures = [
        _img(
            png_uri(_block_map(ev, ious[last], _iou_colour)),
            f"{last} road IoU per block (red 0 to green 1; grey: no road in labels or prediction)",
        )
    ]
    if len(models) > 1:
        gain = [b - a for a, b in zip(ious[models[0]], ious[last], strict=True)]
        figures.append(
            _img(
                png_uri(_block_map(ev, gain, _gain_colour)),
                f"road IoU change, "
                f"{last} minus {models[0]} (green better, red worse; ±10 points full)",
            )
        )
    order = list(range(len(ev.blocks)))
    if len(order) > TABLE_ROWS:
        order = sorted(_candidates(ev)[:TABLE_ROWS])
    head = "".join(f"<th>{m} IoU %</th>" for m in models)
    if len(models) > 1:
        head += f"<th>{last} − {models[0]}</th>"
    rows = []
    for i in order:
        block = ev.blocks[i]
        conf = ev.block_confusion[last][i]
        cells = "".join(f"<td>{percent(ious[m][i])}</td>" for m in models)
        if len(models) > 1:
            diff = ious[last][i] - ious[models[0]][i]
            css = "" if math.isnan(diff) or diff == 0 else "better" if diff > 0 else "worse"
            sign = "n/a" if math.isnan(diff) else f"{100 * diff:+.2f}"
            cells += f'<td class="{css}">{sign}</td>'
        rows.append(
            f'<tr><td class="l">{block.key}</td><td class="l">rows {block.rows[0]}–'
            f"{block.rows[1]}, cols {block.cols[0]}–{block.cols[1]}</td>"
            f"<td>{conf.tp + conf.fn}</td>{cells}</tr>"
        )
    note = (
        f"<p class='note'>{len(order)} of {len(ev.blocks)} blocks listed (the worst).</p>"
        if len(order) < len(ev.blocks)
        else ""
    )
    table = (
        '<div class="scroll"><table><tr><th class="l">block</th><th class="l">pixels</th>'
        f"<th>road px in labels</th>{head}</tr>{''.join(rows)}</table></div>"
    )
    return f'<div class="panels">{"".join(figures)}</div>{note}<h3>Per block</h3>{table}'


def _image(ev: Evaluation, block: Block, step: int) -> np.ndarray:
    """(h, w, 3) float RGB of the scene over a block, reduced by ``step``; grey without one."""
    shape = (
        math.ceil((block.rows[1] - block.rows[0]) / step),
        math.ceil((block.cols[1] - block.cols[0]) / step),
    )
    if ev.prediction.image is None:
        return np.full((*shape, 3), 90.0)
    window = (block.rows, block.cols)
    with open_raster(ev.prediction.image) as ds:
        bands = [b for b in ev.prediction.bands if b <= ds.count] or [1]
        image = ds.read(bands, window=window)[:, ::step, ::step]
        valid = (ds.dataset_mask(window=window) > 0)[::step, ::step]
    return _stretch(image, valid)


def _errors(rgb: np.ndarray, pred: np.ndarray, truth: np.ndarray, valid: np.ndarray):
    """The image dimmed, with true positives, false positives and false negatives painted."""
    out = rgb * 0.35
    out[pred & truth] = TRUE_POSITIVE
    out[pred & ~truth] = FALSE_POSITIVE
    out[~pred & truth] = FALSE_NEGATIVE
    out[~valid] = NODATA
    return out


def _draw_lines(rgb: np.ndarray, lines, ev: Evaluation, block: Block, step: int, colour, width):
    """Draw centrelines (metres frame) onto a panel of ``block`` reduced by ``step``."""
    py, px = ev.prediction.grid.pixel_m
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    for line in lines:
        for part in getattr(line, "geoms", [line]):
            if part.geom_type != "LineString":
                continue
            xy = np.asarray(part.coords)
            cols = (xy[:, 0] / px - block.cols[0]) / step
            rows = (xy[:, 1] / py - block.rows[0]) / step
            draw.line(list(zip(cols.tolist(), rows.tolist(), strict=True)), colour, width)
    return np.asarray(image)


def block_panels(ev: Evaluation, index: int) -> list[tuple[str, np.ndarray]]:
    """The (caption, RGB uint8) panels of one block: the image, each model's probability,
    the centrelines, each model's errors (so that, three a row, errors sit under
    probabilities)."""
    block = ev.blocks[index]
    step = max(
        1, math.ceil(max(block.rows[1] - block.rows[0], block.cols[1] - block.cols[0]) / PANEL_SIDE)
    )
    rgb = _image(ev, block, step)
    truth, valid = ev.labels.read(block.rows, block.cols)
    truth, label_valid = truth[::step, ::step], valid[::step, ::step]
    panels = [("image", rgb)]
    errors: list[tuple[str, np.ndarray]] = []
    for row in ev.rows:
        conf = ev.block_confusion[row.model][index]
        probs = ev.prediction.read(row.model, block.rows, block.cols)[::step, ::step]
        alpha = np.clip(np.nan_to_num(probs, nan=0.0), 0, 1)[..., None] * 0.85
        shown = np.where(np.isnan(probs)[..., None], NODATA, rgb * (1 - alpha) + ROAD * alpha)
        panels.append((f"{row.model} probability", shown))
        pred = np.nan_to_num(probs, nan=0.0) > row.threshold
        valid = label_valid & ~np.isnan(probs)
        errors.append(
            (f"{row.model} errors (IoU {percent(_iou(conf))} %)", _errors(rgb, pred, truth, valid))
        )
    last = ev.rows[-1].model
    reference, _ = reference_lines(ev.labels, block.rows, block.cols)
    cut = ev.threshold(last)
    predicted, _ = predicted_lines(ev.prediction, last, block.rows, block.cols, cut)
    lines = _draw_lines(
        np.round(rgb).astype(np.uint8), reference, ev, block, step, REFERENCE_LINE, 3
    )
    lines = _draw_lines(lines, predicted, ev, block, step, PREDICTED_LINE, 2)
    panels.append((f"centrelines: reference (green), {last} (magenta)", lines))
    return [(caption, np.round(p).astype(np.uint8)) for caption, p in panels + errors]


def _panels_section(ev: Evaluation, count: int) -> str:
    worst, best = pick_blocks(ev, count)
    if not worst:
        return "<p class='note'>No block holds a labelled road: no panels.</p>"
    legend = (
        "<p class='note'>Errors: <span class='key' style='background:rgb(255,70,40)'></span>"
        "false positive <span class='key' style='background:rgb(40,150,255)'></span>false "
        "negative <span class='key' style='background:rgb(235,235,235)'></span>true positive"
        "<span class='key' style='background:rgb(160,160,160)'></span>nodata. Blocks ranked "
        f"by {ev.rows[-1].model} road IoU among blocks with labelled road.</p>"
    )
    out = [legend]
    for title, indices in (("Worst blocks", worst), ("Best blocks", best)):
        for i in indices:
            block = ev.blocks[i]
            out.append(
                f"<h3>{title}: block {block.key} (rows {block.rows[0]}–{block.rows[1]}, "
                f"cols {block.cols[0]}–{block.cols[1]})</h3>"
            )
            figures = "".join(_img(png_uri(p), caption) for caption, p in block_panels(ev, i))
            out.append(f'<div class="panels">{figures}</div>')
    return "".join(out)


def _cut_offs(evaluations: Sequence[Evaluation]) -> str:
    """The cut-offs the rows were scored at, in a few words."""
    cuts = sorted({row.threshold for ev in evaluations for row in ev.rows})
    if len(cuts) == 1:
        return f"Road cut-off {cuts[0]:g}"
    each = ", ".join(f"{row.model} {row.threshold:g}" for ev in evaluations for row in ev.rows)
    return f"Road cut-offs (as refine recorded them): {each}"


def render(evaluations: Sequence[Evaluation], settings: Settings, panels: int = 2) -> str:
    """The report as an HTML string."""
    labels = evaluations[0].labels.path if evaluations else ""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>geoprn evaluate</title>"
        f"<style>{CSS}</style></head><body>",
        "<h1>geoprn evaluate</h1>",
        f"<p class='note'>Labels: {html.escape(str(labels))}. {_cut_offs(evaluations)}; "
        f"vector labels burnt {settings.road_width:g} m wide; nodata left out of every metric."
        "</p>",
        "<h2>Metrics</h2>",
        _metrics_table(evaluations),
        "<p class='note'><b>road IoU</b>: TP/(TP+FP+FN) of road pixels pooled over the scene; "
        "<b>mIoU</b>: mean of road and background IoU; <b>mBA</b>: mean Boundary IoU of both "
        f"classes, band d = {settings.d} px; <b>completeness</b> / <b>correctness</b> / "
        f"<b>quality</b>: centreline length matched within {settings.buffer_m:g} m "
        "(Wiedemann 1998); <b>APLS</b>: SpaceNet's average path length similarity, mean over "
        f"chips of about {settings.chip_m:g} m. Refined figures in green are better than the "
        "base model's, in red worse.</p>",
    ]
    for ev in evaluations:
        parts.append(f"<h2>{html.escape(ev.prediction.name)}: per block</h2>")
        parts.append(_per_block(ev))
        parts.append(f"<h2>{html.escape(ev.prediction.name)}: worst and best blocks</h2>")
        parts.append(_panels_section(ev, panels))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    evaluations: Sequence[Evaluation], path: Path, settings: Settings, panels: int = 2
) -> Path:
    """Write the report; the file appears only when complete."""
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(render(evaluations, settings, panels), encoding="utf-8")
    tmp.replace(path)
    return path

"""A PNG a person can glance at: the scene beside its base and refined road probabilities.

Each panel is the scene at a reduced size (at most ``max_side`` pixels a side, read through
the raster's overviews and strided Zarr reads, never the whole scene at full size), with road
probability painted over it in red; nodata is grey. Panels, left to right: the image, then one
per probability variable (``base``, ``refined``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from geoprn.raster import SceneInfo, open_raster

GAP = 8
ROAD = np.array([255.0, 32.0, 32.0])
NODATA = np.array([160.0, 160.0, 160.0])


def _stretch(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(C, H, W) raw bands to (H, W, 3) floats in [0, 255], 2-98 percentile per band."""
    out = np.zeros(image.shape, np.float64)
    for i, band in enumerate(image.astype(np.float64)):
        values = band[valid]
        low, high = np.percentile(values, (2, 98)) if values.size else (0.0, 1.0)
        out[i] = np.clip((band - low) / max(high - low, 1e-9), 0, 1) * 255
    rgb = out if len(out) >= 3 else np.repeat(out[:1], 3, axis=0)
    return np.moveaxis(rgb[:3], 0, -1)


def _sampled(
    ds: rasterio.DatasetReader, bands: list[int], step: int, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The scene's ``bands`` and validity at ``shape``: averaged from its overviews where it
    has some, else every ``step``-th pixel (as the probability panels sample theirs) of strips
    read at full resolution, whose blocks GDAL decodes in parallel (a decimated read of a
    scene without overviews resamples it whole on one core)."""
    if ds.overviews(bands[0]):
        image = ds.read(bands, out_shape=(len(bands), *shape), resampling=Resampling.average)
        return image, ds.dataset_mask(out_shape=shape, resampling=Resampling.nearest) > 0
    rows = step * max(1, 512 // step)  # a multiple of step: the sampled rows stay on the grid
    strips = [
        Window(0, y0, ds.width, min(rows, ds.height - y0)) for y0 in range(0, ds.height, rows)
    ]
    image = [ds.read(bands, window=w)[:, ::step, ::step] for w in strips]
    valid = [ds.dataset_mask(window=w)[::step, ::step] > 0 for w in strips]
    return np.concatenate(image, axis=1), np.concatenate(valid)


def write_quicklook(
    scene: SceneInfo,
    bands: list[int],
    probabilities: Mapping[str, object],
    path: Path,
    max_side: int = 1024,
) -> Path:
    """Write the side-by-side PNG.

    Args:
        scene: the scene the probabilities belong to.
        bands: scene bands to show (the first three; one band is shown in grey).
        probabilities: name -> (H, W) array-like with NaN at nodata (Zarr arrays), in order.
        path: the PNG to write.
        max_side: the longest side of each panel.
    """
    step = max(1, math.ceil(max(scene.height, scene.width) / max_side))
    shape = (math.ceil(scene.height / step), math.ceil(scene.width / step))
    with open_raster(scene.path) as ds:
        shown = bands[:3] or list(range(1, min(ds.count, 3) + 1))
        image, valid = _sampled(ds, shown, step, shape)
    rgb = _stretch(image, valid)
    panels = [np.where(valid[..., None], rgb, NODATA)]
    for values in probabilities.values():
        prob = np.asarray(values[::step, ::step], dtype=np.float64)[: shape[0], : shape[1]]
        alpha = np.clip(np.nan_to_num(prob, nan=0.0), 0, 1)[..., None] * 0.85
        panel = rgb * (1 - alpha) + ROAD * alpha
        panels.append(np.where(np.isnan(prob)[..., None], NODATA, panel))
    gap = np.full((shape[0], GAP, 3), 255.0)
    canvas = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    data = np.moveaxis(np.round(canvas).astype(np.uint8), -1, 0)
    profile = {"driver": "PNG", "width": data.shape[2], "height": data.shape[1], "count": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", dtype="uint8", **profile) as dst:
            dst.write(data)
    path.with_name(path.name + ".aux.xml").unlink(missing_ok=True)
    return path

"""A PNG a person can glance at: the scene beside its base and refined road probabilities.

Each panel is the scene at a reduced size (at most ``MAX_SIDE`` pixels a side): every
``step``-th pixel, counted from the scene's origin. Block tasks take their share of those
pixels while they hold the block (:func:`sample_block`, saved by :func:`save_piece`), so
the PNG is assembled from small pieces at the end instead of reading the whole scene and
store again. Road probability is painted over the image in red; nodata is grey. Panels, left
to right: the image, then one per probability variable (``base``, ``refined``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from geoprn.files import replacing
from geoprn.tiling import Range

GAP = 8
MAX_SIDE = 1024
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


def sampling_step(height: int, width: int, max_side: int = MAX_SIDE) -> int:
    """The stride between sampled pixels that keeps a panel within ``max_side``."""
    return max(1, math.ceil(max(height, width) / max_side))


def shown_bands(bands: list[int], count: int) -> list[int]:
    """The scene bands the image panel shows: the model's first three, else the first three."""
    return bands[:3] or list(range(1, min(count, 3) + 1))


def sample_block(
    image: np.ndarray,
    rows: Range,
    cols: Range,
    valid: np.ndarray,
    probabilities: Mapping[str, np.ndarray],
    step: int,
) -> dict[str, np.ndarray]:
    """A block's piece of the quicklook: its sampled pixels of the image, validity and each
    probability variable, and where they go (``origin``, in sampled pixels).

    Args:
        image: (C, H, W) the bands to show over the block (see :func:`shown_bands`).
        rows, cols: the block's pixel ranges in the scene.
        valid: (H, W) bool over the block, False at nodata.
        probabilities: name -> (H, W) probabilities over the block, NaN at nodata.
        step: :func:`sampling_step` of the scene.
    """
    first = [-(-start // step) * step for start in (rows[0], cols[0])]
    inside = np.s_[first[0] - rows[0] :: step, first[1] - cols[0] :: step]
    piece = {name: values[inside] for name, values in probabilities.items()}
    origin = np.array([first[0] // step, first[1] // step])
    image = image[(slice(None), *inside)]
    return {**piece, "image": image, "valid": valid[inside], "origin": origin}


def save_piece(path: Path, piece: Mapping[str, np.ndarray]) -> None:
    """Write a block's piece as ``path`` (``.npz``), complete or not at all.

    Raises:
        WriteError: the file system refused the write (disk full...).
    """
    with replacing(path, ".tmp") as tmp, open(tmp, "wb") as file:
        np.savez(file, **piece)


def write_quicklook(
    height: int,
    width: int,
    pieces: Path,
    names: list[str],
    path: Path,
    max_side: int = MAX_SIDE,
) -> Path:
    """Assemble the side-by-side PNG from the blocks' pieces.

    Args:
        height, width: the scene's size in pixels.
        pieces: the folder :func:`save_piece` wrote to; pixels of blocks without a piece
            (blocks with no valid pixel) are grey.
        names: the probability variables, one panel each, in order.
        path: the PNG to write.
        max_side: the longest side of each panel, as the pieces were sampled.
    """
    step = sampling_step(height, width, max_side)
    shape = (math.ceil(height / step), math.ceil(width / step))
    image = None
    valid = np.zeros(shape, bool)
    probs = {name: np.full(shape, np.nan) for name in names}
    for file in sorted(pieces.glob("*.npz")):
        with np.load(file) as piece:
            y, x = piece["origin"]
            h, w = piece["valid"].shape
            if image is None:  # the shown bands: 1 to 3
                image = np.zeros((len(piece["image"]), *shape))
            image[:, y : y + h, x : x + w] = piece["image"]
            valid[y : y + h, x : x + w] = piece["valid"]
            for name in names:
                probs[name][y : y + h, x : x + w] = piece[name]
    rgb = _stretch(np.zeros((1, *shape)) if image is None else image, valid)
    panels = [np.where(valid[..., None], rgb, NODATA)]
    for prob in probs.values():
        alpha = np.clip(np.nan_to_num(prob, nan=0.0), 0, 1)[..., None] * 0.85
        panel = rgb * (1 - alpha) + ROAD * alpha
        panel[np.isnan(prob)] = NODATA
        panels.append(panel)
    data = np.full((3, shape[0], len(panels) * (shape[1] + GAP) - GAP), 255, np.uint8)
    for i, panel in enumerate(panels):  # rounded to the nearest, channels first
        x = i * (shape[1] + GAP)
        data[:, :, x : x + shape[1]] = np.moveaxis(np.rint(panel, out=panel), -1, 0)
    profile = {"driver": "PNG", "width": data.shape[2], "height": data.shape[1], "count": 3}
    with replacing(path, ".part.png") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(tmp, "w", dtype="uint8", **profile) as dst:
                dst.write(data)
        finally:
            tmp.with_name(tmp.name + ".aux.xml").unlink(missing_ok=True)
    path.with_name(path.name + ".aux.xml").unlink(missing_ok=True)
    return path

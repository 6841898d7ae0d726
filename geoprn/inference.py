"""Windowed model inference over arrays: grid windows, batched forward passes, blending.

The same code serves ``refine`` (a block plus its halo, read from the scene) and training
(whole labelled tiles held in memory), so a tile's base probabilities are the ones ``refine``
would compute for it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from geoprn.errors import InputError
from geoprn.raster import reflect_index
from geoprn.tiling import (
    Range,
    blend_weights,
    cover,
    touching,
    weight_sums,
    window_origins,
)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device '{device}' (use auto, cpu or cuda[:N])") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' asked for, but this machine has no CUDA GPU")
    return resolved


def fast_math(device: torch.device):
    """bf16 autocast on a CUDA GPU (2.8x PRN's fp32 speed on an H100 with channels-last
    tensors, ``benchmarks/model_speed.py``); full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def predict_region(
    model: torch.nn.Module,
    source: np.ndarray,
    source_region: tuple[Range, Range],
    out_region: tuple[Range, Range],
    origins: tuple[np.ndarray, np.ndarray],
    tile: int,
    overlap: int,
    batch_size: int,
    device: torch.device,
) -> tuple[np.ndarray, int]:
    """Run ``model`` on every grid window touching ``out_region`` and blend them.

    Args:
        model: maps (N, C, tile, tile) float32 to (N, 1, tile, tile) probabilities.
        source: (C, H, W) input covering ``source_region`` (which covers every window used).
        source_region, out_region: (rows, cols) ranges in scene coordinates.
        origins: the scene-wide window grid (row origins, column origins).

    Returns:
        The blended (H_out, W_out) float32 probabilities and the number of windows run.
    """
    (sy0, _), (sx0, _) = source_region
    (oy0, oy1), (ox0, ox1) = out_region
    rows, cols = (touching(o, span, tile) for o, span in zip(origins, out_region, strict=True))
    windows = [(int(y), int(x)) for y in rows for x in cols]
    weights = blend_weights(tile, overlap)
    total = np.zeros((oy1 - oy0, ox1 - ox0), np.float32)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        tiles = np.stack(
            [source[:, y - sy0 : y - sy0 + tile, x - sx0 : x - sx0 + tile] for y, x in batch]
        )
        with torch.inference_mode(), fast_math(device):
            x = torch.from_numpy(tiles.astype(np.float32)).to(device, non_blocking=True)
            probs = model(x.contiguous(memory_format=torch.channels_last))
        probs = probs[:, 0].float().cpu().numpy()
        for (y, x), prob in zip(batch, probs, strict=True):
            ya, yb, xa, xb = max(y, oy0), min(y + tile, oy1), max(x, ox0), min(x + tile, ox1)
            inside = np.s_[ya - y : yb - y, xa - x : xb - x]
            out = np.s_[ya - oy0 : yb - oy0, xa - ox0 : xb - ox0]
            total[out] += prob[inside] * weights[inside]
    total /= weight_sums(rows, out_region[0], tile, overlap)[:, None]
    total /= weight_sums(cols, out_region[1], tile, overlap)[None, :]
    return total, len(windows)


def predict_array(
    model: torch.nn.Module,
    image: np.ndarray,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Blended ``model`` probabilities over a whole (C, H, W) array, reflect-padded at its edges.

    The result is what ``refine`` gives for a scene holding exactly this array.
    """
    h, w = image.shape[-2:]
    origins = (window_origins(h, tile, overlap), window_origins(w, tile, overlap))
    rows, cols = cover(origins[0], (0, h), tile), cover(origins[1], (0, w), tile)
    grid = np.ix_(reflect_index(np.arange(*rows), h), reflect_index(np.arange(*cols), w))
    source = image[(slice(None), *grid)]
    probs, _ = predict_region(
        model,
        source,
        (rows, cols),
        ((0, h), (0, w)),
        origins,
        tile,
        overlap,
        batch_size,
        torch.device(device),
    )
    return probs

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


PRECISIONS = ("auto", "fp32", "bf16")
"""``refine``'s ``--precision`` choices (see :func:`autocast_dtype`)."""


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU
    with AVX512-BF16 or AMX (where oneDNN runs bf16 convolutions natively)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(
        getattr(cpu, probe, lambda: False)()
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype the models run in, None for fp32.

    ``auto`` is bf16 where the device computes it natively (2.8x PRN's fp32 speed on an H100
    with channels-last tensors, 2.2x on 2 AVX512-BF16 CPU cores, ``benchmarks/model_speed.py``)
    and fp32 elsewhere, where emulated bf16 would be slower.
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision '{precision}' (use {', '.join(PRECISIONS)})")
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


def fast_math(device: torch.device, precision: str = "auto"):
    """The autocast context of :func:`autocast_dtype` (a no-op for fp32)."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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
    precision: str = "auto",
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Run ``model`` on every grid window touching ``out_region`` and blend them.

    A window holding no valid pixel is skipped: it would only add to pixels that are nodata,
    so the valid pixels' values are those of the full blend, bit for bit.

    Args:
        model: maps (N, C, tile, tile) float32 to (N, 1, tile, tile) probabilities.
        source: (C, H, W) input covering ``source_region`` (which covers every window used).
        source_region, out_region: (rows, cols) ranges in scene coordinates.
        origins: the scene-wide window grid (row origins, column origins).
        precision: see :func:`autocast_dtype`.
        valid: (H, W) bool over ``source_region``, False at nodata; None: all valid.

    Returns:
        The blended (H_out, W_out) float32 probabilities (meaningless where no window ran:
        mask nodata afterwards) and the number of windows run.
    """
    (sy0, _), (sx0, _) = source_region
    (oy0, oy1), (ox0, ox1) = out_region
    rows, cols = (touching(o, span, tile) for o, span in zip(origins, out_region, strict=True))
    windows = [
        (int(y), int(x))
        for y in rows
        for x in cols
        if valid is None or valid[y - sy0 : y - sy0 + tile, x - sx0 : x - sx0 + tile].any()
    ]
    weights = blend_weights(tile, overlap)
    total = np.zeros((oy1 - oy0, ox1 - ox0), np.float32)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        tiles = np.stack(
            [source[:, y - sy0 : y - sy0 + tile, x - sx0 : x - sx0 + tile] for y, x in batch]
        )
        with torch.inference_mode(), fast_math(device, precision):
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
    precision: str = "auto",
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Blended ``model`` probabilities over a whole (C, H, W) array, reflect-padded at its edges.

    The result is what ``refine`` gives for a scene holding exactly this array. With ``valid``
    ((H, W) bool, False at nodata), windows without a valid pixel are skipped as ``refine``
    skips them: the valid pixels' values do not change.
    """
    h, w = image.shape[-2:]
    origins = (window_origins(h, tile, overlap), window_origins(w, tile, overlap))
    rows, cols = cover(origins[0], (0, h), tile), cover(origins[1], (0, w), tile)
    grid = np.ix_(reflect_index(np.arange(*rows), h), reflect_index(np.arange(*cols), w))
    source = image[(slice(None), *grid)]
    padded_valid = None if valid is None else valid[grid]
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
        precision,
        padded_valid,
    )
    return probs

"""Patch-optimal pseudo-labels: PRN's second training signal (DESIGN.md, "PRN as the paper
describes it").

Every P x P patch of a base model's probability map is binarised at the threshold that
maximises that patch's road IoU with the ground truth. The result is the target of PRN's
local branch; it is computed once per training tile and cached.
"""

from __future__ import annotations

import numpy as np
import torch

# τ = 0.05, 0.10, ..., 0.95 as float32, built as torch.arange(1, 20) * 0.05.
THRESHOLDS = torch.arange(1, 20) * 0.05


def patch_optimal_labels(
    probs: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    patch_size: int,
    valid: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[np.ndarray, np.ndarray]:
    """Binarise each P x P patch of ``probs`` at its own IoU-optimal threshold.

    For every patch, each τ in :data:`THRESHOLDS` (0.05 ... 0.95, 19 values) predicts road
    where ``probs > τ`` (strictly greater, probabilities compared in float32 against the
    float32 τ, in the search and in the binarisation alike). The patch's smoothed road IoU
    ``(I + 1) / (U + 1)`` is compared exactly (integer cross-multiplication, no float
    rounding), and the best τ wins, ties going to the lowest τ. The patch is then binarised
    at that τ. A patch with no road in its (valid) ground truth gets an all-zero label and the
    threshold NaN.

    Vectorised in torch on the input's device: one pass per τ (19), no pixel loops; the
    working memory is a few times the input, not 19 times.

    Args:
        probs: base-model road probabilities, (N, H, W) or (H, W), H and W multiples of
            ``patch_size``.
        labels: ground truth of the same shape; road where ``labels > 0.5`` (so {0, 1} and
            {0, 255} masks both work; bool is accepted).
        patch_size: P, the side of the square patches.
        valid: optional bool mask of the same shape; invalid (nodata) pixels count in neither
            I nor U and are 0 in the pseudo-labels.

    Returns:
        ``(pseudo_labels, thresholds)``: float32 {0, 1} labels shaped like ``probs``, and the
        chosen τ per patch, float32 (N, H/P, W/P) (or (H/P, W/P) for a 2-D input), NaN for
        patches without road. NumPy arrays if ``probs`` was a NumPy array, tensors on
        ``probs``' device otherwise.
    """
    as_numpy = isinstance(probs, np.ndarray)
    probs = torch.as_tensor(probs)
    device = probs.device
    labels = torch.as_tensor(labels, device=device)
    if valid is not None:
        valid = torch.as_tensor(valid, device=device)
    shape = tuple(probs.shape)
    if probs.ndim not in (2, 3):
        raise ValueError(f"probs must be (N, H, W) or (H, W), got {shape}")
    for name, other in (("labels", labels), ("valid", valid)):
        if other is not None and tuple(other.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(other.shape)}, probs {shape}")
    p = int(patch_size)
    height, width = shape[-2:]
    if p < 1 or height % p or width % p:
        raise ValueError(f"a {height}x{width} map is not a whole number of {p}-px patches")
    rows, cols = height // p, width // p

    def patched(x: torch.Tensor) -> torch.Tensor:  # (N, H, W) -> (N, rows, cols, P, P) view
        return x.reshape(-1, rows, p, cols, p).transpose(2, 3)

    def per_patch(x: torch.Tensor) -> torch.Tensor:  # bool map -> int64 count per patch
        return patched(x).sum(dim=(-1, -2))

    probs32 = probs.to(torch.float32).reshape(-1, height, width)
    if labels.dtype == torch.bool:
        road = labels.reshape(-1, height, width)
    else:
        road = labels.reshape(-1, height, width).to(torch.float32) > 0.5
    if valid is not None:
        valid = valid.reshape(-1, height, width).to(torch.bool)
        road = road & valid
    road_count = per_patch(road)  # G: road pixels of each patch's ground truth

    taus = THRESHOLDS.to(device=device, dtype=torch.float32)
    best_num = torch.zeros_like(road_count)  # best (I + 1) / (U + 1) so far, as a fraction
    best_den = torch.ones_like(road_count)
    best = torch.zeros_like(road_count)  # index of the best τ
    for i in range(len(taus)):
        predicted = probs32 > taus[i]
        if valid is not None:
            predicted &= valid
        inter = per_patch(predicted & road)
        union = per_patch(predicted) + road_count - inter
        num, den = inter + 1, union + 1
        better = num * best_den > best_num * den  # strict: ties keep the lower τ
        best = torch.where(better, torch.full_like(best, i), best)
        best_num = torch.where(better, num, best_num)
        best_den = torch.where(better, den, best_den)

    has_road = road_count > 0
    tau = taus[best]  # (N, rows, cols)
    pseudo = patched(probs32) > tau[..., None, None]
    pseudo &= has_road[..., None, None]
    pseudo = pseudo.transpose(2, 3).reshape(-1, height, width)
    if valid is not None:
        pseudo &= valid
    pseudo = pseudo.to(torch.float32).reshape(shape)
    thresholds = torch.where(has_road, tau, torch.full_like(tau, float("nan")))
    thresholds = thresholds.reshape(*shape[:-2], rows, cols)
    if as_numpy:
        return pseudo.cpu().numpy(), thresholds.cpu().numpy()
    return pseudo, thresholds

"""Training losses. Every loss takes a ``valid`` mask: pixels where it is 0 count for nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 autocast outputs are raised; float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def _masked_mean(loss: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    valid = _fp32(valid)
    return (loss * valid).sum() / valid.sum().clamp_min(1.0)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over valid pixels.

    Args:
        logits: (N, 1, H, W) network outputs.
        target: (N, 1, H, W) labels in {0, 1}.
        valid: (N, 1, H, W) weights, 1 for valid pixels and 0 for nodata.
    """
    loss = F.binary_cross_entropy_with_logits(_fp32(logits), _fp32(target), reduction="none")
    return _masked_mean(loss, valid)


def masked_soft_dice(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """Soft Dice loss (1 - Dice) of the road class, pooled over the valid pixels of the batch."""
    prob = torch.sigmoid(_fp32(logits)) * valid
    target = _fp32(target) * valid
    intersection = (prob * target).sum()
    return 1.0 - (2.0 * intersection + smooth) / (prob.sum() + target.sum() + smooth)


def base_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, dice_weight: float = 1.0
) -> torch.Tensor:
    """The base model's loss: masked BCE + ``dice_weight`` x masked soft Dice."""
    return masked_bce(logits, target, valid) + dice_weight * masked_soft_dice(logits, target, valid)


def masked_focal(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) ``-(1 - p_t)^gamma log p_t``, averaged over valid pixels."""
    logits, target = _fp32(logits), _fp32(target)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)  # the probability given to the true class
    return _masked_mean((1.0 - p_t).pow(gamma) * bce, valid)


LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """``|tanh(Laplacian(x))|`` of (N, 1, H, W) maps, replicate-padded: 0 where x is flat."""
    padded = F.pad(_fp32(x), (1, 1, 1, 1), mode="replicate")
    return torch.tanh(F.conv2d(padded, LAPLACIAN.to(x.device, padded.dtype))).abs()


EDGE_MAX = 1.0 - 2.0**-8
"""The largest predicted edge value the boundary loss takes: below 1 also in bf16, whose
next value under 1 is 1 - 2^-8 (a clamp at 1 - 1e-6 rounds to 1 there, and ``log(1 - p)`` of a
saturated map's edges was infinite)."""


def masked_boundary(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """PRN's boundary loss: BCE between the edge maps of the prediction and of the target.

    The prediction's edge map is taken of its sigmoid, so it lies in [0, 1) like the target's.

    Known limit (2026-12-03): under bf16 autocast the edge maps are computed in bf16, whose
    rounding sets faint edges to 0, where the clamp cuts their gradient. Computed in float32
    instead, the term's gradient ``t / p`` at faint predicted edges swamped the others: PRN
    learnt no road in ``tests/test_train_prn.py`` and won back 7 % of a synthetic bias instead
    of 68 % (``benchmarks/research/prn_bias.py``, RESULTS.md point 6). A formulation that
    trains alike in both precisions is still to be found; training runs in bf16 where the
    device computes it.
    """
    predicted = edge_map(torch.sigmoid(_fp32(logits))).clamp(1e-6, EDGE_MAX)
    target_edges = edge_map(target)  # BCE written out: F.binary_cross_entropy refuses autocast
    loss = -(target_edges * predicted.log() + (1.0 - target_edges) * (1.0 - predicted).log())
    return _masked_mean(loss, valid)


def prn_branch_loss(
    logits: torch.Tensor,
    pseudo: torch.Tensor,
    truth: torch.Tensor,
    valid: torch.Tensor,
    pseudo_weight: float = 0.7,
) -> torch.Tensor:
    """One PRN branch: ``0.7 (focal + boundary)(pseudo-labels) + 0.3 BCE(ground truth)``."""
    pseudo_term = masked_focal(logits, pseudo, valid) + masked_boundary(logits, pseudo, valid)
    return pseudo_weight * pseudo_term + (1.0 - pseudo_weight) * masked_bce(logits, truth, valid)


def prn_loss(
    global_logits: torch.Tensor,
    local_logits: torch.Tensor,
    pseudo: torch.Tensor,
    truth: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """PRN's training loss: the sum of :func:`prn_branch_loss` over its two branches."""
    return prn_branch_loss(global_logits, pseudo, truth, valid) + prn_branch_loss(
        local_logits, pseudo, truth, valid
    )

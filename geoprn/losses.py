"""Training losses. Every loss takes a ``valid`` mask: pixels where it is 0 count for nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import LovaszLoss


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


IGNORED = -1
"""The label nodata pixels take for :class:`LovaszLoss`, which leaves them out."""

_lovasz = LovaszLoss("binary", per_image=True, ignore_index=IGNORED)


def masked_lovasz(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Lovász hinge (Berman et al. 2018), a surrogate of each crop's road IoU, over valid pixels."""
    return _lovasz(_fp32(logits), _fp32(target).masked_fill(valid <= 0, IGNORED))


def base_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    dice_weight: float = 1.0,
    lovasz_weight: float = 0.0,
) -> torch.Tensor:
    """The base model's loss: masked BCE + ``dice_weight`` x masked soft Dice, plus
    ``lovasz_weight`` x the masked Lovász hinge where that weight is above 0."""
    loss = masked_bce(logits, target, valid) + dice_weight * masked_soft_dice(logits, target, valid)
    if lovasz_weight > 0:
        loss = loss + lovasz_weight * masked_lovasz(logits, target, valid)
    return loss


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
    """``|tanh(Laplacian(x))|`` of (N, 1, H, W) maps, replicate-padded: 0 where x is flat.

    Computed in bf16 on every device and in every precision, so edges fainter than bf16
    resolves are exactly 0 (see :func:`masked_boundary`); returned as float32."""
    padded = F.pad(x.float(), (1, 1, 1, 1), mode="replicate").bfloat16()
    with torch.autocast(padded.device.type, enabled=False):
        laplacian = F.conv2d(padded, LAPLACIAN.to(x.device, torch.bfloat16))
        return torch.tanh(laplacian).abs().float()


EDGE_MIN, EDGE_MAX = 1e-6, 1.0 - 2.0**-8
"""The range the boundary loss takes a predicted edge value in: an edge of 0 counts as 1e-6
(no gradient), one of 1 as 1 - 2^-8 (the largest bf16 value below 1), so ``log p`` and
``log(1 - p)`` stay finite."""


def masked_boundary(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """PRN's boundary loss: BCE between the edge maps of the prediction and of the target.

    The prediction's edge map is taken of its sigmoid, so it lies in [0, 1) like the target's,
    clamped to [:data:`EDGE_MIN`, :data:`EDGE_MAX`]. The edge maps are bf16's
    (:func:`edge_map`) whatever the precision of training: computed exactly, the term's
    gradient ``t / p`` at faint predicted edges (p near 1e-6) swamped the others, and a PRN
    trained in float32 won back 2 % of a synthetic bias where bf16, whose rounding sets those
    edges to 0 and the clamp cuts their gradient, won back 41 %; with bf16 edge maps in both,
    63 % in float32 and 45 % under bf16 autocast (``tests/test_prn_bias.py``; a floor of 2^-8
    on exact edges: 18 % and 34 %).
    """
    predicted = edge_map(torch.sigmoid(_fp32(logits))).clamp(EDGE_MIN, EDGE_MAX)
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

"""Training losses. Every loss takes a ``valid`` mask: pixels where it is 0 count for nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over valid pixels.

    Args:
        logits: (N, 1, H, W) network outputs.
        target: (N, 1, H, W) labels in {0, 1}.
        valid: (N, 1, H, W) weights, 1 for valid pixels and 0 for nodata.
    """
    loss = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    valid = valid.float()
    return (loss * valid).sum() / valid.sum().clamp_min(1.0)


def masked_soft_dice(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """Soft Dice loss (1 - Dice) of the road class, pooled over the valid pixels of the batch."""
    prob = torch.sigmoid(logits.float()) * valid
    target = target.float() * valid
    intersection = (prob * target).sum()
    return 1.0 - (2.0 * intersection + smooth) / (prob.sum() + target.sum() + smooth)


def base_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, dice_weight: float = 1.0
) -> torch.Tensor:
    """The base model's loss: masked BCE + ``dice_weight`` x masked soft Dice."""
    return masked_bce(logits, target, valid) + dice_weight * masked_soft_dice(logits, target, valid)

"""Base segmentation models, built with segmentation-models-pytorch from a checkpoint header."""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch

from geoprn.errors import CheckpointError


def build_base(architecture: str, arguments: dict[str, Any]) -> torch.nn.Module:
    """Build an untrained segmentation-models-pytorch network with one output channel.

    Args:
        architecture: any architecture smp offers (``Unet``, ``FPN``, ``DeepLabV3Plus``, ...).
        arguments: keyword arguments of that architecture (``encoder_name``, ``in_channels``,
            ``decoder_channels``...). Encoder weights are never downloaded.

    Returns:
        The network; its output is one channel of logits.
    """
    arguments = {**arguments, "encoder_weights": None, "classes": 1}
    try:
        return smp.create_model(architecture, **arguments)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot build {architecture} with {arguments}: {exc}") from None

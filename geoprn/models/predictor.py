"""A network wrapped with its checkpoint's input normalisation and output activation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Predictor(nn.Module):
    """Raw inputs in, probabilities out.

    Base models take raster bands in their raw units and normalise them with the mean and std
    stored in the checkpoint; refiners take probabilities in [0, 1] as they are. The header is
    kept on ``.geoprn_meta``.
    """

    def __init__(self, net: nn.Module, meta: dict[str, Any]):
        super().__init__()
        self.net = net
        self.geoprn_meta = meta
        bands = len(meta["bands"])
        mean = torch.tensor(meta.get("mean") or [0.0] * bands, dtype=torch.float32)
        std = torch.tensor(meta.get("std") or [1.0] * bands, dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (N, C, H, W) and return the network's logits (N, 1, H, W)."""
        return self.net((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.geoprn_meta.get("output") == "probability":
            return self.net((x - self.mean) / self.std)
        return torch.sigmoid(self.logits(x))

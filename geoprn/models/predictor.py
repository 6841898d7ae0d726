"""A network wrapped with its checkpoint's input normalisation and output activation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


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


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution in an
    ``nn.Sequential`` into that convolution (``torch.nn.utils.fusion``); return how many.

    The result computes the same function up to float rounding (about 5e-6 here), one pass
    cheaper: 1.4x for the shipped base model and 1.17x for PRN on the CPU. For inference only.
    """
    folded = sum(fold_batchnorm(child) for child in module.children())
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
                folded += 1
    return folded


SYMMETRIES = (1, 4, 8)
"""How many symmetries of a window a base model's probabilities can be averaged over: none,
the flips (which keep any rectangle's shape), or all 8 of the square (flips and quarter
turns)."""


def symmetry(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` (..., H, W) under symmetry ``k`` of the square: the identity, the two flips,
    the half turn, the two quarter turns, the transpose and the anti-transpose."""
    if k < 4:
        dims = ((), (-1,), (-2,), (-2, -1))[k]
        return x.flip(dims) if dims else x
    if k < 6:
        return torch.rot90(x, 1 if k == 4 else -1, (-2, -1))
    x = x.transpose(-2, -1)
    return x if k == 6 else x.flip((-2, -1))


def inverse(k: int) -> int:
    """The symmetry that undoes ``k`` (the quarter turns undo each other; the rest undo
    themselves)."""
    return {4: 5, 5: 4}.get(k, k)


class SymmetryMean(nn.Module):
    """A model's probabilities averaged over ``n`` symmetries of each window, each mapped back
    (test-time averaging; ``benchmarks/prn_accuracy.py --symmetries``): ``n`` forward passes,
    one at a time, so memory stays that of one. The quarter turns need square windows."""

    def __init__(self, model: nn.Module, n: int):
        super().__init__()
        if n not in SYMMETRIES:
            raise ValueError(f"symmetries must be one of {SYMMETRIES}, not {n}")
        self.model, self.n = model, n
        self.geoprn_meta = model.geoprn_meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.model(x).float()
        for k in range(1, self.n):
            total += symmetry(self.model(symmetry(x, k)), inverse(k)).float()
        return total / self.n


def averaged_over(model: nn.Module, n: int) -> nn.Module:
    """``model`` averaged over ``n`` window symmetries (:class:`SymmetryMean`); itself for 1."""
    return model if n == 1 else SymmetryMean(model, n)

"""PatchRefineNet (Nagendra, Kifer, Shen, arXiv 2211.06560), reimplemented from the paper.

PRN reads a base model's road probability map and corrects its patch-wise bias. One encoder
(residual-recurrent blocks, R2U-Net style, with a pyramid pooling module at the 1/8
bottleneck) feeds two decoders with attention-gated skips (Attention U-Net style):

* the *global* decoder decodes the whole map;
* the *local* decoder decodes every P x P patch on its own, with weights shared by all
  patches. It is trained against the patch-optimal pseudo-labels
  (:func:`geoprn.pseudo_labels.patch_optimal_labels`), whose target for a patch depends on that
  patch alone, so the local branch sees that patch alone.

Locality is exact: the patches are reshaped into the batch dimension and the *shared* encoder
(same weights as the global branch) runs a second time on that patch batch, followed by the
local decoder. Nothing in the local branch can see a neighbouring patch (zero padding at the
patch border, pooling inside the patch), so a patch's local output depends on that patch's
input only (in eval mode; in train mode BatchNorm batch statistics couple every sample of a
batch, as they always do). The alternative of cutting the full-map encoder features into
patches would leak the encoder's receptive field (well over 100 px) across patch borders. The
price is one more encoder pass over the same number of pixels (about a third more compute
than a single shared pass); parameters are unchanged, since the encoder weights are shared.

Modes:
    * train mode: ``forward(x)`` returns ``(global_logits, local_logits)``, both (N, 1, H, W);
    * eval mode: ``forward(x)`` returns probabilities (N, 1, H, W) combined by the network's
      ``rule``: ``"mean"``, the mean of the two sigmoid maps, which the paper thresholds at
      0.5; or ``"union"``, the post-step the authors' released code reports its figures with,
      global ∪ dilate₃ₓ₃(global ∩ local) (DESIGN.md), written as a map whose 0.5 threshold is
      exactly that mask (:func:`union_rule`). PRN checkpoints therefore carry
      ``"output": "probability"`` in their header so that
      :class:`geoprn.models.predictor.Predictor` does not apply a second sigmoid.
    * :meth:`PatchRefineNet.logits` and :meth:`PatchRefineNet.predict` do the same in either
      mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class RecurrentConv(nn.Module):
    """One recurrent convolution unit: a conv-BN-ReLU ``f`` unrolled ``t`` steps.

    ``h = f(x)``, then ``t`` times ``h = f(x + h)``; the weights of ``f`` are shared across
    steps, so ``t`` changes the compute, not the parameter count.
    """

    def __init__(self, channels: int, t: int):
        super().__init__()
        self.t = t
        self.conv = _conv_bn_relu(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        for _ in range(self.t):
            h = self.conv(x + h)
        return h


class ResidualRecurrentBlock(nn.Module):
    """R2U-Net block: a 1x1 conv sets the channels, two recurrent units, a residual add."""

    def __init__(self, in_channels: int, out_channels: int, t: int):
        super().__init__()
        self.project = nn.Conv2d(in_channels, out_channels, 1)
        self.body = nn.Sequential(RecurrentConv(out_channels, t), RecurrentConv(out_channels, t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        return x + self.body(x)


class PyramidPooling(nn.Module):
    """PSPNet-style pyramid pooling: average-pool to each bin size, 1x1 conv, upsample back,
    concatenate with the input and merge back to ``channels`` with a 1x1 conv.

    The pooled branches keep the full width and have no BatchNorm: a 1x1 bin holds one value
    per channel and sample, which BatchNorm cannot normalise in training with a batch of one.
    A bin larger than the feature map (a small patch in the local branch) repeats pixels.
    """

    def __init__(self, channels: int, bins: Sequence[int]):
        super().__init__()
        self.bins = tuple(int(b) for b in bins)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True))
            for _ in self.bins
        )
        self.merge = _conv_bn_relu(channels * (1 + len(self.bins)), channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(
                branch(F.adaptive_avg_pool2d(x, b)), size, mode="bilinear", align_corners=False
            )
            for b, branch in zip(self.bins, self.branches, strict=True)
        ]
        return self.merge(torch.cat([x, *pooled], dim=1))


class AttentionGate(nn.Module):
    """Attention U-Net gate: weights a skip connection by a map computed from it and the
    decoder features at the same resolution."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 2, 1)
        self.gate = nn.Sequential(nn.Conv2d(channels, inner, 1, bias=False), nn.BatchNorm2d(inner))
        self.skip = nn.Sequential(nn.Conv2d(channels, inner, 1, bias=False), nn.BatchNorm2d(inner))
        self.psi = nn.Sequential(
            nn.Conv2d(inner, 1, 1, bias=False), nn.BatchNorm2d(1), nn.Sigmoid()
        )

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return skip * self.psi(F.relu(self.gate(gate) + self.skip(skip)))


class Encoder(nn.Module):
    """Residual-recurrent blocks with 2x2 max-pooling between levels; pyramid pooling on the
    deepest level. Returns the features of every level, finest first."""

    def __init__(self, in_channels: int, channels: Sequence[int], t: int, bins: Sequence[int]):
        super().__init__()
        widths = [in_channels, *channels]
        self.blocks = nn.ModuleList(
            ResidualRecurrentBlock(widths[i], widths[i + 1], t) for i in range(len(channels))
        )
        self.pyramid = PyramidPooling(channels[-1], bins)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i, block in enumerate(self.blocks):
            x = block(F.max_pool2d(x, 2) if i else x)
            features.append(x)
        features[-1] = self.pyramid(features[-1])
        return features


class Decoder(nn.Module):
    """Upsample, attention-gate the skip, concatenate, residual-recurrent block; per level.
    Ends in a 1-channel 1x1 head giving logits at the input resolution."""

    def __init__(self, channels: Sequence[int], t: int):
        super().__init__()
        levels = range(len(channels) - 2, -1, -1)  # coarsest skip first
        self.ups = nn.ModuleList(_conv_bn_relu(channels[i + 1], channels[i]) for i in levels)
        self.gates = nn.ModuleList(AttentionGate(channels[i]) for i in levels)
        self.blocks = nn.ModuleList(
            ResidualRecurrentBlock(2 * channels[i], channels[i], t) for i in levels
        )
        self.head = nn.Conv2d(channels[0], 1, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        skips = features[-2::-1]
        for skip, up, gate, block in zip(skips, self.ups, self.gates, self.blocks, strict=True):
            x = up(F.interpolate(x, scale_factor=2.0, mode="nearest"))
            x = block(torch.cat([gate(skip, x), x], dim=1))
        return self.head(x)


RULES = ("mean", "union")
"""How the two branches' probabilities make PRN's output (:meth:`PatchRefineNet.predict`)."""


def union_rule(global_probs: torch.Tensor, local_probs: torch.Tensor) -> torch.Tensor:
    """``max(g, maxpool3x3(min(g, l)))``: above 0.5 exactly where global > 0.5, or within one
    pixel (8-connected) of a pixel where both branches are above 0.5: the authors' post-step
    global ∪ dilate₃ₓ₃(global ∩ local), kept as a probability map so windows still blend."""
    both = torch.minimum(global_probs, local_probs)
    return torch.maximum(global_probs, F.max_pool2d(both, 3, stride=1, padding=1))


def to_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N * H/P * W/P, C, P, P), patches in row-major order per image."""
    n, c, h, w = x.shape
    p = patch_size
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c, p, p)


def from_patches(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`to_patches`: (N * H/P * W/P, C, P, P) -> (N, C, H, W)."""
    _, c, p, _ = x.shape
    rows, cols = height // p, width // p
    x = x.reshape(-1, rows, cols, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(-1, c, height, width)


class PatchRefineNet(nn.Module):
    """PatchRefineNet: refines a road probability map with a global and a patch-local decoder.

    Args:
        in_channels: input channels (1: the base model's probabilities).
        channels: encoder widths, finest first; one level per entry, a 2x2 max-pool between
            levels (the default's bottleneck sits at 1/8 resolution); the decoders mirror them.
        patch_size: P, side of the local branch's patches; a multiple of
            ``2 ** (len(channels) - 1)``. Inputs must have H and W multiples of P.
        recurrence: t, the unrolled steps of each recurrent convolution unit.
        pool_bins: output sizes of the pyramid pooling module.
        rule: how the branches combine in :meth:`predict`, one of :data:`RULES`; it changes
            no weight, so a trained PRN may be given either.
        input_skip: add the input's logit to each branch's logits, with the heads starting at
            zero, so an untrained PRN returns its input and training learns a correction of
            it (not in the paper; the CPU-sized configs use it: with a few CPU hours of
            training a PRN learning the whole map from scratch first predicts no road).

    The constructor arguments are JSON-serialisable; :attr:`arguments` returns them as stored
    in a checkpoint header (``architecture: "PatchRefineNet"``, ``output: "probability"``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        patch_size: int = 64,
        recurrence: int = 2,
        pool_bins: Sequence[int] = (1, 2, 4, 8),
        rule: str = "mean",
        input_skip: bool = False,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        pool_bins = [int(b) for b in pool_bins]
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"channels needs at least two positive widths, got {channels}")
        factor = 2 ** (len(channels) - 1)
        if patch_size < factor or patch_size % factor:
            raise ValueError(f"patch_size must be a positive multiple of {factor}: {patch_size}")
        if recurrence < 0 or not pool_bins or min(pool_bins) < 1:
            raise ValueError("recurrence must be >= 0 and pool_bins positive sizes")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
        self.rule = rule
        self.input_skip = bool(input_skip)
        self.in_channels = int(in_channels)
        self.channels = channels
        self.patch_size = int(patch_size)
        self.recurrence = int(recurrence)
        self.pool_bins = pool_bins
        self.encoder = Encoder(self.in_channels, channels, self.recurrence, pool_bins)
        self.global_decoder = Decoder(channels, self.recurrence)
        self.local_decoder = Decoder(channels, self.recurrence)
        if self.input_skip:
            for head in (self.global_decoder.head, self.local_decoder.head):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    @property
    def arguments(self) -> dict[str, Any]:
        """The constructor arguments, JSON-ready: ``PatchRefineNet(**net.arguments)``."""
        return {
            "in_channels": self.in_channels,
            "channels": list(self.channels),
            "patch_size": self.patch_size,
            "recurrence": self.recurrence,
            "pool_bins": list(self.pool_bins),
            "rule": self.rule,
            "input_skip": self.input_skip,
        }

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PatchRefineNet takes (N, {self.in_channels}, H, W) inputs, got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a whole number of {self.patch_size}-px patches")

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global and local logits, each (N, 1, H, W), in either mode.

        The local branch runs the shared encoder and the local decoder on the P x P patches
        batched together, then puts the patch outputs back in place.
        """
        self._check(x)
        global_logits = self.global_decoder(self.encoder(x))
        patches = to_patches(x, self.patch_size)
        local = from_patches(self.local_decoder(self.encoder(patches)), x.shape[-2], x.shape[-1])
        if self.input_skip:  # each branch corrects the input's logits
            prior = torch.logit(x[:, :1].float().clamp(1e-4, 1 - 1e-4)).to(local.dtype)
            global_logits, local = global_logits + prior, local + prior
        return global_logits, local

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Refined probabilities (N, 1, H, W): the two branches' sigmoids combined by
        ``rule`` (their mean, or :func:`union_rule`)."""
        global_logits, local_logits = self.logits(x)
        global_probs, local_probs = torch.sigmoid(global_logits), torch.sigmoid(local_logits)
        if self.rule == "union":
            return union_rule(global_probs, local_probs)
        return 0.5 * (global_probs + local_probs)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Train mode: ``(global_logits, local_logits)``; eval mode: probabilities."""
        if self.training:
            return self.logits(x)
        return self.predict(x)

"""An exponential moving average (EMA) of a network's weights during training.

On 2 CPU cores a step sees 8 crops, so the weights after any one epoch carry that batch's
noise; their moving average (torch's :class:`~torch.optim.swa_utils.AveragedModel`) is the
model validated and kept when a recipe sets ``ema_decay``. BatchNorm statistics are averaged
with the weights (``use_buffers``), so the averaged model is evaluated as it is saved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from geoprn.errors import CheckpointError


class MovingAverage:
    """The EMA of ``net``'s weights and buffers, updated after each optimizer step."""

    def __init__(self, net: torch.nn.Module, decay: float):
        self.averaged = AveragedModel(
            net, multi_avg_fn=get_ema_multi_avg_fn(float(decay)), use_buffers=True
        )

    def update(self, net: torch.nn.Module) -> None:
        """Fold the current weights of ``net`` into the average (the first call copies them)."""
        self.averaged.update_parameters(net)

    @contextmanager
    def swapped_into(self, net: torch.nn.Module) -> Iterator[None]:
        """Within the block ``net`` holds the averaged weights; its own come back after it."""
        own = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net.load_state_dict(self.averaged.module.state_dict())
        try:
            yield
        finally:
            net.load_state_dict(own)

    def state(self) -> dict[str, Any]:
        """What a training state keeps of the average, to resume it."""
        return {
            "weights": self.averaged.module.state_dict(),
            "updates": int(self.averaged.n_averaged),
        }

    def restore(self, state: dict[str, Any] | None, source: Path) -> None:
        """Resume the average from the one the training state in ``source`` kept; without
        one (a run that kept no average) it starts from the weights at the next step.

        Raises:
            CheckpointError: the recorded average does not fit the network.
        """
        if not state:
            return
        try:
            self.averaged.module.load_state_dict(state["weights"])
            self.averaged.n_averaged.fill_(int(state["updates"]))
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            text = str(exc).strip()
            raise CheckpointError(
                f"cannot resume from {source}: its weight average does not fit the network: "
                f"{text.splitlines()[0] if text else type(exc).__name__}"
            ) from None

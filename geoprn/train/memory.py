"""How many crops one forward/backward pass may take: activations measured, memory read."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil
import torch

from geoprn.errors import InputError

if TYPE_CHECKING:
    from geoprn.train.loop import Run


MEMORY_SHARE = 0.5
"""Share of the free memory (``GEOPRN_TRAIN_MEMORY_MB`` when set) one step's activations may use."""


PEAK_PER_SAVED = 1.5
"""A step's peak memory per byte autograd saves for backward: a margin for the step's own
temporaries (gradients, the optimizer's update) on top of the activations."""


def saved_bytes(model: torch.nn.Module, forward: Callable[[], object]) -> int:
    """Bytes autograd keeps for the backward pass (the activations) while ``forward()`` runs
    ``model``; the model's batch-norm statistics are restored afterwards."""
    buffers = [b.clone() for b in model.buffers()]
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(saved)
    return sum(storages.values())


def memory_cap() -> int | None:
    """``GEOPRN_TRAIN_MEMORY_MB`` in bytes; None when unset.

    Raises:
        InputError: it is set to something other than a whole number of MiB.
    """
    text = os.environ.get("GEOPRN_TRAIN_MEMORY_MB")
    if text is None:
        return None
    if not text.isdigit():
        raise InputError(f"GEOPRN_TRAIN_MEMORY_MB={text!r} is not a whole number of MiB")
    return int(text) << 20


def free_memory(device: torch.device) -> int:
    """Bytes training may fill: ``GEOPRN_TRAIN_MEMORY_MB`` if set, else what the device has free."""
    cap = memory_cap()
    if cap is not None:
        return cap
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def micro_batch_size(run: Run, batch: list[torch.Tensor], autocast, setting) -> int:
    """Crops per forward/backward pass: ``setting`` if a number, else (``auto``) the most of
    the batch whose activations fit in :data:`MEMORY_SHARE` of the free memory. The optimizer
    steps once per batch whatever the micro-batch (gradients accumulate)."""
    size = len(batch[0])
    if setting != "auto":  # a whole number (load_config checked it)
        return min(int(setting), size)

    def one_crop() -> torch.Tensor:
        with autocast:
            return run.loss(run.model, [t[:1] for t in batch])

    per_crop = PEAK_PER_SAVED * saved_bytes(run.model, one_crop)
    fitting = int(MEMORY_SHARE * free_memory(next(run.model.parameters()).device) // per_crop)
    return max(1, min(fitting, size))

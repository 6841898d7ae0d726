"""Training a segmentation-models-pytorch base model on labelled tiles."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoprn.data import (
    LabelledTile,
    RandomCrops,
    TilePair,
    band_statistics,
    load_tiles,
)
from geoprn.errors import InputError
from geoprn.inference import resolve_device
from geoprn.losses import base_loss
from geoprn.metrics import Confusion, confusion
from geoprn.models.base import build_base
from geoprn.models.checkpoint import (
    file_sha256,
    load_model,
)
from geoprn.models.predictor import Predictor
from geoprn.train.loop import Progress, Run, check_init, choose_split, fit, open_state, split_record

log = logging.getLogger(__name__)


@torch.inference_mode()
def road_confusion(
    model: Predictor,
    tiles: Sequence[LabelledTile],
    window: int = 512,
    batch_size: int = 4,
    autocast=None,
) -> Confusion:
    """Pooled confusion of ``model`` at probability 0.5 over the valid pixels of ``tiles``.

    Each tile is reflect-padded to a multiple of ``window`` and predicted in non-overlapping
    windows.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = Confusion()
    for tile in tiles:
        _, h, w = tile.image.shape
        ph, pw = -h % window, -w % window
        image = np.pad(tile.image.astype(np.float32), ((0, 0), (0, ph), (0, pw)), mode="reflect")
        windows = [(y, x) for y in range(0, h + ph, window) for x in range(0, w + pw, window)]
        pred = np.zeros((h + ph, w + pw), dtype=bool)
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            x = torch.from_numpy(
                np.stack([image[:, y : y + window, x : x + window] for y, x in chunk])
            ).to(device)
            with autocast or nullcontext():
                logits = model.logits(x)
            out = (logits.float() > 0).cpu().numpy()[:, 0]
            for (y, x0), o in zip(chunk, out, strict=True):
                pred[y : y + window, x0 : x0 + window] = o
        total += confusion(pred[:h, :w], tile.label > 0, tile.valid)
    model.train(was_training)
    return total


def train_base(
    tiles: Sequence[str | Path | TilePair],
    config: dict[str, Any],
    out_path: str | Path,
    val_fraction: float = 0.1,
    val_tiles: Sequence[str | Path | TilePair] | None = None,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    max_minutes: float | None = None,
    device: str = "auto",
    half: bool = False,
    progress: Progress | None = None,
    init: str | Path | None = None,
) -> dict[str, Any]:
    """Train a base segmentation model and save its best weights as a geoprn checkpoint.

    Args:
        tiles: labelled-tile sources (see :func:`geoprn.data.discover_pairs`) or pairs.
        config: settings from :func:`load_config`.
        out_path: the ``.safetensors`` checkpoint to write (best validation road IoU).
        val_fraction: share of ``tiles`` held out for validation, seeded by ``seed``.
        val_tiles: explicit validation tiles; then ``tiles`` are all used for training.
        seed: seeds the split, the weight initialisation and the crops.
        resume: continue from ``<out>.state.safetensors``; split, statistics and model come from it.
        overwrite: replace an existing checkpoint (and state) instead of refusing.
        max_minutes: wall-clock cap on this call; training stops after the epoch in progress
            once reached, or earlier if one more epoch would overshoot it. The best checkpoint
            is kept.
        device: ``auto``, ``cpu`` or ``cuda``. Training runs channels-last, with bf16
            autocast where the device computes bf16 natively (fp16 on older GPUs).
        half: store the final checkpoint's weights as float16 (shipped weights).
        progress: callback, see :data:`Progress`.
        init: a base checkpoint of the config's network to start from (a later piece of a
            long run, or fine-tuning on other places); its normalisation is kept.

    Returns:
        A summary: best_val_road_iou, best_epoch, epochs, steps, minutes, stopped (why), the
        split, the history (one record per epoch) and the checkpoint path.

    Raises:
        InputError: bad tiles or settings. OutputError: ``out_path`` exists and neither
        ``resume`` nor ``overwrite`` was given. CheckpointError: unusable state to resume.
    """
    started = time.monotonic()
    out_path = Path(out_path)
    init_meta = check_init(init, config, "base") if init is not None else None
    state = open_state(out_path, resume, overwrite, statistics=True)
    device_ = resolve_device(device)
    train_pairs, val_pairs = choose_split(tiles, val_tiles, val_fraction, seed, config, state)

    bands, nodata = list(config["bands"]), config.get("nodata")
    log.info("loading %d training and %d validation tiles", len(train_pairs), len(val_pairs))
    loaded = load_tiles(train_pairs + val_pairs, bands, nodata, float(config["road_width"]))
    train_data, val_data = loaded[: len(train_pairs)], loaded[len(train_pairs) :]
    if sum(int(t.valid.sum()) for t in val_data) == 0:
        raise InputError("the validation tiles hold no valid pixel (all nodata?)")
    if state is not None:
        mean, std = state["mean"], state["std"]
    elif init_meta is not None:
        mean, std = init_meta["mean"], init_meta["std"]
    else:
        mean, std = band_statistics(train_data)

    meta: dict[str, Any] = {
        "kind": "base",
        "architecture": config["architecture"],
        "arguments": config["arguments"],
        "bands": bands,
        "tile_size": int(config["tile_size"]),
        "mean": mean,
        "std": std,
        "gsd": config.get("gsd"),
        "nodata": nodata,
        "input_dtype": str(train_data[0].image.dtype),
        "output": "logits",
    }
    torch.manual_seed(seed)
    model = Predictor(build_base(config["architecture"], config["arguments"]), meta)
    if init is not None:
        model.net.load_state_dict(load_model(init, "base").net.state_dict())
    dice_weight, lovasz_weight = float(config["dice_weight"]), float(config["lovasz_weight"])

    def loss(model: Predictor, batch: list[torch.Tensor]) -> torch.Tensor:
        image, label, valid = batch
        return base_loss(model.logits(image), label, valid, dice_weight, lovasz_weight)

    def validate(model: Predictor, autocast) -> float:
        window, batch = int(config["tile_size"]), int(config["val_batch"])
        return road_confusion(model, val_data, window, batch, autocast).road_iou

    split, trained_on = split_record(train_pairs, val_pairs, seed, config)
    if init is not None:
        trained_on["init"] = {"file": Path(init).name, "sha256": file_sha256(init)}
    length = int(config["steps_per_epoch"]) * int(config["batch_size"])
    run = Run(
        model,
        meta,
        RandomCrops(train_data, int(config["crop"]), length, seed),
        loss,
        validate,
        split,
        trained_on,
        {"mean": mean, "std": std},
        pretrained=init is not None,
    )
    return fit(run, config, out_path, state, started, max_minutes, device_, half, progress)

"""Training loops. ``train_base`` trains a segmentation-models-pytorch base model on labelled tiles.

The loop is small on purpose: Adam, ReduceLROnPlateau on the validation road IoU, early
stopping, AMP on CUDA, a resumable state file beside the checkpoint, and a wall-clock cap.
Library code never prints: it logs, and reports progress through an optional callback.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import rasterio
import torch
import yaml

from geoprn.curves import plot_history
from geoprn.data import (
    IMAGE_SUFFIXES,
    BoundaryPatches,
    LabelledTile,
    RandomCrops,
    TilePair,
    band_statistics,
    discover_pairs,
    load_tiles,
)
from geoprn.errors import CheckpointError, InputError, OutputError
from geoprn.inference import autocast_dtype, native_bf16, predict_array, resolve_device
from geoprn.losses import base_loss, masked_bce, prn_loss
from geoprn.metrics import Confusion, confusion
from geoprn.models.base import build_base
from geoprn.models.bpr import BoundaryRefiner, boundary_boxes, boundary_map, upsample
from geoprn.models.checkpoint import (
    file_sha256,
    load_cached,
    load_model,
    read_header,
    save_checkpoint,
)
from geoprn.models.predictor import Predictor
from geoprn.models.prn import PatchRefineNet
from geoprn.pseudo_labels import patch_optimal_labels
from geoprn.train_state import read_state, restore

log = logging.getLogger(__name__)

Progress = Callable[[str, dict[str, Any]], None]
"""``progress(event, info)``; events: ``start`` (total_steps, done_steps), ``step`` (epoch, step,
loss), ``epoch`` (epoch, val_road_iou, best_val_road_iou, lr, minutes); cross-fitting on a
cluster adds ``fold`` (fold, folds, held_out) as each fold finishes."""

DEFAULTS: dict[str, Any] = {
    "kind": "base",
    "tile_size": 512,
    "gsd": None,
    "nodata": None,
    "crop": 256,
    "batch_size": 8,
    "lr": 1e-3,
    "epochs": 30,
    "steps_per_epoch": 100,
    "patience": 8,
    "lr_patience": 3,
    "lr_factor": 0.5,
    "min_lr": 1e-6,
    "dice_weight": 1.0,
    "val_batch": 4,
    "workers": 0,
    "road_width": 4.0,
    "micro_batch": "auto",
}
"""Training settings a config may leave out."""

MODEL_KEYS = ("architecture", "arguments", "bands")


def config_path(name_or_path: str | Path) -> Path:
    """Resolve a config name (``base_unet_mnv2``) in ``geoprn/configs/`` or a path to a YAML file.

    Raises:
        InputError: no such config.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    packaged = resources.files("geoprn") / "configs" / f"{path.stem}.yaml"
    if path.parent == Path(".") and packaged.is_file():
        return Path(str(packaged))
    known = sorted(
        Path(p.name).stem
        for p in (resources.files("geoprn") / "configs").iterdir()
        if p.name.endswith(".yaml")
    )
    raise InputError(f"config {name_or_path!s} not found (packaged configs: {', '.join(known)})")


def load_config(name_or_path: str | Path, **overrides: Any) -> dict[str, Any]:
    """Read a training config and apply ``overrides`` (``None`` values are ignored).

    Raises:
        InputError: missing file, bad YAML, or a config without a model description.
    """
    path = config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path} must hold a mapping of settings")
    config = {**DEFAULTS, **raw, **{k: v for k, v in overrides.items() if v is not None}}
    config["name"] = raw.get("name", path.stem)
    missing = [k for k in MODEL_KEYS if k not in config]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}")
    in_channels = config["arguments"].get("in_channels", 3)
    expected = len(config["bands"]) + (config["kind"] == "bpr")  # BPR also reads the mask
    if in_channels != expected:
        raise InputError(f"{path}: in_channels is {in_channels}, {expected} channels are read")
    for key in ("crop", "batch_size", "epochs", "steps_per_epoch"):
        if int(config[key]) < 1:
            raise InputError(f"{key} must be at least 1, not {config[key]}")
    micro = str(config["micro_batch"])
    if micro != "auto" and not (micro.isdigit() and int(micro) >= 1):
        raise InputError(f"micro_batch must be 'auto' or a whole number of crops, not {micro!r}")
    if micro == "auto":
        memory_cap()  # a bad GEOPRN_TRAIN_MEMORY_MB fails here, before any work
    return config


def split_tiles(
    pairs: Sequence[TilePair], val_fraction: float, seed: int
) -> tuple[list[TilePair], list[TilePair]]:
    """Hold out a seeded fraction (at least one tile) of ``pairs`` for validation.

    Raises:
        InputError: fewer than two tiles, or a fraction outside (0, 1).
    """
    if not 0 < val_fraction < 1:
        raise InputError(f"the validation fraction must lie in (0, 1), not {val_fraction}")
    if len(pairs) < 2:
        raise InputError("at least two labelled tiles are needed (one is held out for validation)")
    ordered = sorted(pairs, key=lambda p: p.name)
    order = np.random.default_rng(seed).permutation(len(ordered))
    n_val = min(max(1, round(val_fraction * len(ordered))), len(ordered) - 1)
    val = sorted((ordered[i] for i in order[:n_val]), key=lambda p: p.name)
    train = sorted((ordered[i] for i in order[n_val:]), key=lambda p: p.name)
    return train, val


def mixed_precision(device: torch.device):
    """Training's mixed precision and gradient scaler: bf16 where the device computes it
    natively (a GPU, or a CPU with AVX512-BF16 or AMX), fp16 with a scaler on older GPUs, else
    fp32. With channels-last tensors, bf16 trains PRN 3.47x faster than fp32 on 2 such CPU
    cores (``benchmarks/train_speed.py``)."""
    if device.type == "cuda" and not native_bf16(device):
        return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
    if native_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16), None
    return nullcontext(), None


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


def state_path(out_path: str | Path) -> Path:
    """The resumable training state kept beside a checkpoint: ``<out>.state.pt``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".state.pt")


def _describe(pairs: Sequence[TilePair]) -> str:
    names = []
    for pair in pairs:
        folder = pair.image.parent
        if folder.name == "images":
            folder = folder.parent
        names.append("/".join(folder.parts[-2:]))
    return ", ".join(dict.fromkeys(names))


@dataclass
class _Run:
    """What differs between training a base model and a PRN; :func:`_fit` does the rest."""

    model: Predictor
    meta: dict[str, Any]
    dataset: RandomCrops
    loss: Callable[[Predictor, list[torch.Tensor]], torch.Tensor]
    """The loss of one batch (tensors on the device), computed inside autocast."""
    validate: Callable[[Predictor, Any], float]
    """The validation road IoU of the model, given the autocast context."""
    split: dict[str, list[str]]
    trained_on: dict[str, Any]
    extra_state: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    """The model starts from trained weights (``--init``): they are validated before the first
    epoch and kept as the best unless an epoch beats them."""


def _open_state(
    out_path: Path, resume: bool, overwrite: bool, statistics: bool = False
) -> dict[str, Any] | None:
    """Check the output and return the state to resume from (None for a fresh run), checked
    (:func:`geoprn.train_state.read_state`; ``statistics``: it holds band mean and std)."""
    state_file = state_path(out_path)
    if not out_path.name.endswith(".safetensors"):
        raise InputError(f"the output must be a .safetensors file, not {out_path}")
    if resume and not state_file.is_file():
        raise CheckpointError(f"nothing to resume: {state_file} does not exist")
    if not resume and not overwrite and (out_path.exists() or state_file.exists()):
        raise OutputError(
            f"{out_path if out_path.exists() else state_file} exists; pass --resume to continue "
            "that training or --overwrite to start afresh"
        )
    if not resume:
        return None
    return read_state(state_file, statistics)


def as_pairs(sources: Sequence[str | Path | TilePair]) -> list[TilePair]:
    pairs = [s for s in sources if isinstance(s, TilePair)]
    others = [s for s in sources if not isinstance(s, TilePair)]
    return pairs + (discover_pairs(others) if others else [])


def _split(
    tiles: Sequence[str | Path | TilePair],
    val_tiles: Sequence[str | Path | TilePair] | None,
    val_fraction: float,
    seed: int,
    config: dict[str, Any],
    state: dict[str, Any] | None,
) -> tuple[list[TilePair], list[TilePair]]:
    """Training and validation tiles: as recorded in ``state``, as given, or held out."""
    pairs = as_pairs(tiles)
    if state is not None:
        for key in MODEL_KEYS:
            if state["config"].get(key) != config[key]:
                raise InputError(
                    f"cannot resume: the config's {key} differs from the one the state "
                    "was trained with"
                )
        by_name = {p.name: p for p in pairs + (as_pairs(val_tiles) if val_tiles else [])}
        lost = [n for n in state["split"]["train"] + state["split"]["val"] if n not in by_name]
        if lost:
            raise InputError(f"cannot resume: tile {lost[0]} of the recorded split is not given")
        return [by_name[n] for n in state["split"]["train"]], [
            by_name[n] for n in state["split"]["val"]
        ]
    if val_tiles:
        train_pairs, val_pairs = pairs, as_pairs(val_tiles)
        overlap = {p.name for p in train_pairs} & {p.name for p in val_pairs}
        if overlap:
            raise InputError(f"tile {sorted(overlap)[0]} is both a training and a validation tile")
        return train_pairs, val_pairs
    return split_tiles(pairs, val_fraction, seed)


def _trained_on(
    train_pairs: Sequence[TilePair], val_pairs: Sequence[TilePair], seed: int, config: dict
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    split = {"train": [p.name for p in train_pairs], "val": [p.name for p in val_pairs]}
    trained_on = {
        "dataset": _describe([*train_pairs, *val_pairs]),
        "train_tiles": split["train"],
        "val_tiles": split["val"],
        "seed": seed,
        "config": {k: v for k, v in config.items() if k != "kind"},
    }
    return split, trained_on


def write_history_csv(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write one row per epoch (the training history) as CSV."""
    path = Path(path)
    if history:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    return path


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
        resume: continue from ``<out>.state.pt``; split, statistics and model come from it.
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
    state = _open_state(out_path, resume, overwrite, statistics=True)
    device_ = resolve_device(device)
    train_pairs, val_pairs = _split(tiles, val_tiles, val_fraction, seed, config, state)

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
    dice_weight = float(config["dice_weight"])

    def loss(model: Predictor, batch: list[torch.Tensor]) -> torch.Tensor:
        image, label, valid = batch
        return base_loss(model.logits(image), label, valid, dice_weight)

    def validate(model: Predictor, autocast) -> float:
        window, batch = int(config["tile_size"]), int(config["val_batch"])
        return road_confusion(model, val_data, window, batch, autocast).road_iou

    split, trained_on = _trained_on(train_pairs, val_pairs, seed, config)
    if init is not None:
        trained_on["init"] = {"file": Path(init).name, "sha256": file_sha256(init)}
    length = int(config["steps_per_epoch"]) * int(config["batch_size"])
    run = _Run(
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
    return _fit(run, config, out_path, state, started, max_minutes, device_, half, progress)


MAX_SKIPPED = 5
"""Training stops with an error after this many steps in a row whose loss is not finite."""
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


def micro_batch_size(run: _Run, batch: list[torch.Tensor], autocast, setting) -> int:
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


def accumulate_gradients(
    loss_of: Callable[[list[torch.Tensor]], torch.Tensor],
    batch: list[torch.Tensor],
    micro: int,
    autocast=None,
    scaler=None,
) -> torch.Tensor:
    """Backpropagate ``loss_of(batch)`` ``micro`` crops at a time, each part weighted by its
    share of the crops, into the parameters' gradients; returns the batch's loss."""
    loss: torch.Tensor | float = 0.0
    for start in range(0, len(batch[0]), micro):
        part = [t[start : start + micro] for t in batch]
        with autocast or nullcontext():
            part_loss = loss_of(part) * (len(part[0]) / len(batch[0]))
        (scaler.scale(part_loss) if scaler is not None else part_loss).backward()
        loss = loss + part_loss.detach()
    return loss


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor on the device, channels-last when it is an image batch (N, C, H, W)."""
    tensor = tensor.to(device, non_blocking=True)
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


def _fit(
    run: _Run,
    config: dict[str, Any],
    out_path: Path,
    state: dict[str, Any] | None,
    started: float,
    max_minutes: float | None,
    device: torch.device,
    half: bool,
    progress: Progress | None,
) -> dict[str, Any]:
    """The training loop both models share: Adam, ReduceLROnPlateau on the validation road
    IoU, early stopping, AMP on CUDA, a resumable state file, a CSV history and a time cap."""
    notify = progress or (lambda event, info: None)
    state_file = state_path(out_path)
    model = run.model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config["lr"]))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="max",
        factor=float(config["lr_factor"]),
        patience=int(config["lr_patience"]),
        min_lr=float(config["min_lr"]),
    )
    autocast, scaler = mixed_precision(device)
    epoch, steps, best_iou, best_epoch, bad_epochs = 0, 0, -1.0, 0, 0
    history: list[dict[str, Any]] = []
    seconds_before = 0.0
    if state is not None:
        restore(state_file, state, model.net, optimizer, scheduler, scaler)
        epoch, steps = int(state["epoch"]), int(state["steps"])
        best_iou, best_epoch = float(state["best_iou"]), int(state["best_epoch"])
        bad_epochs, history = int(state["bad_epochs"]), list(state["history"])
        seconds_before = float(state["seconds"])
        log.info("resuming after epoch %d (best val road IoU %.4f)", epoch, best_iou)

    steps_per_epoch, batch_size = int(config["steps_per_epoch"]), int(config["batch_size"])
    loader = torch.utils.data.DataLoader(
        run.dataset,
        batch_size=batch_size,
        num_workers=int(config["workers"]),
        pin_memory=device.type == "cuda",
    )

    def save_best() -> None:
        run.meta["trained_on"] = {
            **run.trained_on,
            "epochs": epoch,
            "steps": steps,
            "best_epoch": best_epoch,
            "best_val_road_iou": round(best_iou, 6),
        }
        save_checkpoint(model, run.meta, out_path)

    if state is None:
        state_file.unlink(missing_ok=True)  # --overwrite: never resume from an older run later
    if state is None and run.pretrained:
        model.eval()
        best_iou = run.validate(model, autocast)
        save_best()
        log.info("the initial weights: val road IoU %.4f", best_iou)
    epochs = int(config["epochs"])
    stopped = "epochs"
    notify("start", {"total_steps": epochs * steps_per_epoch, "done_steps": steps})
    if bad_epochs >= int(config["patience"]):
        stopped = "early_stopping"
    last_epoch_seconds = 0.0
    micro: int | None = None
    skipped = 0
    while epoch < epochs and stopped == "epochs":
        epoch_start = time.monotonic()
        run.dataset.set_epoch(epoch)
        model.train()
        losses = []
        for step, batch in enumerate(loader):
            batch = [_to(t, device) for t in batch]
            if micro is None:
                micro = micro_batch_size(run, batch, autocast, config["micro_batch"])
                log.info("%d crop(s) per forward/backward pass, %d per step", micro, len(batch[0]))
            optimizer.zero_grad(set_to_none=True)
            loss = accumulate_gradients(
                lambda part: run.loss(model, part), batch, micro, autocast, scaler
            )
            steps += 1
            if not math.isfinite(float(loss)):  # skip the batch: its update would ruin the weights
                skipped += 1
                log.warning("step %d: the loss is %s, batch skipped", steps, float(loss))
                if skipped >= MAX_SKIPPED:
                    raise InputError(
                        f"the loss was not finite in {skipped} steps in a row (last: step "
                        f"{steps}); lower the lr"
                    )
                continue
            skipped = 0
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            losses.append(float(loss))
            notify("step", {"epoch": epoch + 1, "step": step + 1, "loss": losses[-1]})
        epoch += 1
        model.eval()
        iou = run.validate(model, autocast)
        scheduler.step(iou)
        if iou > best_iou:
            best_iou, best_epoch, bad_epochs = iou, epoch, 0
            save_best()
        else:
            bad_epochs += 1
        last_epoch_seconds = time.monotonic() - epoch_start
        minutes = (time.monotonic() - started) / 60
        record = {
            "epoch": epoch,
            "steps": steps,
            "train_loss": float(np.mean(losses)),
            "val_road_iou": iou,
            "lr": optimizer.param_groups[0]["lr"],
            "minutes": round(minutes + seconds_before / 60, 3),
        }
        history.append(record)
        log.info(
            "epoch %d: steps %d, train loss %.4f, val road IoU %.4f (best %.4f @ %d), lr %.2e",
            epoch,
            steps,
            record["train_loss"],
            iou,
            best_iou,
            best_epoch,
            record["lr"],
        )
        tmp = state_file.with_name(state_file.name + ".tmp")
        torch.save(
            {
                "model": model.net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "epoch": epoch,
                "steps": steps,
                "best_iou": best_iou,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "history": history,
                "split": run.split,
                **run.extra_state,
                "config": dict(config),
                "seconds": seconds_before + time.monotonic() - started,
            },
            tmp,
        )
        tmp.replace(state_file)
        write_history_csv(history, history_path(out_path))
        plot_history(history, curves_path(out_path))
        notify("epoch", {**record, "best_val_road_iou": best_iou})
        if bad_epochs >= int(config["patience"]):
            stopped = "early_stopping"
            break
        if max_minutes is not None:
            elapsed = time.monotonic() - started
            if elapsed + last_epoch_seconds > max_minutes * 60:
                stopped = "max_minutes"
                break
    if half and out_path.exists():
        export_checkpoint(out_path, out_path, half=True)
    minutes = (seconds_before + time.monotonic() - started) / 60
    log.info("stopped (%s): best val road IoU %.4f at epoch %d", stopped, best_iou, best_epoch)
    return {
        "checkpoint": str(out_path),
        "state": str(state_file),
        "history_csv": str(history_path(out_path)),
        "curves_png": str(curves_path(out_path)),
        "best_val_road_iou": best_iou,
        "best_epoch": best_epoch,
        "epochs": epoch,
        "steps": steps,
        "minutes": round(minutes, 2),
        "stopped": stopped,
        "micro_batch": micro,
        "split": run.split,
        "history": history,
    }


def curves_path(out_path: str | Path) -> Path:
    """The PNG of the training curves kept beside a checkpoint: ``<out>.curves.png``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".curves.png")


def history_path(out_path: str | Path) -> Path:
    """The per-epoch CSV log kept beside a checkpoint: ``<out>.log.csv``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".log.csv")


PROBS_GROUP = "probs"


def _cache_path(out_path: Path) -> Path:
    """The base-probability cache kept beside a PRN checkpoint: ``<out>.cache.zarr``."""
    return out_path.with_name(out_path.name + ".cache.zarr")


def base_probabilities(
    tiles: Sequence[LabelledTile],
    cache: str | Path,
    base: str | Path | None = None,
    probs_dir: str | Path | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    precision: str = "auto",
) -> list[np.ndarray]:
    """The base model's road probabilities on each tile, computed once and cached in Zarr.

    With ``base``, each tile is predicted as ``refine`` would predict a scene holding it
    (overlapping 512 windows, blended). With ``probs_dir``, the probabilities of any other
    model are read from ``<probs_dir>/<tile stem>.<ext>`` (float in [0, 1] or uint8 0-255).
    The cache remembers its source: a different base checkpoint (or precision, see
    :func:`geoprn.inference.autocast_dtype`) starts it afresh.

    Returns:
        One (H, W) float32 array per tile.

    Raises:
        InputError: a probability raster is missing or not on its tile's grid.
    """
    import zarr  # only PRN training needs it

    if base is not None:  # checked before the cache is touched: a wrong file wipes nothing
        read_header(base, "base")
        sha = file_sha256(base)
        source = sha + _dtype_tag(device, precision)
        model = load_cached(str(Path(base).resolve()), sha, str(device))  # as refine runs it
    else:
        source = str(Path(probs_dir).resolve())
    group = zarr.open_group(str(cache), mode="a")
    if group.attrs.get("source") != source:
        group = zarr.open_group(str(cache), mode="w")
        group.attrs["source"] = source

    def compute(tile: LabelledTile) -> np.ndarray:
        if base is not None:
            return predict_array(
                model, tile.image, batch_size=batch_size, device=device, precision=precision
            )
        return _read_probability_raster(Path(probs_dir), tile)

    return [
        _cached(group, f"{PROBS_GROUP}/{tile.name}", lambda t=tile: compute(t)) for tile in tiles
    ]


def _dtype_tag(device: torch.device | str, precision: str) -> str:
    """'' for fp32 inference on ``device``, else '_' and the autocast dtype ('_bfloat16'), so
    that caches written in fp32 keep their keys."""
    dtype = autocast_dtype(torch.device(device), precision)
    return "" if dtype is None else "_" + str(dtype).removeprefix("torch.")


def _cached(group, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``group[key]`` of a Zarr cache, computed and stored the first time it is asked for."""
    if key in group:
        return np.asarray(group[key][...])
    values = compute().astype(np.float32)
    group.create_array(key, data=values, chunks=(512, 512))
    return values


def refined_probabilities(
    base_probs: Sequence[np.ndarray],
    names: Sequence[str],
    cache: str | Path,
    prn: str | Path,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    precision: str = "auto",
) -> list[np.ndarray]:
    """A PRN's probabilities on tiles, from their base probabilities, cached in the Zarr group
    of :func:`base_probabilities` (a different PRN file gets its own entries).

    Returns:
        One (H, W) float32 array per tile.
    """
    import zarr

    read_header(prn, "prn")
    sha = file_sha256(prn)
    model = load_cached(str(Path(prn).resolve()), sha, str(device))
    group = zarr.open_group(str(cache), mode="a")
    return [
        _cached(
            group,
            f"refined_{sha[:16]}{_dtype_tag(device, precision)}/{name}",
            lambda p=probs: predict_array(model, p[None], 512, 64, batch_size, device, precision),
        )
        for probs, name in zip(base_probs, names, strict=True)
    ]


def _read_probability_raster(folder: Path, tile: LabelledTile) -> np.ndarray:
    stem = Path(tile.name).stem
    found = [p for p in sorted(folder.glob(f"{stem}.*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise InputError(f"no probability raster for tile {tile.name} in {folder}")
    with rasterio.open(found[0]) as ds:
        if (ds.height, ds.width) != tile.label.shape:
            raise InputError(f"{found[0]} is {ds.width}x{ds.height}, its tile is not")
        data = ds.read(1).astype(np.float32)
        scale = 255.0 if ds.dtypes[0] == "uint8" else 1.0
    return data / scale  # NaN stays: nodata, left out by train_prn


def prn_tile(
    tile: LabelledTile, probs: np.ndarray, patch_size: int, cache: str | Path | None = None
) -> LabelledTile:
    """A PRN training tile: the base probabilities as image, with patch-optimal pseudo-labels.

    The tile is zero-padded (as nodata) to whole patches, so that crops whose origins are
    multiples of ``patch_size`` see the same patch grid the pseudo-labels were made on. With
    ``cache`` (the Zarr group of :func:`base_probabilities`), the pseudo-labels are kept there
    and reused while the tile's labels and valid pixels are unchanged.
    """
    h, w = probs.shape
    pad = ((0, -h % patch_size), (0, -w % patch_size))
    probs, label, valid = np.pad(probs, pad), np.pad(tile.label, pad), np.pad(tile.valid, pad)
    fingerprint = [int(label.sum()), int(valid.sum())]
    key = f"pseudo_p{patch_size}/{tile.name}"
    group = None
    if cache is not None:
        import zarr

        group = zarr.open_group(str(cache), mode="a")
        if key in group and group[key].attrs.get("labels") == fingerprint:
            return LabelledTile(tile.name, probs[None], label, valid, group[key][...])
    pseudo, _ = patch_optimal_labels(probs, label, patch_size, valid)
    if group is not None:
        stored = group.create_array(key, data=pseudo.astype(np.uint8), overwrite=True)
        stored.attrs["labels"] = fingerprint
    return LabelledTile(tile.name, probs[None], label, valid, pseudo)


def check_init(init: str | Path, config: dict[str, Any], kind: str = "prn") -> dict[str, Any]:
    """Fail early unless checkpoint ``init`` is a ``kind`` model of the network ``config``
    builds; returns its header."""
    header = read_header(init, kind)
    if kind == "prn":
        have = {**PatchRefineNet(**header["arguments"]).arguments, "rule": None}
        wanted = {**PatchRefineNet(**config["arguments"]).arguments, "rule": None}
    else:
        have = {"architecture": header["architecture"], **header["arguments"]}
        wanted = {"architecture": config["architecture"], **config["arguments"]}
    if have != wanted:
        raise CheckpointError(
            f"--init {init} is a {kind} with {have}, the config builds one with {wanted}"
        )
    return header


def pooled_road_iou(predictions: Sequence[np.ndarray], truths: Sequence[LabelledTile]) -> float:
    """Road IoU of boolean maps, pooled over the valid pixels of their labelled tiles."""
    pairs = zip(predictions, truths, strict=True)
    return sum((confusion(p, t.label > 0, t.valid) for p, t in pairs), Confusion()).road_iou


def train_prn(
    tiles: Sequence[str | Path | TilePair],
    config: dict[str, Any],
    out_path: str | Path,
    base: str | Path | None = None,
    probs_dir: str | Path | None = None,
    val_fraction: float = 0.2,
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
    """Train a PatchRefineNet for a base model, as the paper does (DESIGN.md).

    The base model's probabilities on the tiles are computed once and cached beside the
    output (``<out>.cache.zarr``) with the tiles' patch-optimal pseudo-labels made from them.
    The tiles should be ones the base model never trained on (``splits.json``'s ``val``).

    Args:
        tiles, config, out_path, val_fraction, val_tiles, seed, resume, overwrite,
            max_minutes, device, half, progress: as for :func:`train_base`.
        base: the base checkpoint whose probabilities PRN learns to refine.
        probs_dir: instead of ``base``, a folder of probability rasters named like the tiles.
        init: a PRN checkpoint of the config's network to start from (fine-tuning, e.g. the
            shipped PRN on your own labels) instead of random weights.

    Returns:
        The summary of :func:`train_base`, plus ``base_val_road_iou``: the base at 0.5 on
        the validation tiles, for comparison.
    """
    started = time.monotonic()
    out_path = Path(out_path)
    if (base is None) == (probs_dir is None):
        raise InputError("give either a base checkpoint (--base) or probabilities (--probs)")
    base_meta = read_header(base, "base") if base is not None else {}
    if init is not None:
        check_init(init, config)
    state = _open_state(out_path, resume, overwrite)
    device_ = resolve_device(device)
    train_pairs, val_pairs = _split(tiles, val_tiles, val_fraction, seed, config, state)
    bands = base_meta.get("bands", [1])
    loaded = load_tiles(
        train_pairs + val_pairs, bands, base_meta.get("nodata"), float(config["road_width"])
    )
    probs = base_probabilities(
        loaded, _cache_path(out_path), base, probs_dir, int(config["val_batch"]), device_
    )
    for tile, p in zip(loaded, probs, strict=True):  # NaN (refine's nodata) is nodata here too
        finite = np.isfinite(p)
        if not finite.all():
            tile.valid &= finite
            np.nan_to_num(p, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    patch = int(config["arguments"]["patch_size"])
    n_train = len(train_pairs)
    cache = _cache_path(out_path)
    train_data = [
        prn_tile(t, p, patch, cache) for t, p in zip(loaded[:n_train], probs, strict=False)
    ]
    val_truth, val_probs = loaded[n_train:], probs[n_train:]
    if sum(int(t.valid.sum()) for t in val_truth) == 0:
        raise InputError("the validation tiles hold no valid pixel (all nodata?)")

    torch.manual_seed(seed)
    net = PatchRefineNet(**config["arguments"])
    meta: dict[str, Any] = {
        "kind": "prn",
        "architecture": "PatchRefineNet",
        "arguments": net.arguments,
        "bands": [1],
        "tile_size": int(config["tile_size"]),
        "patch_size": patch,
        "gsd": base_meta.get("gsd", config.get("gsd")),
        "output": "probability",
        "base": (
            {"sha256": file_sha256(base), "file": Path(base).name}
            if base is not None
            else {"probs": str(probs_dir)}
        ),
    }
    model = Predictor(net, meta)
    if init is not None:
        net.load_state_dict(load_model(init, "prn").net.state_dict())
    window, val_batch = int(config["tile_size"]), int(config["val_batch"])

    def loss(model: Predictor, batch: list[torch.Tensor]) -> torch.Tensor:
        image, label, valid, pseudo = batch
        global_logits, local_logits = model.net.logits(image)
        return prn_loss(global_logits, local_logits, pseudo, label, valid)

    def refined_iou(model: Predictor, autocast) -> float:
        refined = [predict_array(model, p[None], window, 64, val_batch, device_) for p in val_probs]
        return pooled_road_iou([r > 0.5 for r in refined], val_truth)

    base_iou = pooled_road_iou([p > 0.5 for p in val_probs], val_truth)
    log.info("base model on the validation tiles: road IoU %.4f at 0.5", base_iou)
    split, trained_on = _trained_on(train_pairs, val_pairs, seed, config)
    trained_on["base_val_road_iou"] = round(base_iou, 6)
    if init is not None:
        trained_on["init"] = {"file": Path(init).name, "sha256": file_sha256(init)}
    length = int(config["steps_per_epoch"]) * int(config["batch_size"])
    run = _Run(
        model,
        meta,
        RandomCrops(train_data, int(config["crop"]), length, seed, step=patch),
        loss,
        refined_iou,
        split,
        trained_on,
        pretrained=init is not None,
    )
    summary = _fit(run, config, out_path, state, started, max_minutes, device_, half, progress)
    return {**summary, "base_val_road_iou": base_iou}


def train_bpr(
    tiles: Sequence[str | Path | TilePair],
    config: dict[str, Any],
    out_path: str | Path,
    base: str | Path,
    prn: str | Path | None = None,
    val_fraction: float = 0.2,
    val_tiles: Sequence[str | Path | TilePair] | None = None,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    max_minutes: float | None = None,
    device: str = "auto",
    half: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train a Boundary Patch Refinement network on boxes along predicted road boundaries.

    The base model's (and, with ``prn``, PRN's) probabilities on the tiles are computed once
    and cached beside the output (``<out>.cache.zarr``). Training boxes are placed along the
    boundary of the predicted mask with the config's ``nms_iou_train``; each is the image and
    mask patch, upsampled to ``input_size``, with the ground truth under it (cross-entropy;
    nodata left out). Validation: road IoU of the predictions with BPR applied as ``refine``
    applies it (boxes thinned at ``nms_iou``).

    Args:
        tiles, config, out_path, val_fraction, val_tiles, seed, resume, overwrite,
            max_minutes, device, half, progress: as for :func:`train_base`.
        base: the base checkpoint whose predictions BPR refines.
        prn: the PRN checkpoint run after ``base`` (``refine --refiner prn+bpr``).

    Returns:
        The summary of :func:`train_base`, plus ``before_val_road_iou``: the predictions
        without BPR on the validation tiles, for comparison.
    """
    started = time.monotonic()
    out_path = Path(out_path)
    base_meta = read_header(base, "base")
    if prn is not None:
        read_header(prn, "prn")  # before any prediction is computed
    state = _open_state(out_path, resume, overwrite, statistics=True)
    device_ = resolve_device(device)
    train_pairs, val_pairs = _split(tiles, val_tiles, val_fraction, seed, config, state)
    bands = list(config["bands"])
    loaded = load_tiles(
        train_pairs + val_pairs, bands, base_meta.get("nodata"), float(config["road_width"])
    )
    cache, batch = _cache_path(out_path), int(config["val_batch"])
    probs = base_probabilities(loaded, cache, base, batch_size=batch, device=device_)
    if prn is not None:
        probs = refined_probabilities(probs, [t.name for t in loaded], cache, prn, batch, device_)
    n_train = len(train_pairs)
    box, input_size = int(config["box"]), int(config["input_size"])
    boxes = [
        boundary_boxes(
            boundary_map(torch.from_numpy(p > 0.5)[None]), box, config["nms_iou_train"]
        ).numpy()
        for p in probs[:n_train]
    ]
    if state is not None:
        mean, std = state["mean"], state["std"]
    else:
        mean, std = band_statistics(loaded[:n_train])
        mean, std = [*mean, 0.5], [*std, 0.5]  # the mask channel, 0/1

    torch.manual_seed(seed)
    meta: dict[str, Any] = {
        "kind": "bpr",
        "architecture": config["architecture"],
        "arguments": config["arguments"],
        "bands": bands,
        "tile_size": int(config["tile_size"]),
        "mean": mean,
        "std": std,
        "box": box,
        "input_size": input_size,
        "nms_iou": float(config["nms_iou"]),
        "gsd": base_meta.get("gsd", config.get("gsd")),
        "output": "logits",
        "base": {"sha256": file_sha256(base), "file": Path(base).name},
        "prn": None if prn is None else {"sha256": file_sha256(prn), "file": Path(prn).name},
    }
    model = Predictor(build_base(config["architecture"], config["arguments"]), meta)
    val_truth, val_probs = loaded[n_train:], probs[n_train:]

    def loss(model: Predictor, batch: list[torch.Tensor]) -> torch.Tensor:
        patch, label, valid = (upsample(t, input_size) for t in batch)
        return masked_bce(model.logits(patch), (label > 0.5).float(), (valid > 0.5).float())

    def refined_iou(model: Predictor, autocast) -> float:
        refiner = BoundaryRefiner(model, box=box, input_size=input_size, nms_iou=meta["nms_iou"])
        refined = []
        with torch.inference_mode(), autocast:
            for tile, p in zip(val_truth, val_probs, strict=True):
                x = np.concatenate([p[None], tile.image.astype(np.float32)])
                refined.append(refiner(torch.from_numpy(x)[None].to(device_))[0, 0].cpu().numpy())
        return pooled_road_iou([r > 0.5 for r in refined], val_truth)

    before_iou = pooled_road_iou([p > 0.5 for p in val_probs], val_truth)
    log.info("predictions without BPR on the validation tiles: road IoU %.4f", before_iou)
    split, trained_on = _trained_on(train_pairs, val_pairs, seed, config)
    trained_on["before_val_road_iou"] = round(before_iou, 6)
    trained_on["boxes"] = int(sum(len(b) for b in boxes))
    length = int(config["steps_per_epoch"]) * int(config["batch_size"])
    dataset = BoundaryPatches(loaded[:n_train], probs[:n_train], boxes, length, seed)
    run = _Run(
        model, meta, dataset, loss, refined_iou, split, trained_on, {"mean": mean, "std": std}
    )
    summary = _fit(run, config, out_path, state, started, max_minutes, device_, half, progress)
    return {**summary, "before_val_road_iou": before_iou}


def export_checkpoint(src: str | Path, dst: str | Path, half: bool = True) -> Path:
    """Rewrite a checkpoint (e.g. as float16 for shipping); the header is kept as it is."""
    model = load_model(src)
    meta = {k: v for k, v in model.geoprn_meta.items() if k not in ("format", "created")}
    meta.pop("format_version", None)
    meta.pop("geoprn_version", None)
    return save_checkpoint(model, meta, dst, half=half)

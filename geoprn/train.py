"""Training loops. ``train_base`` trains a segmentation-models-pytorch base model on labelled tiles.

The loop is small on purpose: Adam, ReduceLROnPlateau on the validation road IoU, early
stopping, AMP on CUDA, a resumable state file beside the checkpoint, and a wall-clock cap.
Library code never prints: it logs, and reports progress through an optional callback.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from geoprn.data import (
    LabelledTile,
    RandomCrops,
    TilePair,
    band_statistics,
    discover_pairs,
    load_tiles,
)
from geoprn.errors import CheckpointError, InputError, OutputError
from geoprn.losses import base_loss
from geoprn.models.base import build_base
from geoprn.models.checkpoint import load_model, save_checkpoint
from geoprn.models.predictor import Predictor

log = logging.getLogger(__name__)

Progress = Callable[[str, dict[str, Any]], None]
"""``progress(event, info)``; events: ``start`` (total_steps, done_steps), ``step`` (epoch, step,
loss), ``epoch`` (epoch, val_road_iou, best_val_road_iou, lr, minutes)."""

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
    if in_channels != len(config["bands"]):
        raise InputError(
            f"{path}: in_channels is {in_channels} but {len(config['bands'])} bands are read"
        )
    for key in ("crop", "batch_size", "epochs", "steps_per_epoch"):
        if int(config[key]) < 1:
            raise InputError(f"{key} must be at least 1, not {config[key]}")
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


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU.

    Raises:
        InputError: CUDA asked for but not available, or an unknown device.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but no CUDA device is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r} (use auto, cpu or cuda)") from None


def _autocast(device: torch.device):
    if device.type != "cuda":
        return nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


@torch.inference_mode()
def road_confusion(
    model: Predictor,
    tiles: Sequence[LabelledTile],
    window: int = 512,
    batch_size: int = 4,
    autocast=None,
) -> tuple[int, int, int]:
    """Pooled road TP, FP, FN of ``model`` at probability 0.5 over the valid pixels of ``tiles``.

    Each tile is reflect-padded to a multiple of ``window`` and predicted in non-overlapping
    windows.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tp = fp = fn = 0
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
        pred = pred[:h, :w][tile.valid]
        truth = tile.label[tile.valid].astype(bool)
        tp += int(np.count_nonzero(pred & truth))
        fp += int(np.count_nonzero(pred & ~truth))
        fn += int(np.count_nonzero(~pred & truth))
    model.train(was_training)
    return tp, fp, fn


def road_iou(tp: int, fp: int, fn: int) -> float:
    """TP / (TP + FP + FN); 0 when there is neither road nor prediction."""
    union = tp + fp + fn
    return tp / union if union else 0.0


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
        device: ``auto``, ``cpu`` or ``cuda``. CUDA trains with autocast (bf16 or fp16).
        half: store the final checkpoint's weights as float16 (shipped weights).
        progress: callback, see :data:`Progress`.

    Returns:
        A summary: best_val_road_iou, best_epoch, epochs, steps, minutes, stopped (why), the
        split and the checkpoint path.

    Raises:
        InputError: bad tiles or settings. OutputError: ``out_path`` exists and neither
        ``resume`` nor ``overwrite`` was given. CheckpointError: unusable state to resume.
    """
    started = time.monotonic()
    notify = progress or (lambda event, info: None)
    out_path, state_file = Path(out_path), state_path(out_path)
    if not out_path.name.endswith(".safetensors"):
        raise InputError(f"the output must be a .safetensors file, not {out_path}")
    if resume and not state_file.is_file():
        raise CheckpointError(f"nothing to resume: {state_file} does not exist")
    if not resume and not overwrite and (out_path.exists() or state_file.exists()):
        raise OutputError(
            f"{out_path if out_path.exists() else state_file} exists; pass --resume to continue "
            "that training or --overwrite to start afresh"
        )
    device_ = resolve_device(device)

    def as_pairs(sources):
        pairs = [s for s in sources if isinstance(s, TilePair)]
        others = [s for s in sources if not isinstance(s, TilePair)]
        return pairs + (discover_pairs(others) if others else [])

    pairs = as_pairs(tiles)
    state = None
    if resume:
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable state is one clear error
            raise CheckpointError(f"cannot read {state_file}: {exc}") from None
        for key in MODEL_KEYS:
            if state["config"][key] != config[key]:
                raise InputError(
                    f"cannot resume: the config's {key} differs from the one {state_file} "
                    "was trained with"
                )
        by_name = {p.name: p for p in pairs + (as_pairs(val_tiles) if val_tiles else [])}
        lost = [n for n in state["split"]["train"] + state["split"]["val"] if n not in by_name]
        if lost:
            raise InputError(f"cannot resume: tile {lost[0]} of the recorded split is not given")
        train_pairs = [by_name[n] for n in state["split"]["train"]]
        val_pairs = [by_name[n] for n in state["split"]["val"]]
    elif val_tiles:
        train_pairs, val_pairs = pairs, as_pairs(val_tiles)
        overlap = {p.name for p in train_pairs} & {p.name for p in val_pairs}
        if overlap:
            raise InputError(f"tile {sorted(overlap)[0]} is both a training and a validation tile")
    else:
        train_pairs, val_pairs = split_tiles(pairs, val_fraction, seed)

    bands, nodata = list(config["bands"]), config.get("nodata")
    log.info("loading %d training and %d validation tiles", len(train_pairs), len(val_pairs))
    loaded = load_tiles(train_pairs + val_pairs, bands, nodata)
    train_data, val_data = loaded[: len(train_pairs)], loaded[len(train_pairs) :]
    if sum(int(t.valid.sum()) for t in val_data) == 0:
        raise InputError("the validation tiles hold no valid pixel (all nodata?)")
    if state is not None:
        mean, std = state["mean"], state["std"]
    else:
        mean, std = band_statistics(train_data)
    input_dtype = str(train_data[0].image.dtype)

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
        "input_dtype": input_dtype,
        "output": "logits",
    }

    torch.manual_seed(seed)
    net = build_base(config["architecture"], config["arguments"])
    model = Predictor(net, meta).to(device_)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config["lr"]))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="max",
        factor=float(config["lr_factor"]),
        patience=int(config["lr_patience"]),
        min_lr=float(config["min_lr"]),
    )
    autocast, scaler = _autocast(device_)
    epoch, steps, best_iou, best_epoch, bad_epochs = 0, 0, -1.0, 0, 0
    history: list[dict[str, Any]] = []
    seconds_before = 0.0
    if state is not None:
        model.net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, steps = int(state["epoch"]), int(state["steps"])
        best_iou, best_epoch = float(state["best_iou"]), int(state["best_epoch"])
        bad_epochs, history = int(state["bad_epochs"]), list(state["history"])
        seconds_before = float(state["seconds"])
        log.info("resuming after epoch %d (best val road IoU %.4f)", epoch, best_iou)

    steps_per_epoch, batch_size = int(config["steps_per_epoch"]), int(config["batch_size"])
    dataset = RandomCrops(train_data, int(config["crop"]), steps_per_epoch * batch_size, seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=int(config["workers"]),
        pin_memory=device_.type == "cuda",
    )
    split = {"train": [p.name for p in train_pairs], "val": [p.name for p in val_pairs]}
    trained_on = {
        "dataset": _describe(train_pairs + val_pairs),
        "train_tiles": split["train"],
        "val_tiles": split["val"],
        "seed": seed,
        "config": {k: v for k, v in config.items() if k not in ("kind",)},
    }

    def save_best() -> None:
        meta["trained_on"] = {
            **trained_on,
            "epochs": epoch,
            "steps": steps,
            "best_epoch": best_epoch,
            "best_val_road_iou": round(best_iou, 6),
        }
        save_checkpoint(model, meta, out_path)

    if state is None:
        state_file.unlink(missing_ok=True)  # --overwrite: never resume from an older run later
    epochs = int(config["epochs"])
    stopped = "epochs"
    notify("start", {"total_steps": epochs * steps_per_epoch, "done_steps": steps})
    if bad_epochs >= int(config["patience"]):
        stopped = "early_stopping"
    last_epoch_seconds = 0.0
    while epoch < epochs and stopped == "epochs":
        epoch_start = time.monotonic()
        dataset.set_epoch(epoch)
        model.train()
        losses = []
        for step, (image, label, valid) in enumerate(loader):
            image, label, valid = (t.to(device_, non_blocking=True) for t in (image, label, valid))
            with autocast:
                logits = model.logits(image)
            loss = base_loss(logits, label, valid, float(config["dice_weight"]))
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            steps += 1
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise InputError(f"the loss became {losses[-1]} at step {steps}; lower the lr")
            notify("step", {"epoch": epoch + 1, "step": step + 1, "loss": losses[-1]})
        epoch += 1
        tp, fp, fn = road_confusion(
            model, val_data, int(config["tile_size"]), int(config["val_batch"]), autocast
        )
        iou = road_iou(tp, fp, fn)
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
                "split": split,
                "mean": mean,
                "std": std,
                "config": {k: v for k, v in config.items()},
                "seconds": seconds_before + time.monotonic() - started,
            },
            state_file.with_name(state_file.name + ".tmp"),
        )
        state_file.with_name(state_file.name + ".tmp").replace(state_file)
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
        "best_val_road_iou": best_iou,
        "best_epoch": best_epoch,
        "epochs": epoch,
        "steps": steps,
        "minutes": round(minutes, 2),
        "stopped": stopped,
        "split": split,
        "history": history,
    }


def export_checkpoint(src: str | Path, dst: str | Path, half: bool = True) -> Path:
    """Rewrite a checkpoint (e.g. as float16 for shipping); the header is kept as it is."""
    model = load_model(src)
    meta = {k: v for k, v in model.geoprn_meta.items() if k not in ("format", "created")}
    meta.pop("format_version", None)
    meta.pop("geoprn_version", None)
    return save_checkpoint(model, meta, dst, half=half)

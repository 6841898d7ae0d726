"""The fit loop every trainer shares: Adam, ReduceLROnPlateau on the validation road IoU,
early stopping, mixed precision, a resumable state file beside the checkpoint, a CSV history,
curves and a wall-clock cap. Library code never prints: it logs, and reports progress
through an optional callback (:data:`Progress`)."""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoprn.curves import plot_history
from geoprn.data import (
    RandomCrops,
    TilePair,
    discover_pairs,
)
from geoprn.errors import CheckpointError, InputError, OutputError
from geoprn.inference import native_bf16
from geoprn.models.checkpoint import (
    load_model,
    read_header,
    save_checkpoint,
)
from geoprn.models.predictor import Predictor
from geoprn.models.prn import PatchRefineNet
from geoprn.train.average import MovingAverage
from geoprn.train.memory import micro_batch_size
from geoprn.train.recipes import MODEL_KEYS
from geoprn.train.state import read_state, restore, write_state

log = logging.getLogger(__name__)


Progress = Callable[[str, dict[str, Any]], None]
"""``progress(event, info)``; events: ``start`` (total_steps, done_steps), ``step`` (epoch, step,
loss), ``epoch`` (epoch, val_road_iou, best_val_road_iou, lr, minutes); cross-fitting on a
cluster adds ``fold`` (fold, folds, held_out) as each fold finishes."""


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


def state_path(out_path: str | Path) -> Path:
    """The resumable training state kept beside a checkpoint: ``<out>.state.safetensors``
    (:mod:`geoprn.train.state`)."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".state.safetensors")


def _describe(pairs: Sequence[TilePair]) -> str:
    names = []
    for pair in pairs:
        folder = pair.image.parent
        if folder.name == "images":
            folder = folder.parent
        names.append("/".join(folder.parts[-2:]))
    return ", ".join(dict.fromkeys(names))


@dataclass
class Run:
    """What differs between training a base model and a PRN; :func:`fit` does the rest."""

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


def open_state(
    out_path: Path, resume: bool, overwrite: bool, statistics: bool = False
) -> dict[str, Any] | None:
    """Check the output and return the state to resume from (None for a fresh run), checked
    (:func:`geoprn.train.state.read_state`; ``statistics``: it holds band mean and std)."""
    state_file = state_path(out_path)
    if not out_path.name.endswith(".safetensors"):
        raise InputError(f"the output must be a .safetensors file, not {out_path}")
    if resume and not state_file.is_file():
        earlier = out_path.with_name(out_path.name + ".state.pt")
        hint = (
            f" ({earlier.name}, a torch pickle of geoprn 2026-12-03 and earlier, is not read: "
            f"continue with --init {out_path})"
            if earlier.is_file()
            else ""
        )
        raise CheckpointError(f"nothing to resume: {state_file} does not exist{hint}")
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


def choose_split(
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


def split_record(
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


MAX_SKIPPED = 5
"""Training stops with an error after this many steps in a row whose loss is not finite."""


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


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor on the device, channels-last when it is an image batch (N, C, H, W)."""
    tensor = tensor.to(device, non_blocking=True)
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


def fit(
    run: Run,
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
    IoU, early stopping, AMP on CUDA, a resumable state file, a CSV history and a time cap.
    With ``ema_decay`` in the recipe the moving average of the weights is validated and kept
    (:mod:`geoprn.train.average`)."""
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
    decay = float(config.get("ema_decay", 0.0))
    average = MovingAverage(model.net, decay) if decay > 0 else None
    epoch, steps, best_iou, best_epoch, bad_epochs = 0, 0, -1.0, 0, 0
    history: list[dict[str, Any]] = []
    seconds_before = 0.0
    if state is not None:
        restore(state_file, state, model.net, optimizer, scheduler, scaler)
        if average is not None:
            average.restore(state.get("average"), state_file)
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
            batch = [to_device(t, device) for t in batch]
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
            if average is not None:
                average.update(model.net)
            losses.append(float(loss))
            notify("step", {"epoch": epoch + 1, "step": step + 1, "loss": losses[-1]})
        epoch += 1
        model.eval()
        with average.swapped_into(model.net) if average is not None else nullcontext():
            iou = run.validate(model, autocast)  # the average's, where one is kept
            if iou > best_iou:
                best_iou, best_epoch, bad_epochs = iou, epoch, 0
                save_best()
            else:
                bad_epochs += 1
        scheduler.step(iou)
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
        write_state(
            state_file,
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
                **({"average": average.state()} if average is not None else {}),
                "config": dict(config),
                "seconds": seconds_before + time.monotonic() - started,
            },
        )
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


def export_checkpoint(
    src: str | Path,
    dst: str | Path,
    half: bool = True,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Rewrite a checkpoint (e.g. as float16 for shipping); the header is kept as it is.
    ``weights``: the network's weights to write instead of the checkpoint's own (e.g. the
    moving average a training state holds)."""
    model = load_model(src)
    if weights is not None:
        model.net.load_state_dict(weights)
    meta = {k: v for k, v in model.geoprn_meta.items() if k not in ("format", "created")}
    meta.pop("format_version", None)
    meta.pop("geoprn_version", None)
    return save_checkpoint(model, meta, dst, half=half)

"""Training Boundary Patch Refinement on boxes along the predicted road boundaries."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoprn.data import (
    BoundaryPatches,
    TilePair,
    band_statistics,
    load_tiles,
)
from geoprn.inference import resolve_device
from geoprn.losses import masked_bce
from geoprn.models.base import build_base
from geoprn.models.bpr import (
    BoundaryRefiner,
    boundary_boxes,
    boundary_map,
    recentred,
    upsample,
)
from geoprn.models.checkpoint import (
    file_sha256,
    read_header,
)
from geoprn.models.header import recorded_cut_off
from geoprn.models.predictor import Predictor
from geoprn.train.loop import Progress, Run, choose_split, fit, open_state, split_record
from geoprn.train.prn import base_probabilities, cache_path, pooled_road_iou, refined_probabilities

log = logging.getLogger(__name__)


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
    symmetries: int = 1,
) -> dict[str, Any]:
    """Train a Boundary Patch Refinement network on boxes along predicted road boundaries.

    The base model's (and, with ``prn``, PRN's) probabilities on the tiles are computed once
    and cached beside the output (``<out>.cache.zarr``), then :func:`recentred` at the last
    one's recorded cut-off, as ``refine`` feeds them to BPR. Training boxes are placed along the
    boundary of the predicted mask with the config's ``nms_iou_train``; each is the image and
    mask patch, upsampled to ``input_size``, with the ground truth under it (cross-entropy;
    nodata left out). Validation: road IoU of the predictions with BPR applied as ``refine``
    applies it (boxes thinned at ``nms_iou``).

    Args:
        tiles, config, out_path, val_fraction, val_tiles, seed, resume, overwrite,
            max_minutes, device, half, progress: as for :func:`train_base`.
        base: the base checkpoint whose predictions BPR refines.
        prn: the PRN checkpoint run after ``base`` (``refine --refiner prn+bpr``).
        symmetries: learn on the base model's map averaged over this many window
            symmetries, as ``refine --symmetries`` makes it (recorded in the header).

    Returns:
        The summary of :func:`train_base`, plus ``before_val_road_iou``: the predictions
        without BPR on the validation tiles, for comparison.
    """
    started = time.monotonic()
    out_path = Path(out_path)
    base_meta = read_header(base, "base")
    before_meta = base_meta if prn is None else read_header(prn, "prn")  # before predicting
    state = open_state(out_path, resume, overwrite, statistics=True)
    device_ = resolve_device(device)
    train_pairs, val_pairs = choose_split(tiles, val_tiles, val_fraction, seed, config, state)
    bands = list(config["bands"])
    loaded = load_tiles(
        train_pairs + val_pairs, bands, base_meta.get("nodata"), float(config["road_width"])
    )
    cache, batch = cache_path(out_path), int(config["val_batch"])
    probs = base_probabilities(
        loaded, cache, base, batch_size=batch, device=device_, symmetries=symmetries
    )
    if prn is not None:
        names, images = [t.name for t in loaded], [t.image for t in loaded]
        probs = refined_probabilities(probs, names, cache, prn, batch, device_, images=images)
    at = recorded_cut_off(before_meta)  # BPR sees the mask the previous stage makes
    probs = [recentred(torch.from_numpy(p), at).numpy() for p in probs]
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
        "base": {"sha256": file_sha256(base), "file": Path(base).name}
        | ({"symmetries": symmetries} if symmetries != 1 else {}),
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
    split, trained_on = split_record(train_pairs, val_pairs, seed, config)
    trained_on["before_val_road_iou"] = round(before_iou, 6)
    trained_on["boxes"] = int(sum(len(b) for b in boxes))
    length = int(config["steps_per_epoch"]) * int(config["batch_size"])
    dataset = BoundaryPatches(loaded[:n_train], probs[:n_train], boxes, length, seed)
    run = Run(
        model, meta, dataset, loss, refined_iou, split, trained_on, {"mean": mean, "std": std}
    )
    summary = fit(run, config, out_path, state, started, max_minutes, device_, half, progress)
    return {**summary, "before_val_road_iou": before_iou}

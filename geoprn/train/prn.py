"""Training PatchRefineNet the paper's way: on a base model's probabilities (computed once
and cached in Zarr) with patch-optimal pseudo-labels (DESIGN.md, PRN)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

from geoprn.data import (
    IMAGE_SUFFIXES,
    LabelledTile,
    RandomCrops,
    TilePair,
    load_tiles,
)
from geoprn.errors import InputError
from geoprn.inference import autocast_dtype, predict_array, resolve_device
from geoprn.losses import prn_loss
from geoprn.metrics import Confusion, confusion
from geoprn.models.checkpoint import (
    file_sha256,
    load_cached,
    load_model,
    read_header,
    rewrite_header,
)
from geoprn.models.header import reads_image
from geoprn.models.predictor import Predictor, averaged_over
from geoprn.models.prn import PatchRefineNet
from geoprn.pseudo_labels import THRESHOLDS, patch_optimal_labels
from geoprn.train.loop import Progress, Run, check_init, choose_split, fit, open_state, split_record

log = logging.getLogger(__name__)


PROBS_GROUP = "probs"


def cache_path(out_path: Path) -> Path:
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
    symmetries: int = 1,
) -> list[np.ndarray]:
    """The base model's road probabilities on each tile, computed once and cached in Zarr.

    With ``base``, each tile is predicted as ``refine`` would predict a scene holding it
    (overlapping 512 windows, blended). With ``probs_dir``, the probabilities of any other
    model are read from ``<probs_dir>/<tile stem>.<ext>`` (float in [0, 1] or uint8 0-255).
    The cache remembers its source: a different base checkpoint (or precision, see
    :func:`geoprn.inference.autocast_dtype`, or ``symmetries``, as ``refine --symmetries``)
    starts it afresh.

    Returns:
        One (H, W) float32 array per tile.

    Raises:
        InputError: a probability raster is missing or not on its tile's grid.
    """
    import zarr  # only PRN training needs it

    if base is not None:  # checked before the cache is touched: a wrong file wipes nothing
        read_header(base, "base")
        sha = file_sha256(base)
        source = sha + _cache_tag(device, precision, symmetries)
        model = load_cached(str(Path(base).resolve()), sha, str(device))  # as refine runs it
        model = averaged_over(model, symmetries)
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


def _cache_tag(device: torch.device | str, precision: str, symmetries: int = 1) -> str:
    """What sets a cached map apart beside its model's hash: '_' and the autocast dtype
    ('_bfloat16') unless fp32, then '_sN' when averaged over N symmetries; '' for one fp32
    pass, so that older caches keep their keys."""
    dtype = autocast_dtype(torch.device(device), precision)
    tag = "" if dtype is None else "_" + str(dtype).removeprefix("torch.")
    return tag + f"_s{symmetries}" * (symmetries > 1)


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
    images: Sequence[np.ndarray] | None = None,
    symmetries: int = 1,
) -> list[np.ndarray]:
    """A PRN's probabilities on tiles, from their base probabilities (and their ``images``,
    raw bands, for a PRN that reads the image), cached in the Zarr group of
    :func:`base_probabilities` (a different PRN file gets its own entries); with
    ``symmetries``, averaged over that many symmetries of each window, as the base model.

    Returns:
        One (H, W) float32 array per tile.
    """
    import zarr

    with_image = reads_image(read_header(prn, "prn"))
    if with_image and images is None:
        raise InputError(f"{prn} reads the image beside the probabilities: give the images")
    sha = file_sha256(prn)
    model = load_cached(str(Path(prn).resolve()), sha, str(device))
    model = averaged_over(model, symmetries)
    tag = _cache_tag(device, precision, symmetries)
    group = zarr.open_group(str(cache), mode="a")
    images = images if with_image else [None] * len(base_probs)
    return [
        _cached(
            group,
            f"refined_{sha[:16]}{tag}/{name}",
            lambda p=probs, i=image: predict_array(
                model, prn_input(p, i, with_image), 512, 64, batch_size, device, precision
            ),
        )
        for probs, name, image in zip(base_probs, names, images, strict=True)
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
    tile: LabelledTile,
    probs: np.ndarray,
    patch_size: int,
    cache: str | Path | None = None,
    normalise: tuple[Sequence[float], Sequence[float]] | None = None,
) -> LabelledTile:
    """A PRN training tile: the base probabilities as image, with patch-optimal pseudo-labels.

    With ``normalise`` (the base model's band means and stds), the tile's image bands follow
    the probabilities, normalised as the base model normalises them: the input of a PRN that
    reads the image (:func:`geoprn.models.header.reads_image`).

    The tile is zero-padded (as nodata) to whole patches, so that crops whose origins are
    multiples of ``patch_size`` see the same patch grid the pseudo-labels were made on. With
    ``cache`` (the Zarr group of :func:`base_probabilities`), the pseudo-labels are kept there
    and reused while the tile's labels and valid pixels are unchanged.
    """
    h, w = probs.shape
    pad = ((0, -h % patch_size), (0, -w % patch_size))
    probs, label, valid = np.pad(probs, pad), np.pad(tile.label, pad), np.pad(tile.valid, pad)
    inputs = probs[None]
    if normalise is not None:
        mean, std = (np.asarray(v, np.float32)[:, None, None] for v in normalise)
        image = (np.pad(tile.image.astype(np.float32), ((0, 0), *pad)) - mean) / std
        inputs = np.concatenate([inputs, image])
    fingerprint = [int(label.sum()), int(valid.sum())]
    key = f"pseudo_p{patch_size}/{tile.name}"
    group = None
    if cache is not None:
        import zarr

        group = zarr.open_group(str(cache), mode="a")
        if key in group and group[key].attrs.get("labels") == fingerprint:
            return LabelledTile(tile.name, inputs, label, valid, group[key][...])
    pseudo, _ = patch_optimal_labels(probs, label, patch_size, valid)
    if group is not None:
        stored = group.create_array(key, data=pseudo.astype(np.uint8), overwrite=True)
        stored.attrs["labels"] = fingerprint
    return LabelledTile(tile.name, inputs, label, valid, pseudo)


def prn_input(probs: np.ndarray, image: np.ndarray | None, with_image: bool) -> np.ndarray:
    """A PRN's input in raw units: (1, H, W) probabilities, and after them the image bands
    (C, H, W) for a PRN that reads the image."""
    if not with_image:
        return probs[None]
    return np.concatenate([probs[None], image.astype(np.float32)])


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
    symmetries: int = 1,
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
        symmetries: learn from the base model's map averaged over this many window
            symmetries, as ``refine --symmetries`` makes it (recorded in the header).

    Returns:
        The summary of :func:`train_base`, plus ``base_val_road_iou``: the base at 0.5 on
        the validation tiles, for comparison.
    """
    started = time.monotonic()
    out_path = Path(out_path)
    if (base is None) == (probs_dir is None):
        raise InputError("give either a base checkpoint (--base) or probabilities (--probs)")
    if base is None and symmetries != 1:
        raise InputError("--symmetries averages a base model's passes: --probs has none")
    base_meta = read_header(base, "base") if base is not None else {}
    if init is not None:
        check_init(init, config)
    state = open_state(out_path, resume, overwrite)
    device_ = resolve_device(device)
    train_pairs, val_pairs = choose_split(tiles, val_tiles, val_fraction, seed, config, state)
    bands = base_meta.get("bands", [1])
    loaded = load_tiles(
        train_pairs + val_pairs, bands, base_meta.get("nodata"), float(config["road_width"])
    )
    probs = base_probabilities(
        loaded, cache_path(out_path), base, probs_dir, int(config["val_batch"]), device_,
        symmetries=symmetries,
    )  # fmt: skip
    for tile, p in zip(loaded, probs, strict=True):  # NaN (refine's nodata) is nodata here too
        finite = np.isfinite(p)
        if not finite.all():
            tile.valid &= finite
            np.nan_to_num(p, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    patch = int(config["arguments"]["patch_size"])
    n_train = len(train_pairs)
    cache = cache_path(out_path)
    with_image = reads_image({**config, "kind": "prn"})
    if with_image and len(config["bands"]) != len(bands):
        raise InputError(
            f"the config's PRN reads {len(config['bands'])} image bands beside the "
            f"probabilities, the base model reads {len(bands)}"
        )
    normalise = None
    if with_image:
        normalise = (base_meta.get("mean") or [0.0] * len(bands),
                     base_meta.get("std") or [1.0] * len(bands))  # fmt: skip
    train_data = [
        prn_tile(t, p, patch, cache, normalise)
        for t, p in zip(loaded[:n_train], probs, strict=False)
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
        "bands": list(bands) if with_image else [1],
        "tile_size": int(config["tile_size"]),
        "patch_size": patch,
        "gsd": base_meta.get("gsd", config.get("gsd")),
        "output": "probability",
        "base": (
            {"sha256": file_sha256(base), "file": Path(base).name}
            | ({"symmetries": symmetries} if symmetries != 1 else {})
            if base is not None
            else {"probs": str(probs_dir)}
        ),
    }
    if with_image:  # raw bands in, normalised as the base model normalises them
        meta["mean"], meta["std"] = [0.0, *normalise[0]], [1.0, *normalise[1]]
        if "nodata" in base_meta:
            meta["nodata"] = base_meta["nodata"]
    model = Predictor(net, meta)
    if init is not None:
        net.load_state_dict(load_model(init, "prn").net.state_dict())
    window, val_batch = int(config["tile_size"]), int(config["val_batch"])

    def loss(model: Predictor, batch: list[torch.Tensor]) -> torch.Tensor:
        image, label, valid, pseudo = batch
        global_logits, local_logits = model.net.logits(image)
        return prn_loss(global_logits, local_logits, pseudo, label, valid)

    def val_maps(model: Predictor) -> list[np.ndarray]:
        return [
            predict_array(model, prn_input(p, t.image, with_image), window, 64, val_batch, device_)
            for p, t in zip(val_probs, val_truth, strict=True)
        ]

    def refined_iou(model: Predictor, autocast) -> float:
        return pooled_road_iou([r > 0.5 for r in val_maps(model)], val_truth)

    base_iou = pooled_road_iou([p > 0.5 for p in val_probs], val_truth)
    log.info("base model on the validation tiles: road IoU %.4f at 0.5", base_iou)
    split, trained_on = split_record(train_pairs, val_pairs, seed, config)
    trained_on["base_val_road_iou"] = round(base_iou, 6)
    if init is not None:
        trained_on["init"] = {"file": Path(init).name, "sha256": file_sha256(init)}
    length = int(config["steps_per_epoch"]) * int(config["batch_size"])
    run = Run(
        model,
        meta,
        RandomCrops(train_data, int(config["crop"]), length, seed, step=patch),
        loss,
        refined_iou,
        split,
        trained_on,
        pretrained=init is not None,
    )
    summary = fit(run, config, out_path, state, started, max_minutes, device_, half, progress)
    if not out_path.exists():  # no epoch finished
        return {**summary, "base_val_road_iou": base_iou}
    cut = best_threshold(val_maps(load_model(out_path, "prn", device=device_)), val_truth)
    header = read_header(out_path, "prn")
    header["threshold"] = cut
    rewrite_header(out_path, header)
    log.info("mask cut-off %.2f, best on the validation tiles (refine --threshold auto)", cut)
    return {**summary, "base_val_road_iou": base_iou, "threshold": cut}


def best_threshold(probs: Sequence[np.ndarray], truths: Sequence[LabelledTile]) -> float:
    """The cut-off of :data:`geoprn.pseudo_labels.THRESHOLDS` (0.05 ... 0.95) whose masks
    have the best pooled road IoU on the tiles (ties to the one nearest 0.5)."""
    cuts = sorted((float(t) for t in THRESHOLDS), key=lambda t: abs(t - 0.5))
    return round(max(cuts, key=lambda t: pooled_road_iou([p > t for p in probs], truths)), 2)

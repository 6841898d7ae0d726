"""Cross-fitting: base probabilities for every labelled tile from a base model that never saw it.

The paper trains PRN on a split the base model did not train on. With little labelled data
that leaves PRN few tiles; cross-fitting uses them all: the tiles are dealt into K folds, K
base models each train on K - 1 folds, and each tile's probabilities come from the model
that left its fold out. PRN then trains on those (``train_prn(probs_dir=...)``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from geoprn.data import TilePair, load_tiles
from geoprn.errors import InputError
from geoprn.inference import predict_array, resolve_device
from geoprn.models.checkpoint import load_model
from geoprn.train import Progress, as_pairs, train_base, train_prn

log = logging.getLogger(__name__)


def deal_folds(pairs: Sequence[TilePair], folds: int, seed: int) -> list[list[TilePair]]:
    """Deal the tiles (sorted by name, shuffled by ``seed``) into ``folds`` folds."""
    if not 2 <= folds <= len(pairs):
        raise InputError(f"--folds must lie between 2 and the {len(pairs)} tiles, not {folds}")
    ordered = sorted(pairs, key=lambda p: p.name)
    order = np.random.default_rng(seed).permutation(len(ordered))
    dealt = [order[k::folds] for k in range(folds)]
    return [sorted((ordered[i] for i in fold), key=lambda p: p.name) for fold in dealt]


def crossfit_probabilities(
    tiles: Sequence[str | Path | TilePair],
    base_config: dict[str, Any],
    folds: int,
    workdir: str | Path,
    seed: int = 0,
    device: str = "auto",
    max_minutes: float | None = None,
    progress: Progress | None = None,
) -> Path:
    """Train K base models and write each tile's out-of-fold probabilities.

    Args:
        tiles: labelled-tile sources, as for :func:`geoprn.train.train_base`.
        base_config: the base models' settings (:func:`geoprn.train.load_config`).
        folds: K.
        workdir: where the fold models (``base_fold<k>.safetensors``), the probabilities
            (``probs/<tile stem>.tif``, float32) and ``folds.json`` go. A fold already done
            (its probabilities written) is not trained again: a crashed run resumes.
        seed, device, progress: as for :func:`geoprn.train.train_base`.
        max_minutes: the time cap of each fold's training.

    Returns:
        The folder of probability rasters, for ``train_prn(probs_dir=...)``.
    """
    workdir = Path(workdir)
    probs_dir = workdir / "probs"
    probs_dir.mkdir(parents=True, exist_ok=True)
    dealt = deal_folds(as_pairs(tiles), folds, seed)
    device_ = resolve_device(device)
    manifest = []
    for k, held_out in enumerate(dealt):
        others = [p for j, fold in enumerate(dealt) if j != k for p in fold]
        checkpoint = workdir / f"base_fold{k}.safetensors"
        done = workdir / f"fold{k}.done"
        if not done.is_file():
            log.info("fold %d/%d: training on %d tiles", k + 1, folds, len(others))
            train_base(
                others,
                base_config,
                checkpoint,
                seed=seed,
                overwrite=True,
                max_minutes=max_minutes,
                device=str(device_),
                progress=progress,
            )
            model = load_model(checkpoint, "base", device_)
            meta = model.geoprn_meta
            for tile in load_tiles(held_out, meta["bands"], meta.get("nodata")):
                probs = predict_array(model, tile.image, device=device_)
                _write_probabilities(probs, probs_dir / f"{Path(tile.name).stem}.tif")
            done.write_text("\n".join(p.name for p in held_out))
        manifest.append(
            {"fold": k, "checkpoint": checkpoint.name, "held_out": [p.name for p in held_out]}
        )
    (workdir / "folds.json").write_text(json.dumps(manifest, indent=1))
    return probs_dir


def _write_probabilities(probs: np.ndarray, path: Path) -> None:
    profile = {"driver": "GTiff", "width": probs.shape[1], "height": probs.shape[0], "count": 1}
    with rasterio.open(path, "w", dtype="float32", compress="deflate", **profile) as dst:
        dst.write(probs.astype(np.float32), 1)


def train_prn_crossfit(
    tiles: Sequence[str | Path | TilePair],
    config: dict[str, Any],
    out_path: str | Path,
    base_config: dict[str, Any],
    folds: int,
    seed: int = 0,
    device: str = "auto",
    max_minutes: float | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train PRN on out-of-fold probabilities of K base models (see the module docstring).

    The fold models and probabilities live in ``<out_path>.folds/``; ``options`` go to
    :func:`geoprn.train.train_prn` (``val_fraction``, ``resume``, ``overwrite``, ``half``...).
    """
    workdir = Path(str(out_path) + ".folds")
    probs_dir = crossfit_probabilities(
        tiles, base_config, folds, workdir, seed, device, max_minutes, progress
    )
    summary = train_prn(
        tiles,
        config,
        out_path,
        probs_dir=probs_dir,
        seed=seed,
        device=device,
        max_minutes=max_minutes,
        progress=progress,
        **options,
    )
    return {**summary, "folds": folds, "folds_dir": str(workdir)}

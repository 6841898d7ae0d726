"""Cross-fitting: base probabilities for every labelled tile from a base model that never saw it.

The paper trains PRN on a split the base model did not train on. With little labelled data
that leaves PRN few tiles; cross-fitting uses them all: the tiles are dealt into K folds, K
base models each train on K - 1 folds, and each tile's probabilities come from the model
that left its fold out. PRN then trains on those (``train_prn(probs_dir=...)``).
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from geoprn.cluster import process_cluster
from geoprn.data import TilePair, load_tiles
from geoprn.errors import InputError
from geoprn.inference import predict_array, resolve_device
from geoprn.models.checkpoint import load_model
from geoprn.train import Progress, as_pairs, check_init, train_base, train_prn

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
    fold_workers: int = 1,
    scheduler: str | None = None,
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
        fold_workers: folds trained at once, each in a worker process of a local Dask
            cluster (sharing the device); 1 trains them one after another in this process.
        scheduler: the address of a Dask scheduler whose workers train the folds instead
            (they must see ``tiles`` and ``workdir`` at the same paths).

    Returns:
        The folder of probability rasters, for ``train_prn(probs_dir=...)``.
    """
    workdir = Path(workdir)
    (workdir / "probs").mkdir(parents=True, exist_ok=True)
    dealt = deal_folds(as_pairs(tiles), folds, seed)
    todo = [k for k in range(folds) if not (workdir / f"fold{k}.done").is_file()]
    train = functools.partial(
        train_fold,
        dealt=dealt,
        base_config=base_config,
        workdir=workdir,
        seed=seed,
        device=device,
        max_minutes=max_minutes,
    )
    if scheduler is None and fold_workers == 1:
        for k in todo:
            train(k, progress=progress)
    elif todo:
        from distributed import as_completed

        with process_cluster(scheduler, fold_workers) as client:
            for future in as_completed(client.map(train, todo, pure=False), loop=client.loop):
                k = future.result()
                log.info("fold %d/%d done", k + 1, folds)
                if progress is not None:
                    progress("fold", {"fold": k + 1, "folds": folds, "held_out": len(dealt[k])})
    manifest = [
        {"fold": k, "checkpoint": _checkpoint(workdir, k).name, "held_out": [p.name for p in f]}
        for k, f in enumerate(dealt)
    ]
    (workdir / "folds.json").write_text(json.dumps(manifest, indent=1))
    return workdir / "probs"


def train_fold(
    k: int,
    dealt: list[list[TilePair]],
    base_config: dict[str, Any],
    workdir: Path,
    seed: int,
    device: str,
    max_minutes: float | None,
    progress: Progress | None = None,
) -> int:
    """Train fold ``k``'s base model on the other folds, write the probabilities of the tiles
    it left out and mark the fold done (one task of :func:`crossfit_probabilities`)."""
    others = [p for j, fold in enumerate(dealt) if j != k for p in fold]
    log.info("fold %d/%d: training on %d tiles", k + 1, len(dealt), len(others))
    checkpoint = _checkpoint(workdir, k)
    device_ = resolve_device(device)
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
    for tile in load_tiles(dealt[k], meta["bands"], meta.get("nodata")):
        probs = predict_array(model, tile.image, device=device_)
        _write_probabilities(probs, workdir / "probs" / f"{Path(tile.name).stem}.tif")
    (workdir / f"fold{k}.done").write_text("\n".join(p.name for p in dealt[k]))
    return k


def _checkpoint(workdir: Path, k: int) -> Path:
    return workdir / f"base_fold{k}.safetensors"


def _write_probabilities(probs: np.ndarray, path: Path) -> None:
    profile = {"driver": "GTiff", "width": probs.shape[1], "height": probs.shape[0], "count": 1}
    with warnings.catch_warnings():  # tiles need no georeference (PNG tiles have none)
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
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
    fold_workers: int = 1,
    scheduler: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train PRN on out-of-fold probabilities of K base models (see the module docstring).

    The fold models and probabilities live in ``<out_path>.folds/``; ``fold_workers`` and
    ``scheduler`` are :func:`crossfit_probabilities`'s; ``options`` go to
    :func:`geoprn.train.train_prn` (``val_fraction``, ``resume``, ``overwrite``, ``half``...).
    """
    if options.get("init") is not None:  # before the folds' training, not after
        check_init(options["init"], config)
    workdir = Path(str(out_path) + ".folds")
    probs_dir = crossfit_probabilities(
        tiles,
        base_config,
        folds,
        workdir,
        seed,
        device,
        max_minutes,
        progress,
        fold_workers,
        scheduler,
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

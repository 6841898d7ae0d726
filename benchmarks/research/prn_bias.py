"""Does PRN correct a patch-wise bias where one exists? An end-to-end check of PRN, its
pseudo-labels and its losses, apart from how much bias a real base model happens to have.

A known smooth bias is added to the base model's logits on real tiles: a random field that
varies slowly (Gaussian values on a coarse grid of ``--cell`` px, bicubically interpolated,
times ``--strength``), so some patches are pushed far up or down and others hardly at all.
PRN is trained the paper's way on the biased maps of the ``val`` places (pseudo-labels from
those maps), early-stopped on a share of them, and scored on the biased maps of the ``test``
places, each with its own field, beside the base model at 0.5 on the biased and the clean
maps, the global threshold best on the biased ``val`` maps and the patch-optimal oracle.
"Recovered" is the share of the road IoU the bias cost that a row wins back.

    python benchmarks/research/prn_bias.py                 # prn_tiny, 20 CPU minutes
    python benchmarks/research/prn_bias.py --config prn_lite --max-minutes 60 --sets massachusetts
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from prn_accuracy import (  # noqa: E402
    add_probability_options,
    labelled_probabilities,
    oracle,
    scores,
    split_tiles,
)

from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import resolve_device  # noqa: E402
from geoprn.pseudo_labels import THRESHOLDS  # noqa: E402
from geoprn.train import load_config, refined_probabilities, train_prn  # noqa: E402


def add_bias(probs: np.ndarray, rng: np.random.Generator, strength: float, cell: int) -> np.ndarray:
    """``sigmoid(logit(probs) + field)``: a smooth random field added to the logits, its values
    N(0, strength²) on a grid of ``cell`` px, bicubically interpolated between."""
    h, w = probs.shape
    grid = rng.normal(0.0, strength, size=(1, 1, h // cell + 2, w // cell + 2))
    field = F.interpolate(
        torch.from_numpy(grid), scale_factor=cell, mode="bicubic", align_corners=False
    )[0, 0, :h, :w].numpy()
    p = np.clip(probs.astype(np.float64), 1e-6, 1 - 1e-6)
    return (1 / (1 + np.exp(-(np.log(p / (1 - p)) + field)))).astype(np.float32)


def write_maps(maps, tiles, folder: Path) -> None:
    """Probability rasters named like the tiles' images (what ``train prn --probs`` reads),
    NaN where the image has no data."""
    folder.mkdir(parents=True, exist_ok=True)
    for m, t in zip(maps, tiles, strict=True):
        m = np.where(t.valid, m, np.nan).astype(np.float32)
        profile = {"driver": "GTiff", "width": m.shape[1], "height": m.shape[0], "count": 1}
        with rasterio.open(
            folder / f"{Path(t.name).stem}.tif", "w", dtype="float32", **profile
        ) as d:
            d.write(m, 1)


def biased_split(args, split: str, seed: int):
    """Tiles of ``split`` over the sets, their clean and biased base probabilities."""
    tiles, clean, biased = [], [], []
    rng = np.random.default_rng(seed)
    for dataset in args.sets.split(","):
        ns = argparse.Namespace(**{**vars(args), "dataset": dataset})
        t, p = labelled_probabilities(ns, [split])
        tiles += t
        clean += p
        biased += [add_bias(x, rng, args.strength, args.cell) for x in p]
    return tiles, clean, biased


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probability_options(parser, "test")
    parser.add_argument("--sets", default="massachusetts,massachusetts_crops")
    parser.add_argument("--config", default="prn_tiny")
    parser.add_argument("--strength", type=float, default=2.0, help="field s.d. in logits")
    parser.add_argument("--cell", type=int, default=128, help="grid spacing of the field, px")
    parser.add_argument("--max-minutes", type=float, default=20.0)
    parser.add_argument("--lr", type=float, help="override the config's learning rate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.device = resolve_device(args.device)
    started = time.perf_counter()
    val, _, val_biased = biased_split(args, "val", args.seed)
    test, test_clean, test_biased = biased_split(args, args.split, args.seed + 1)
    with tempfile.TemporaryDirectory() as folder:
        probs_dir, out = Path(folder) / "biased", Path(folder) / "prn.safetensors"
        write_maps(val_biased, val, probs_dir)
        pairs = [p for d in args.sets.split(",") for p in split_tiles(d, "val")]
        summary = train_prn(
            pairs,
            load_config(args.config, lr=args.lr),
            out,
            probs_dir=probs_dir,
            val_fraction=0.2,
            seed=args.seed,
            max_minutes=args.max_minutes,
            device=str(args.device),
        )
        refined = refined_probabilities(
            test_biased, [t.name for t in test], Path(folder) / "cache.zarr", out,
            args.batch_size, args.device, args.precision,
        )  # fmt: skip
    tau = max(
        (float(t) for t in THRESHOLDS),
        key=lambda t: scores([p > t for p in val_biased], val)["road IoU"],
    )
    rows = {
        "clean base @ 0.5 (no bias)": scores([p > 0.5 for p in test_clean], test),
        "biased base @ 0.5": scores([p > 0.5 for p in test_biased], test),
        f"biased base @ {tau:.2f} (best global on biased val)": scores(
            [p > tau for p in test_biased], test
        ),
        f"biased base + PRN ({args.config})": scores([r > 0.5 for r in refined], test),
        "patch-optimal oracle on the biased maps": scores(
            [oracle(p, t, 64) for p, t in zip(test_biased, test, strict=True)], test
        ),
    }
    clean, biased = rows["clean base @ 0.5 (no bias)"], rows["biased base @ 0.5"]
    lost = clean["road IoU"] - biased["road IoU"]
    print(
        f"bias: field s.d. {args.strength:g} logits on a {args.cell} px grid; PRN {args.config} "
        f"trained on the biased maps of {len(val)} val places ({summary['epochs']} epochs, "
        f"{summary['minutes']:.1f} min, stopped: {summary['stopped']}, best epoch "
        f"{summary['best_epoch']}); scored on {len(test)} {args.split} places of {args.sets}; "
        f"{time.perf_counter() - started:.0f} s"
    )
    print("\n| | road IoU | mBA | recovered of the bias's loss |\n|---|---|---|---|")
    for name, s in rows.items():
        share = (s["road IoU"] - biased["road IoU"]) / lost if lost > 0 else float("nan")
        cell = "" if name.startswith(("clean", "biased base @ 0.5")) else f"{100 * share:.0f} %"
        print(f"| {name} | {100 * s['road IoU']:.2f} | {100 * s['mBA']:.2f} | {cell} |")


if __name__ == "__main__":
    run_script(main)

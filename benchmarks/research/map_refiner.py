"""Can a network learn, from the base model's probability map alone, corrections that hold on
unseen tiles? A stand-in for PRN that trains on 2 CPU cores.

PRN sees only the base model's probabilities. ``prn_ceiling.py`` showed that per-patch
thresholds chosen from the map's statistics recover next to none of the oracle's room; this
asks the same of pixel-level, shape-aware corrections. A plain U-Net (``--config``, the base
model's own recipe, with the probability map as its one input band) is trained by
``geoprn.train.train_base`` on the shipped base model's probabilities of ``train`` (as
``refine`` computes them, cached like ``prn_accuracy.py``'s) against the ground truth, early
stopping on ``val``, and scored on every split beside the base model at 0.5.

    python benchmarks/research/map_refiner.py --max-minutes 25
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import predict_array, resolve_device
from geoprn.models.checkpoint import load_model
from geoprn.train import load_config, train_base

SPLITS = ("train", "val", "test")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from prn_accuracy import add_probability_options, labelled_probabilities, scores  # noqa: E402

NODATA = 255
"""The probability maps' nodata value: probabilities are stored as round(p * 254)."""


def write_maps(folder: Path, tiles, probs) -> list[np.ndarray]:
    """Each tile's probabilities as a one-band PNG (``images/``, NODATA where the tile has no
    imagery) beside its ground truth (``masks/``); returns the maps as written."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    maps = []
    for tile, p in zip(tiles, probs, strict=True):
        name = f"{Path(tile.name).stem}.png"
        pixels = np.where(tile.valid, np.rint(p * 254), NODATA).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / name)
        Image.fromarray((tile.label > 0).astype(np.uint8) * 255).save(folder / "masks" / name)
        maps.append(pixels)
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probability_options(parser, "test")
    parser.add_argument("--config", default="base_unet_mnv2", help="the U-Net's recipe")
    parser.add_argument("--max-minutes", type=float, default=25.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.device = resolve_device(args.device)
    workdir = Path(tempfile.mkdtemp(prefix="geoprn-map-refiner-"))
    try:
        data = {}
        for split in SPLITS:
            tiles, probs = labelled_probabilities(args, [split])
            data[split] = tiles, probs, write_maps(workdir / split, tiles, probs)
        recipe = load_config(args.config)
        config = load_config(
            args.config,
            bands=[1],
            nodata=NODATA,
            arguments={**recipe["arguments"], "in_channels": 1},
        )
        out = workdir / "map_refiner.safetensors"
        started = time.perf_counter()
        summary = train_base(
            [workdir / "train"],
            config,
            out,
            val_tiles=[workdir / "val"],
            seed=args.seed,
            max_minutes=args.max_minutes,
            device=str(args.device),
        )
        print(
            f"{args.config} on the probability maps of {len(data['train'][0])} train tiles: "
            f"{summary['epochs']} epochs ({summary['steps']} steps) in "
            f"{(time.perf_counter() - started) / 60:.1f} min, best val road IoU "
            f"{summary['best_val_road_iou']:.4f} at epoch {summary['best_epoch']}\n"
        )
        model = load_model(out, "base", args.device)
        print(
            "| split (tiles) | base @ 0.5 road IoU | map refiner | gain "
            "| base mBA | map refiner mBA |"
        )
        print("|---|---|---|---|---|---|")
        for split in SPLITS:
            tiles, probs, maps = data[split]
            refined = [
                predict_array(model, m[None], 512, 64, args.batch_size, args.device, args.precision)
                for m in maps
            ]
            base = scores([p > 0.5 for p in probs], tiles)
            ours = scores([r > 0.5 for r in refined], tiles)
            print(
                f"| {split} ({len(tiles)}) | {100 * base['road IoU']:.2f} "
                f"| {100 * ours['road IoU']:.2f} "
                f"| {100 * (ours['road IoU'] - base['road IoU']):+.2f} "
                f"| {100 * base['mBA']:.2f} | {100 * ours['mBA']:.2f} |"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    run_script(main)

"""Road IoU, mIoU and mBA of the base model and of base + PRN on a labelled split.

Rows, all on the same tiles and valid pixels (white Massachusetts areas are nodata):

- the base model at 0.5;
- the base model at the single best global threshold, chosen on the validation split;
- base + PRN (mean of its two branches, at 0.5);
- the patch-optimal oracle (each 64 x 64 patch at its own best threshold given the truth):
  the upper bound a patch-wise refiner could reach.

Probabilities are computed as ``refine`` computes them (overlapping 512 windows, blended).

    python benchmarks/prn_accuracy.py                        # shipped weights, Massachusetts test
    python benchmarks/prn_accuracy.py --base B.safetensors --prn P.safetensors --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from geoprn.data import discover_pairs, load_tiles
from geoprn.inference import predict_array, resolve_device
from geoprn.metrics import BoundaryCounts, Confusion, evaluate
from geoprn.models.checkpoint import DEFAULT_BASE, DEFAULT_PRN, load_model
from geoprn.pseudo_labels import THRESHOLDS, patch_optimal_labels

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def split_tiles(dataset: str, split: str):
    names = set(json.loads((DATA / "splits.json").read_text())[dataset][split])
    return [p for p in discover_pairs([DATA / dataset / split]) if p.name in names]


def scores(preds, tiles) -> dict[str, float]:
    conf, bnd = Confusion(), BoundaryCounts()
    for pred, tile in zip(preds, tiles, strict=True):
        c, b = evaluate(pred, tile.label > 0, tile.valid)
        conf, bnd = conf + c, bnd + b
    return {"road IoU": conf.road_iou, "mIoU": conf.miou, "mBA": bnd.mba}


def oracle(probs: np.ndarray, tile, patch: int) -> np.ndarray:
    h, w = probs.shape
    pad = ((0, -h % patch), (0, -w % patch))
    labels, _ = patch_optimal_labels(
        np.pad(probs, pad), np.pad(tile.label, pad), patch, np.pad(tile.valid, pad)
    )
    return labels[:h, :w] > 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="massachusetts")
    parser.add_argument("--split", default="test")
    parser.add_argument("--base", default=str(DEFAULT_BASE))
    parser.add_argument("--prn", default=str(DEFAULT_PRN))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    device = resolve_device(args.device)
    base, prn = load_model(args.base, "base", device), load_model(args.prn, "prn", device)
    bands, nodata = base.geoprn_meta["bands"], base.geoprn_meta.get("nodata")
    started = time.perf_counter()

    def base_probs(tiles):
        return [predict_array(base, t.image, 512, 64, args.batch_size, device) for t in tiles]

    val = load_tiles(split_tiles(args.dataset, "val"), bands, nodata)
    val_probs = base_probs(val)
    best_tau = max(
        (float(t) for t in THRESHOLDS),
        key=lambda t: scores([p > t for p in val_probs], val)["road IoU"],
    )
    test = load_tiles(split_tiles(args.dataset, args.split), bands, nodata)
    probs = base_probs(test)
    refined = [
        predict_array(prn, p[None], batch_size=args.batch_size, device=device) for p in probs
    ]
    patch = int(prn.geoprn_meta["patch_size"])
    rows = {
        "base @ 0.5": scores([p > 0.5 for p in probs], test),
        f"base @ {best_tau:.2f} (best global on val)": scores([p > best_tau for p in probs], test),
        "base + PRN @ 0.5": scores([r > 0.5 for r in refined], test),
        f"patch-optimal oracle (P = {patch})": scores(
            [oracle(p, t, patch) for p, t in zip(probs, test, strict=True)], test
        ),
    }
    print(
        f"{args.dataset} {args.split} split, {len(test)} tiles; base {Path(args.base).name}, "
        f"PRN {Path(args.prn).name}; device {device}; {time.perf_counter() - started:.0f} s"
    )
    print("\n| | road IoU | mIoU | mBA |\n|---|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * v:.2f}" for v in s.values()) + " |")


if __name__ == "__main__":
    main()

"""Road IoU, mIoU and mBA of the base model and of base + PRN on a labelled split.

Rows, all on the same tiles and valid pixels (white Massachusetts areas are nodata):

- the base model at 0.5;
- the base model at the single best global threshold, chosen on the validation split;
- base + PRN (mean of its two branches, at 0.5);
- base + BPR and base + PRN + BPR (Boundary Patch Refinement on each 512 window, as
  ``refine --refiner bpr`` / ``prn+bpr`` runs it), with what BPR costs: boxes and seconds
  per km² of imagery;
- the patch-optimal oracle (each 64 x 64 patch at its own best threshold given the truth):
  the upper bound a patch-wise refiner could reach.

Probabilities are computed as ``refine`` computes them (overlapping 512 windows, blended), and
the base and PRN probabilities are cached (``--cache``) so later runs only redo the rest.

    python benchmarks/prn_accuracy.py                        # shipped weights, Massachusetts test
    python benchmarks/prn_accuracy.py --base B.safetensors --prn P.safetensors --device cuda
    python benchmarks/prn_accuracy.py --prn split.safetensors --prn crossfit.safetensors --bpr none

``--prn`` given more than once adds a row per PRN (e.g. one trained on the val split, one
cross-fitted), all on the same base probabilities; BPR runs after the first. ``--prn none
--bpr none`` prints only the base model's rows and the oracle's (quick on any split: how much
room a patch-wise refiner has there).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from geoprn.data import discover_pairs, load_tiles
from geoprn.inference import PRECISIONS, autocast_dtype, predict_array, resolve_device
from geoprn.metrics import BoundaryCounts, Confusion, evaluate
from geoprn.models.bpr import BoundaryRefiner
from geoprn.models.checkpoint import (
    DEFAULT_BASE,
    DEFAULT_BPR,
    DEFAULT_PRN,
    file_sha256,
    load_cached,
    read_header,
)
from geoprn.pseudo_labels import THRESHOLDS, patch_optimal_labels
from geoprn.train import base_probabilities, refined_probabilities

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def split_tiles(dataset: str, split: str):
    names = set(json.loads((DATA / "splits.json").read_text())[dataset][split])
    return [p for p in discover_pairs([DATA / dataset / split]) if p.name in names]


def add_probability_options(parser: argparse.ArgumentParser, split: str) -> None:
    """The options of the scripts that score a base model's cached probabilities on a split."""
    parser.add_argument("--dataset", default="massachusetts")
    parser.add_argument("--split", default=split)
    parser.add_argument("--base", default=str(DEFAULT_BASE))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="as refine's")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--cache",
        help="Zarr cache of the base and PRN probabilities, reused by later runs (default: "
        "geoprn-accuracy-<base hash>.zarr in the temporary folder: one per base model)",
    )


def cache_path(args: argparse.Namespace) -> str:
    """``--cache``, or the default cache of ``--base``: a cache holds one base model's
    probabilities, so another base gets its own instead of replacing it."""
    tag = file_sha256(args.base)[:12]
    return args.cache or str(Path(tempfile.gettempdir()) / f"geoprn-accuracy-{tag}.zarr")


def labelled_probabilities(args: argparse.Namespace, splits: list[str]):
    """The tiles of ``splits`` and the base model's probabilities on them (cached)."""
    header = read_header(args.base, "base")
    pairs = [p for split in splits for p in split_tiles(args.dataset, split)]
    tiles = load_tiles(pairs, header["bands"], header.get("nodata"))
    probs = base_probabilities(
        tiles, cache_path(args), args.base, None, args.batch_size, args.device, args.precision
    )
    return tiles, probs


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


def timed_predictions(
    model, probs, tiles, batch_size, device, precision
) -> tuple[list, float, int]:
    """A window-level refiner (BPR) run as ``refine`` runs it, on each tile's probabilities
    and image: predictions, seconds, boxes."""
    started, model.boxes_seen = time.perf_counter(), 0
    out = [
        predict_array(
            model,
            np.concatenate([p[None], t.image.astype(np.float32)]),
            512,
            64,
            batch_size,
            device,
            precision,
        )
        for p, t in zip(probs, tiles, strict=True)
    ]
    return out, time.perf_counter() - started, model.boxes_seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probability_options(parser, "test")
    parser.add_argument(
        "--prn", action="append", help="repeatable (default: the shipped PRN); 'none': no PRN row"
    )
    parser.add_argument("--patch", type=int, default=64, help="the oracle's patch with --prn none")
    parser.add_argument("--bpr", default=str(DEFAULT_BPR), help="'none' leaves the BPR rows out")
    args = parser.parse_args()
    prns = [] if args.prn == ["none"] else args.prn or [str(DEFAULT_PRN)]
    if not prns and args.bpr != "none":
        parser.error("--prn none needs --bpr none (BPR runs after the first PRN)")
    device = args.device = resolve_device(args.device)
    started = time.perf_counter()
    val, val_probs = labelled_probabilities(args, ["val"])
    best_tau = max(
        (float(t) for t in THRESHOLDS),
        key=lambda t: scores([p > t for p in val_probs], val)["road IoU"],
    )
    test, probs = labelled_probabilities(args, [args.split])
    names = [t.name for t in test]
    patch = int(read_header(prns[0], "prn")["patch_size"]) if prns else args.patch
    rows = {
        "base @ 0.5": scores([p > 0.5 for p in probs], test),
        f"base @ {best_tau:.2f} (best global on val)": scores([p > best_tau for p in probs], test),
    }
    for prn_path in prns:
        refined = refined_probabilities(
            probs, names, cache_path(args), prn_path, args.batch_size, device, args.precision
        )
        label = "PRN" if len(prns) == 1 else f"PRN {Path(prn_path).name}"
        rows[f"base + {label} @ 0.5"] = scores([r > 0.5 for r in refined], test)
    costs = []
    if args.bpr != "none":
        bpr, prn = (load_cached(str(Path(p).resolve()), file_sha256(p), str(device))
                    for p in (args.bpr, prns[0]))  # fmt: skip
        meta = bpr.geoprn_meta
        for name, before in (("base + BPR", None), ("base + PRN + BPR", prn)):
            model = BoundaryRefiner(bpr, before, meta["box"], meta["input_size"], meta["nms_iou"])
            preds, seconds, boxes = timed_predictions(
                model, probs, test, args.batch_size, device, args.precision
            )
            rows[f"{name} @ 0.5"] = scores([r > 0.5 for r in preds], test)
            costs.append((name, seconds, boxes))
    rows[f"patch-optimal oracle (P = {patch})"] = scores(
        [oracle(p, t, patch) for p, t in zip(probs, test, strict=True)], test
    )
    print(
        f"{args.dataset} {args.split} split, {len(test)} tiles; base {Path(args.base).name}, "
        f"PRN {', '.join(Path(p).name for p in prns) or 'none'}, BPR {Path(args.bpr).name}; "
        f"device {device}, "
        f"{autocast_dtype(device, args.precision) or 'fp32'}; "
        f"{time.perf_counter() - started:.0f} s"
    )
    print("\n| | road IoU | mIoU | mBA |\n|---|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * v:.2f}" for v in s.values()) + " |")
    km2 = sum(int(t.valid.sum()) for t in test) * 1e-6  # 1 m pixels
    for name, seconds, boxes in costs:
        print(
            f"{name}: {boxes} BPR boxes on {km2:.2f} km² of imagery, {boxes / km2:.0f} boxes/km², "
            f"{seconds / km2:.1f} s/km² for the refining stage on {device}"
        )


if __name__ == "__main__":
    main()

"""Which rule should turn probabilities into the road mask: one global threshold, hysteresis
(weak pixels kept where they touch strong ones), or a threshold that drops small blobs; on
the base model's map, on its 4- and 8-symmetry averages (``base_tta.py``), and on PRN's map.

Every rule's parameters are chosen on places none of the models trained on (the base model's
``val`` places of every set scored; for PRN, only the val places held out of its training),
by pooled road IoU, and scored on the ``test`` places: gains over the base at 0.5 with the
90 % bootstrap interval over places, for ``massachusetts`` + ``massachusetts_crops`` and for
all sets. The base and PRN maps come from ``prn_accuracy.py``'s cache.

    python benchmarks/research/base_tta.py --cache /work/runs/tta.zarr
    python benchmarks/research/mask_rules.py --tta /work/runs/tta.zarr
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
from skimage.filters import apply_hysteresis_threshold
from skimage.morphology import remove_small_objects

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from base_tta import open_cache, tta_probabilities  # noqa: E402
from prn_accuracy import (  # noqa: E402
    SETS,
    add_probability_options,
    labelled_probabilities,
    per_place,
    print_sets,
)

from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import predict_array, resolve_device  # noqa: E402
from geoprn.models.checkpoint import DEFAULT_PRN, file_sha256, load_cached, read_header  # noqa: E402
from geoprn.models.header import reads_image  # noqa: E402
from geoprn.pseudo_labels import THRESHOLDS  # noqa: E402
from geoprn.train.prn import pooled_road_iou, prn_input  # noqa: E402

TAUS = [round(float(t), 2) for t in THRESHOLDS]
LOWS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4]
HIGHS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
BLOBS = [25, 50, 100, 200, 400, 800]
"""Largest blob dropped (pixels, 8-connected)."""


def threshold(p: np.ndarray, t: float) -> np.ndarray:
    return p > t


def hysteresis(p: np.ndarray, low: float, high: float) -> np.ndarray:
    return apply_hysteresis_threshold(p, low, high)


def without_blobs(p: np.ndarray, t: float, size: int) -> np.ndarray:
    return remove_small_objects(p > t, max_size=size, connectivity=2)


RULES = {
    "threshold": (threshold, [(t,) for t in TAUS]),
    "hysteresis": (hysteresis, [(lo, hi) for lo, hi in itertools.product(LOWS, HIGHS) if lo < hi]),
    "threshold without blobs": (without_blobs, [(t, s) for t in TAUS for s in BLOBS]),
}


def best(rule: str, maps, tiles) -> tuple:
    """The parameters of ``rule`` best in pooled road IoU on ``tiles``."""
    fn, grid = RULES[rule]
    return max(grid, key=lambda params: pooled_road_iou([fn(m, *params) for m in maps], tiles))


def prn_maps(prn: str, base_maps, tiles, device, batch_size) -> list[np.ndarray]:
    model = load_cached(str(Path(prn).resolve()), file_sha256(prn), str(device))
    with_image = reads_image(read_header(prn, "prn"))
    return [
        predict_array(model, prn_input(p, t.image, with_image), 512, 64, batch_size, device)
        for p, t in zip(base_maps, tiles, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probability_options(parser, "test")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--prn", default=str(DEFAULT_PRN), help="'none': no PRN rows")
    parser.add_argument("--tta", help="cache of base_tta.py (computed where missing)")
    parser.add_argument("--rules", default=",".join(RULES))
    args = parser.parse_args()
    args.device = resolve_device(args.device)
    started = time.perf_counter()
    held = set()
    if args.prn != "none":
        held = set((read_header(args.prn, "prn").get("trained_on") or {}).get("val_tiles", []))
    tta = open_cache(args.tta, args.base) if args.tta else None
    tune = {}  # source -> (maps, tiles) of the tuning places
    test = {}  # source -> (maps, tiles) of the test places, set by set
    for dataset in args.sets.split(","):
        ns = argparse.Namespace(**{**vars(args), "dataset": dataset})
        for split, into in (("val", tune), (args.split, test)):
            tiles, probs = labelled_probabilities(ns, [split])
            sources = {"base": probs}
            if tta is not None:
                stacks = tta_probabilities(tta, args.base, tiles, args.device, args.batch_size)
                sources["base, 4 symmetries"] = [s[:4].astype(np.float32).mean(0) for s in stacks]
                sources["base, 8 symmetries"] = [s.astype(np.float32).mean(0) for s in stacks]
                del stacks
            kept = [i for i, t in enumerate(tiles) if split != "val" or t.name in held]
            if args.prn != "none":
                picked = [tiles[i] for i in kept]
                for name in list(sources):
                    sources[f"{name} + PRN"] = prn_maps(
                        args.prn, [sources[name][i] for i in kept], picked, args.device,
                        args.batch_size,
                    )  # fmt: skip
            for name, maps in sources.items():
                chosen = range(len(tiles)) if "PRN" not in name else range(len(kept))
                on = tiles if "PRN" not in name else [tiles[i] for i in kept]
                into.setdefault(name, {}).setdefault(dataset, ([], []))
                into[name][dataset][0].extend(maps[i] for i in chosen)
                into[name][dataset][1].extend(on[i] for i in chosen)
        print(f"{dataset}: loaded, {time.perf_counter() - started:.0f} s", flush=True)

    rows = {d: {} for d in test["base"]}
    for d, (maps, tiles) in test["base"].items():
        rows[d]["base @ 0.5"] = per_place([m > 0.5 for m in maps], tiles)
    for source in tune:
        maps = [m for d in tune[source] for m in tune[source][d][0]]
        tiles = [t for d in tune[source] for t in tune[source][d][1]]
        for rule in args.rules.split(","):
            params = best(rule, maps, tiles)
            fn = RULES[rule][0]
            label = f"{source}: {rule} {', '.join(str(p) for p in params)}"
            tuned = pooled_road_iou([fn(m, *params) for m in maps], tiles)
            print(f"{label}: tuned on {len(tiles)} val places ({100 * tuned:.2f})", flush=True)
            for d, (tmaps, ttiles) in test[source].items():
                rows[d][label] = per_place([fn(m, *params) for m in tmaps], ttiles)
    print(f"{time.perf_counter() - started:.0f} s")

    print_sets(rows)


if __name__ == "__main__":
    run_script(main)

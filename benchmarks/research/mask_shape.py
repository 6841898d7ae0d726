"""Can the default mask's shape be fixed for mBA: small blobs dropped, roads redrawn at one
width?

mBA's background band is the background within 15 px of a road, so a 20-pixel false blob
costs a disc of band 30 px wide, and a road drawn wider or narrower than the labels shifts
it; road IoU hardly sees either. Massachusetts labels are OpenStreetMap centrelines
rasterized about 7 px wide. Each rule takes the default map (the base model averaged over
``--symmetries``, ``prn_accuracy.py``'s cache) at a cut-off, drops 8-connected blobs of at
most ``S`` pixels (``--blobs``; 0 keeps them) and, for a radius ``R`` > 0 (``--radii``),
redraws the mask as the pixels within ``R`` of its skeleton. Every rule is scored on the
``val`` places of ``--tune-sets`` (default: every set, as ``refine`` knows no set); the rules
best by road IoU, by mBA and by their mean are then scored on the ``test`` places against the
base model in one pass at 0.5 and against the default mask: gains with the 90 % bootstrap
interval over places. ``--val-only`` stops before the ``test`` places are read.

    python benchmarks/research/mask_shape.py --symmetries 8 --blobs 0,100,400,1600 \\
        --radii 0,3,4 --val-only
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.morphology import remove_small_objects, skeletonize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from prn_accuracy import (  # noqa: E402
    SETS,
    add_probability_options,
    labelled_probabilities,
    per_place,
    pooled,
    print_sets,
)

from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import resolve_device  # noqa: E402

CRITERIA = {
    "road IoU": lambda s: s["road IoU"],
    "mBA": lambda s: s["mBA"],
    "mean": lambda s: (s["road IoU"] + s["mBA"]) / 2,
}
"""How a rule is chosen on ``val``: pooled road IoU, pooled mBA, or their mean."""


def shaped(probs: np.ndarray, cut: float, blob: int, radius: float) -> np.ndarray:
    """The mask of ``probs`` at ``cut``, blobs of at most ``blob`` pixels dropped, redrawn
    within ``radius`` of its skeleton when ``radius`` > 0."""
    mask = probs > cut
    if blob > 0:
        mask = remove_small_objects(mask, max_size=blob, connectivity=2)
    if radius > 0 and mask.any():
        mask = ndimage.distance_transform_edt(~skeletonize(mask)) <= radius
    return mask


def numbers(text: str, kind=float) -> list:
    """``text``'s ','-separated numbers as ``kind``."""
    return [kind(s) for s in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probability_options(parser, "test")
    parser.set_defaults(symmetries=8)
    parser.add_argument("--cuts", default="0.3,0.35,0.4,0.45")
    parser.add_argument("--blobs", default="0,100,400,1600", help="pixels; 0 keeps every blob")
    parser.add_argument("--radii", default="0,3,4", help="pixels; 0 does not redraw")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--tune-sets", help="sets whose val places choose (default: --sets)")
    parser.add_argument("--val-only", action="store_true", help="stop before reading test")
    args = parser.parse_args()
    try:
        grid = list(itertools.product(numbers(args.cuts), numbers(args.blobs, int),
                                      numbers(args.radii)))  # fmt: skip
    except ValueError:
        parser.error("--cuts, --blobs and --radii take ','-separated numbers")
    sets = args.sets.split(",")
    tune_sets = (args.tune_sets or args.sets).split(",")
    args.device = resolve_device(args.device)
    started = time.perf_counter()
    tune_maps: list = []
    tune_tiles: list = []
    for dataset in tune_sets:
        ns = argparse.Namespace(**{**vars(args), "dataset": dataset})
        tiles, maps = labelled_probabilities(ns, ["val"])
        tune_tiles.extend(tiles)
        tune_maps.extend(maps)
    val = {rule: pooled(*per_place([shaped(m, *rule) for m in tune_maps], tune_tiles))
           for rule in grid}  # fmt: skip
    print(f"val, {len(tune_tiles)} places of {', '.join(tune_sets)}; "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    print("| cut-off | blobs dropped (px) | radius (px) | road IoU | mBA |\n|---|---|---|---|---|")
    for (cut, blob, radius), s in val.items():
        print(f"| {cut:.2f} | {blob} | {radius:g} | {100 * s['road IoU']:.2f} | "
              f"{100 * s['mBA']:.2f} |")  # fmt: skip
    chosen = {name: max(grid, key=lambda r: key(val[r])) for name, key in CRITERIA.items()}
    default = max((r for r in grid if r[1:] == (0, 0)), key=lambda r: val[r]["road IoU"])
    for name, (cut, blob, radius) in chosen.items():
        print(f"best by {name}: cut-off {cut:.2f}, blobs <= {blob} px, radius {radius:g}")
    if args.val_only:
        return

    rules = {f"default mask @ {default[0]:.2f}": default}
    for name, rule in chosen.items():
        rules.setdefault(f"best by {name} on val {rule}", rule)
    rows: dict[str, dict] = {}
    for dataset in sets:
        ns = argparse.Namespace(**{**vars(args), "dataset": dataset})
        tiles, maps = labelled_probabilities(ns, [args.split])
        one = argparse.Namespace(**{**vars(ns), "symmetries": 1})
        one_pass = labelled_probabilities(one, [args.split])[1]
        rows[dataset] = {"base @ 0.5": per_place([m > 0.5 for m in one_pass], tiles)}
        for label, rule in rules.items():
            rows[dataset][label] = per_place([shaped(m, *rule) for m in maps], tiles)
    print(f"base {args.base}, {args.symmetries} symmetries; {time.perf_counter() - started:.0f} s")
    print_sets(rows)
    print(f"\nThe same rules, place by place against {next(iter(rules))}:")
    print_sets(rows, reference=next(iter(rules)))


if __name__ == "__main__":
    run_script(main)

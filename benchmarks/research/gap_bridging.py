"""Can bridging the gaps of the default mask recover roads it misses (a road under trees,
a faint stretch), and lift mBA, whose background band weighs such misses most?

The default map (``--symmetries``, cut at the cut-off its road IoU on ``val`` picks) is
thinned to its centre lines (``skimage.morphology.skeletonize``). From each end of a line
that does not touch the tile edge, a straight bridge is tried to the nearest pixel of each
other line within ``R`` pixels and ``ANGLE`` degrees of the way the line runs; the bridge
whose pixels have the highest mean probability is drawn, as wide as the mask's roads
(median width on its centre lines), if that mean is at least ``p``. ``R`` and ``p`` are
chosen on the ``val`` places of all sets (mean of pooled road IoU and mBA), then scored on
the ``test`` places against the base at 0.5 and, place by place, against the default mask.
Maps come from ``prn_accuracy.py``'s cache.

    python benchmarks/research/gap_bridging.py --symmetries 8
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.draw import line
from skimage.morphology import disk, skeletonize

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
from geoprn.train.prn import best_threshold  # noqa: E402

RADII = (40, 80, 120)
MIN_PROBABILITIES = (0.02, 0.05, 0.1, 0.2)
ANGLE = 35.0
"""Degrees a bridge may turn from the way its line runs at the end it leaves."""
TAIL = 8
"""Pixels of a line, back from its end, that say which way it runs."""


def bridges(probs: np.ndarray, skeleton: np.ndarray) -> dict[int, list[tuple[float, np.ndarray]]]:
    """For each radius of :data:`RADII`, each line end's best bridge on the mask's centre
    lines ``skeleton``: (mean probability, (n, 2) pixels), as the module docstring says."""
    neighbours = ndimage.convolve(skeleton.astype(np.uint8), np.ones((3, 3), np.uint8))
    ends = np.argwhere(skeleton & (neighbours == 2))
    lines, _ = ndimage.label(skeleton, np.ones((3, 3)))
    points = np.argwhere(skeleton)
    owner = lines[points[:, 0], points[:, 1]]
    h, w = skeleton.shape
    found: dict[int, list[tuple[float, np.ndarray]]] = {r: [] for r in RADII}
    for end in ends:
        if min(end[0], end[1], h - 1 - end[0], w - 1 - end[1]) < TAIL:
            continue  # the road runs off the tile
        own = lines[end[0], end[1]]
        offsets = points - end
        distance = np.hypot(offsets[:, 0], offsets[:, 1])
        tail = (owner == own) & (distance <= TAIL)
        heading = end - points[tail].mean(0)
        if not np.any(heading):
            continue
        heading = heading / np.hypot(*heading)
        cosine = offsets @ heading / np.maximum(distance, 1e-9)
        ahead = (owner != own) & (distance <= max(RADII)) & (cosine >= np.cos(np.radians(ANGLE)))
        candidates = []
        for other in np.unique(owner[ahead]):
            pick = np.flatnonzero(ahead & (owner == other))
            target = points[pick[np.argmin(distance[pick])]]
            rows, cols = line(end[0], end[1], target[0], target[1])
            candidates.append((distance[pick].min(), probs[rows, cols].mean(), rows, cols))
        for radius in RADII:
            within = [c for c in candidates if c[0] <= radius]
            if within:
                _, mean, rows, cols = max(within, key=lambda c: c[1])
                found[radius].append((float(mean), np.stack([rows, cols], 1)))
    return found


def half_width(mask: np.ndarray, skeleton: np.ndarray) -> int:
    """The median distance from the mask's centre lines to its edge, in pixels (>= 1)."""
    if not skeleton.any():
        return 1
    return max(1, round(float(np.median(ndimage.distance_transform_edt(mask)[skeleton]))))


def bridged(mask: np.ndarray, found, width: int, min_probability: float) -> np.ndarray:
    """``mask`` with the bridges whose mean probability is at least ``min_probability``."""
    drawn = np.zeros_like(mask)
    for mean, pixels in found:
        if mean >= min_probability:
            drawn[pixels[:, 0], pixels[:, 1]] = True
    if not drawn.any():
        return mask
    return mask | ndimage.binary_dilation(drawn, disk(width - 1)) if width > 1 else mask | drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probability_options(parser, "test")
    parser.add_argument("--sets", default=",".join(SETS))
    args = parser.parse_args()
    args.device = resolve_device(args.device)
    started = time.perf_counter()
    maps: dict[tuple[str, str], tuple] = {}
    for dataset in args.sets.split(","):
        ns = argparse.Namespace(**{**vars(args), "dataset": dataset})
        for split in ("val", args.split):
            maps[dataset, split] = labelled_probabilities(ns, [split])
    val_tiles = [t for (_, s), (tiles, _) in maps.items() if s == "val" for t in tiles]
    val_probs = [p for (_, s), (_, probs) in maps.items() if s == "val" for p in probs]
    cut = best_threshold(val_probs, val_tiles)
    print(f"cut-off {cut:.2f} (road IoU on {len(val_tiles)} val places)", flush=True)

    def bridged_sets(split: str) -> dict[str, tuple[list, dict]]:
        """Per set of ``split``: its tiles, and each (R, p)'s masks; (0, 0): no bridges."""
        out = {}
        for (dataset, s), (tiles, probs) in maps.items():
            if s != split:
                continue
            masks: dict[tuple[int, float], list] = {(0, 0.0): []}
            for probs_one in probs:
                mask = probs_one > cut
                skeleton = skeletonize(mask)
                found, width = bridges(probs_one, skeleton), half_width(mask, skeleton)
                masks[0, 0.0].append(mask)
                for radius, p in itertools.product(RADII, MIN_PROBABILITIES):
                    masks.setdefault((radius, p), []).append(bridged(mask, found[radius], width, p))
            out[dataset] = (tiles, masks)
        print(f"{split}: bridges in {time.perf_counter() - started:.0f} s", flush=True)
        return out

    val = bridged_sets("val")
    choices = {}
    for key in val[next(iter(val))][1]:
        counted = [per_place(masks[key], tiles) for tiles, masks in val.values()]
        counts = np.concatenate([c for c, _ in counted])
        boundary = np.concatenate([b for _, b in counted])
        choices[key] = pooled(counts, boundary)
        s = choices[key]
        print(f"val R {key[0]} p {key[1]}: road IoU {100 * s['road IoU']:.2f} "
              f"mBA {100 * s['mBA']:.2f}")  # fmt: skip
    chosen = max((k for k in choices if k[0]), key=lambda k: sum(choices[k].values()) / 2)
    print(f"chosen on val: R {chosen[0]}, p {chosen[1]}")

    test = bridged_sets(args.split)
    default, label = f"default @ {cut:.2f}", f"bridged R {chosen[0]} p {chosen[1]}"
    rows = {}
    for dataset, (tiles, masks) in test.items():
        one = argparse.Namespace(**{**vars(args), "dataset": dataset, "symmetries": 1})
        one_pass = labelled_probabilities(one, [args.split])[1]
        rows[dataset] = {
            "base @ 0.5": per_place([p > 0.5 for p in one_pass], tiles),
            default: per_place(masks[0, 0.0], tiles),
            label: per_place(masks[chosen], tiles),
        }
    print(f"{time.perf_counter() - started:.0f} s")
    print_sets(rows)
    print(f"\nPlace by place against the {default}:")
    print_sets(rows, reference=default)


if __name__ == "__main__":
    run_script(main)

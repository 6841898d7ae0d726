"""Where the default mask's errors lie: near a road both masks hold (its width or position),
or far from any (a road missed outright, or a false one)?

For the base model's map as ``refine`` makes it (``--symmetries``, cut at ``--threshold``),
on the ``test`` places of each set and the sets pooled, every missed road pixel is split by
its distance to the nearest predicted road pixel, and every false road pixel by its distance
to the nearest true road pixel: within ``d`` pixels (the band of mBA, ``geoprn.metrics``) or
beyond. Errors beyond ``d`` are what the background band of mBA counts hardest: a cut-off
or a thinner or wider road does not reach them. The last column counts the roads missed
beyond ``d`` that the map holds a trace of (p > 0.1), which a rule on the map could still
reach. Maps come from ``prn_accuracy.py``'s cache.

    python benchmarks/research/missed_roads.py --symmetries 8 --threshold 0.35
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from prn_accuracy import POOLED, SETS, add_probability_options, labelled_probabilities  # noqa: E402

from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import resolve_device  # noqa: E402
from geoprn.metrics import DEFAULT_D, boundary_band  # noqa: E402

SIGNAL = 0.1
"""A probability a missed pixel must pass to count as one the map holds a trace of."""


def error_split(probs: np.ndarray, cut: float, truth: np.ndarray, valid: np.ndarray, d: float):
    """Valid pixels: [true road, missed within d, missed beyond d, false within d, false
    beyond d, missed beyond d with a probability above ``SIGNAL``] (distances measured inside
    the tile, to the other mask's nearest road pixel)."""
    pred = probs > cut
    missed, false = truth & ~pred & valid, pred & ~truth & valid
    # outside a mask, its complement's band holds the pixels within d of the mask
    far_pred, far_truth = ~boundary_band(~pred, d), ~boundary_band(~truth, d)
    return np.array([
        (truth & valid).sum(),
        (missed & ~far_pred).sum(), (missed & far_pred).sum(),
        (false & ~far_truth).sum(), (false & far_truth).sum(),
        (missed & far_pred & (probs > SIGNAL)).sum(),
    ])  # fmt: skip


def print_row(name: str, counts: np.ndarray) -> None:
    road = max(int(counts[0]), 1)
    cells = [f"{100 * c / road:.1f}" for c in counts[1:]]
    print(f"| {name} | {counts[0]} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probability_options(parser, "test")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--d", type=float, default=DEFAULT_D)
    args = parser.parse_args()
    args.device = resolve_device(args.device)
    totals = {}
    for dataset in args.sets.split(","):
        ns = argparse.Namespace(**{**vars(args), "dataset": dataset})
        tiles, probs = labelled_probabilities(ns, [args.split])
        totals[dataset] = sum(
            error_split(p, args.threshold, t.label > 0, t.valid, args.d)
            for p, t in zip(probs, tiles, strict=True)
        )
    print(
        f"\nbase {Path(args.base).name}, {args.symmetries} symmetries, cut at "
        f"{args.threshold}; errors per 100 true road pixels, split at d = {args.d:g} px\n"
    )
    print("| `test` places | true road pixels | missed, within d of a predicted road | "
          f"missed, beyond d | false, within d of a true road | false, beyond d | "
          f"missed beyond d with p > {SIGNAL} |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for dataset, counts in totals.items():
        print_row(dataset, counts)
    if all(name in totals for name in POOLED):
        print_row(" + ".join(POOLED), sum(totals[name] for name in POOLED))


if __name__ == "__main__":
    run_script(main)

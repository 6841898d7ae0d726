"""The default models against another pair, on the test places of each labelled set: road IoU
and mBA of each, binarised as ``refine --threshold auto`` binarises them (the cut-off the last
model records, else 0.5), and the default's gain with a bootstrap 90 % interval over places.

Used to decide which pair ``refine`` runs by default (``README.md``, Shipped weights).

    python benchmarks/default_pair.py --old-base geoprn/weights/base_default.safetensors \\
        --old-prn none
    python benchmarks/default_pair.py --prn none --old-symmetries 1 \\
        --old-base geoprn/weights/base_all_sets_3.safetensors \\
        --old-prn geoprn/weights/prn_rgb_all3.safetensors    # against the default before
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from prn_accuracy import POOLED, SETS, cache_path, labelled_probabilities, per_place, pooled

from geoprn.errors import run_script
from geoprn.gain import bootstrap_gain
from geoprn.inference import resolve_device
from geoprn.models.checkpoint import DEFAULT_BASE, DEFAULT_PRN, read_header
from geoprn.models.header import recorded_symmetries
from geoprn.train import refined_probabilities


def pair_counts(args, base: str, prn: str | None, dataset: str, symmetries: str):
    """Per-place counts of ``base`` (+ ``prn``) on the set's test places, at its cut-off, the
    base model averaged over ``symmetries`` window symmetries (``auto``: as its checkpoint
    records, as refine runs it)."""
    symmetries = window_symmetries(base, symmetries)
    ns = argparse.Namespace(**{**vars(args), "dataset": dataset, "base": base,
                               "symmetries": symmetries})  # fmt: skip
    tiles, probs = labelled_probabilities(ns, [args.split])
    last = read_header(prn or base)
    if prn is not None:
        probs = refined_probabilities(
            probs, [t.name for t in tiles], cache_path(ns), prn, args.batch_size, args.device,
            args.precision, [t.image for t in tiles],
        )  # fmt: skip
    cut = float(last.get("threshold") or 0.5)
    return per_place([p > cut for p in probs], tiles), cut


def window_symmetries(base: str, symmetries: str) -> int:
    """``symmetries``, or for ``auto`` the number ``base`` records."""
    return recorded_symmetries(read_header(base)) if symmetries == "auto" else int(symmetries)


def label(base: str, prn: str | None, cut: float, symmetries: str) -> str:
    """``base [x N symmetries] + prn @ cut`` by file stems."""
    symmetries = window_symmetries(base, symmetries)
    names = [Path(base).stem + f" x {symmetries} symmetries" * (symmetries > 1)]
    return " + ".join(names + ([Path(prn).stem] if prn else [])) + f" @ {cut:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(DEFAULT_BASE))
    parser.add_argument("--prn", default=str(DEFAULT_PRN), help="'none': the base alone")
    parser.add_argument("--old-base", required=True)
    parser.add_argument("--old-prn", default="none")
    for flag in ("--symmetries", "--old-symmetries"):
        parser.add_argument(flag, choices=("auto", "1", "4", "8"), default="auto",
                            help="window symmetries of that base (auto: its own)")  # fmt: skip
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--split", default="test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cache", default=None, help="as prn_accuracy.py's (one per base)")
    args = parser.parse_args()
    args.device = resolve_device(args.device)
    started = time.perf_counter()
    new, old = (None if p == "none" else p for p in (args.prn, args.old_prn))
    rows = {}
    for name in args.sets.split(","):
        (n, ncut), (o, ocut) = (pair_counts(args, args.base, new, name, args.symmetries),
                                pair_counts(args, args.old_base, old, name,
                                            args.old_symmetries))  # fmt: skip
        rows[name] = (o, n)
    print(
        f"{args.split} places; default {label(args.base, new, ncut, args.symmetries)} against "
        f"{label(args.old_base, old, ocut, args.old_symmetries)}; "
        f"{time.perf_counter() - started:.0f} s\n"
    )
    print(
        "| places | other pair: road IoU | default: road IoU | gain (90 % interval) | "
        "other: mBA | default: mBA | gain (90 % interval) |\n|---|---|---|---|---|---|---|"
    )
    groups = {name: [name] for name in rows}
    if all(name in rows for name in POOLED):
        groups[" + ".join(POOLED)] = list(POOLED)
    groups[f"all {len(rows)} sets"] = list(rows)
    for title, names in groups.items():
        o, n = (tuple(np.concatenate([rows[k][j][i] for k in names]) for i in range(2))
                for j in range(2))  # fmt: skip
        cells = [f"{title} ({len(o[0])})"]
        for i, metric in enumerate(("road IoU", "mBA")):
            gain, lo, hi = bootstrap_gain(o[i], n[i], metric)
            verdict = "" if lo > 0 or hi < 0 else ", no difference"
            cells += [f"{100 * pooled(*o)[metric]:.2f}", f"{100 * pooled(*n)[metric]:.2f}",
                      f"{gain:+.2f} ({lo:+.2f} to {hi:+.2f}{verdict})"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    run_script(main)

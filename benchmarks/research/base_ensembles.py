"""Does averaging the maps of several base models beat the default base model averaged over
its window symmetries alone (a model ensemble at test time)?

Each member is a base checkpoint run as ``refine --symmetries N`` runs it (its maps come from
``prn_accuracy.py``'s cache of that base, computed there if missing). Each mix in ``--mixes``
is a weighted mean of the members' maps; its cut-off is chosen on the ``val`` places of all
sets (pooled road IoU), and it is scored on the ``test`` places against the first member in
one pass at 0.5, then against the first mix: gains with the 90 % bootstrap interval over
places, for ``massachusetts`` + ``massachusetts_crops`` and all sets.

    python benchmarks/research/base_ensembles.py \\
        --member geoprn/weights/base_all_sets_ema.safetensors:8 \\
        --member geoprn/weights/base_all_sets_3.safetensors:8 \\
        --member geoprn/weights/base_default.safetensors:1 \\
        --mixes "1,0,0;1,1,0;1,0,1;2,0,1;1,1,1"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from prn_accuracy import (  # noqa: E402
    SETS,
    add_probability_options,
    labelled_probabilities,
    per_place,
    print_sets,
)

from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import resolve_device  # noqa: E402
from geoprn.models.predictor import SYMMETRIES  # noqa: E402
from geoprn.train.prn import best_threshold, pooled_road_iou  # noqa: E402


def member(text: str) -> tuple[str, int]:
    """``path:symmetries`` as (path, symmetries), for ``--member``."""
    path, _, symmetries = text.rpartition(":")
    if not path or symmetries not in {str(n) for n in SYMMETRIES}:
        raise argparse.ArgumentTypeError(f"expected base.safetensors:N, N in {SYMMETRIES}")
    return path, int(symmetries)


def member_maps(args, member: tuple[str, int], dataset: str, split: str):
    """The tiles of ``split`` and one member's maps on them."""
    path, symmetries = member
    ns = argparse.Namespace(
        **{**vars(args), "dataset": dataset, "base": path, "symmetries": symmetries,
           "cache": None}
    )  # fmt: skip
    return labelled_probabilities(ns, [split])


def mixed(maps: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    """Per place, the weighted mean of the members' maps (members of weight 0 left out)."""
    used = [(w / sum(weights), m) for w, m in zip(weights, maps, strict=True) if w]
    return [sum(w * m[i] for w, m in used) for i in range(len(maps[0]))]


def report_mixes(tune, tune_tiles, test, mixes, names, heading: str, started: float) -> None:
    """Each mix's cut-off chosen on the ``val`` places (pooled road IoU), and the tables of its
    scores on each set's ``test`` places: gains over the first member in one pass at 0.5, then
    over the first mix, place by place. ``heading`` is printed before the tables, with the
    seconds since ``started`` (``time.perf_counter``).

    Args:
        tune: per member, its maps of the ``val`` places ``tune_tiles``.
        test: set -> (its test tiles, per member its maps, the one-pass maps).
        mixes: per mix, a weight per member; ``names``: a name per mix.
    """
    rows: dict[str, dict] = {
        d: {"base @ 0.5": per_place([m > 0.5 for m in one], tiles)}
        for d, (tiles, _, one) in test.items()
    }
    labels = []
    for name, weights in zip(names, mixes, strict=True):
        val_maps = mixed(tune, weights)
        cut = best_threshold(val_maps, tune_tiles)
        labels.append(f"{name} @ {cut:.2f}")
        val_iou = pooled_road_iou([m > cut for m in val_maps], tune_tiles)
        print(f"{labels[-1]}: val road IoU {100 * val_iou:.2f} on {len(tune_tiles)} places")
        for d, (tiles, maps, _) in test.items():
            rows[d][labels[-1]] = per_place([m > cut for m in mixed(maps, weights)], tiles)
    print(f"{heading}; {time.perf_counter() - started:.0f} s")
    print_sets(rows)
    print(f"\nThe same mixes, place by place against the first, {labels[0]}:")
    print_sets(rows, reference=labels[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probability_options(parser, "test")
    parser.add_argument(
        "--member", action="append", required=True, type=member, help="base.safetensors:N"
    )
    parser.add_argument("--mixes", required=True, help="';'-separated weights, one per member")
    parser.add_argument("--sets", default=",".join(SETS))
    args = parser.parse_args()
    try:
        mixes = [[float(w) for w in text.split(",")] for text in args.mixes.split(";")]
    except ValueError:
        mixes = []
    if not mixes or any(len(w) != len(args.member) or min(w) < 0 or sum(w) <= 0 for w in mixes):
        parser.error(f"each mix needs {len(args.member)} weights, >= 0, not all 0")
    args.device = resolve_device(args.device)
    started = time.perf_counter()
    first_one_pass = (args.member[0][0], 1)
    tune_tiles: list = []
    tune: list[list[np.ndarray]] = [[] for _ in args.member]
    test: dict[str, tuple] = {}
    for dataset in args.sets.split(","):
        for split in ("val", args.split):
            pairs = [member_maps(args, m, dataset, split) for m in args.member]
            tiles = pairs[0][0]
            if split == "val":
                tune_tiles.extend(tiles)
                for k, (_, maps) in enumerate(pairs):
                    tune[k].extend(maps)
            else:
                one_pass = member_maps(args, first_one_pass, dataset, split)[1]
                test[dataset] = (tiles, [maps for _, maps in pairs], one_pass)
            print(f"{dataset} {split}: {time.perf_counter() - started:.0f} s", flush=True)

    names = [f"weights {text}" for text in args.mixes.split(";")]
    members = ", ".join(f"{path}:{n}" for path, n in args.member)
    report_mixes(tune, tune_tiles, test, mixes, names, f"members: {members}", started)


if __name__ == "__main__":
    run_script(main)

"""Does averaging the base model over shifted windows, on top of their symmetries, add to the
default map (test-time averaging over translations)?

The base model's strided layers see a window on a grid of 32 pixels; a window that starts a
few pixels earlier puts the same ground on another grid, so its answer differs a little, as a
flipped window's does. For each offset ``s`` in ``--offsets``, every 512 window is
reflect-padded by ``s`` pixels above and left (and ``32 - s`` below and right, to keep the
grid), run averaged over ``--symmetries`` as ``refine`` runs it, and cropped back; offset 0 is
the default map itself (``prn_accuracy.py``'s cache). Maps of offsets > 0 are cached in
``--cache``. Each mix in ``--mixes`` averages the maps of some offsets; its cut-off is chosen
on the ``val`` places of all sets (pooled road IoU), and it is scored on the ``test`` places
against the base model in one pass at 0.5, then against the first mix: gains with the 90 %
bootstrap interval over places, for ``massachusetts`` + ``massachusetts_crops`` and all sets.
The first mix's ``val`` road IoU and mBA are also printed at a few cut-offs.

    python benchmarks/research/base_shifts.py --symmetries 8 --offsets 0,16 \\
        --mixes "0;16;0,16" --cache /work/runs/shifts.zarr
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from base_ensembles import mixed, report_mixes  # noqa: E402
from base_tta import cached_maps, open_cache  # noqa: E402
from prn_accuracy import (  # noqa: E402
    SETS,
    add_probability_options,
    labelled_probabilities,
    per_place,
    pooled,
)

from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import resolve_device  # noqa: E402
from geoprn.models.checkpoint import file_sha256, load_cached  # noqa: E402
from geoprn.models.predictor import SymmetryMean  # noqa: E402

GRID = 32
"""The base model's largest stride: an offset of it or more repeats a smaller one."""
CUTS = (0.25, 0.3, 0.35, 0.4, 0.45)
"""Cut-offs at which the first mix's val road IoU and mBA are printed."""


class ShiftedWindow(nn.Module):
    """``model`` on each window moved ``offset`` pixels down and right in a reflect-padded
    frame, cropped back: the same ground on another grid of the strided layers."""

    def __init__(self, model: nn.Module, offset: int):
        super().__init__()
        self.model, self.offset = model, offset
        self.geoprn_meta = model.geoprn_meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, (h, w) = self.offset, x.shape[-2:]
        out = self.model(F.pad(x, (s, GRID - s, s, GRID - s), mode="reflect"))
        return out[..., s : s + h, s : s + w]


def shifted_maps(args, group, tiles, offset: int) -> list[np.ndarray]:
    """Per tile, the base model's map at ``offset`` (cached in ``group``)."""

    def make_model():
        base = load_cached(str(Path(args.base).resolve()), file_sha256(args.base), str(args.device))
        return ShiftedWindow(SymmetryMean(base, args.symmetries), offset)

    prefix = f"s{args.symmetries}/offset{offset}"
    return cached_maps(group, prefix, make_model, tiles, args.device, args.batch_size,
                       args.precision)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probability_options(parser, "test")
    parser.set_defaults(symmetries=8)
    parser.add_argument("--offsets", default="0,16", help="','-separated, in [0, 32)")
    parser.add_argument("--mixes", required=True, help="';'-separated sets of offsets")
    parser.add_argument("--sets", default=",".join(SETS))
    args = parser.parse_args()
    try:
        offsets = [int(s) for s in args.offsets.split(",")]
        mixes = [[int(s) for s in text.split(",")] for text in args.mixes.split(";")]
    except ValueError:
        parser.error("--offsets and --mixes take whole numbers of pixels")
    if any(not 0 <= s < GRID for s in offsets) or any(set(m) - set(offsets) for m in mixes):
        parser.error(f"offsets lie in [0, {GRID}) and each mix uses only --offsets")
    args.device = resolve_device(args.device)
    group = open_cache(args.cache, args.base)
    args.cache = None  # prn_accuracy's own caches for offset 0 and the one-pass map
    started = time.perf_counter()
    tune_tiles: list = []
    tune: dict[int, list[np.ndarray]] = {s: [] for s in offsets}
    test: dict[str, tuple] = {}
    for dataset in args.sets.split(","):
        ns = argparse.Namespace(**{**vars(args), "dataset": dataset})
        for split in ("val", args.split):
            tiles, default = labelled_probabilities(ns, [split])
            maps = {s: default if s == 0 else shifted_maps(ns, group, tiles, s) for s in offsets}
            if split == "val":
                tune_tiles.extend(tiles)
                for s in offsets:
                    tune[s].extend(maps[s])
            else:
                one = argparse.Namespace(**{**vars(ns), "symmetries": 1})
                by_offset = [maps[s] for s in offsets]
                test[dataset] = (tiles, by_offset, labelled_probabilities(one, [split])[1])
            print(f"{dataset} {split}: {time.perf_counter() - started:.0f} s", flush=True)

    first = mixed([tune[s] for s in mixes[0]], [1.0] * len(mixes[0]))
    print(f"offsets {args.mixes.split(';')[0]}, val scores by cut-off:")
    for t in CUTS:
        score = pooled(*per_place([m > t for m in first], tune_tiles))
        print(f"  {t:.2f}: road IoU {100 * score['road IoU']:.2f}, mBA {100 * score['mBA']:.2f}")
    weights = [[float(s in mix) for s in offsets] for mix in mixes]
    names = [f"offsets {text}" for text in args.mixes.split(";")]
    heading = f"base {args.base}, {args.symmetries} symmetries"
    report_mixes([tune[s] for s in offsets], tune_tiles, test, weights, names, heading, started)


if __name__ == "__main__":
    run_script(main)

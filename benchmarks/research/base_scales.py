"""Does the base model, averaged over window symmetries, gain from being run at more than one
scale of each window too (test-time scale averaging)?

Each 512 window is resampled by a factor ``s`` (bilinear, antialiased when shrunk), the base
model averaged over its 8 window symmetries runs on it, and its map is resampled back to the
window, as ``refine`` would run it. The map of each scale is cached per place (float16, Zarr,
``--scale-cache``). Then every mix of scales in ``--mixes`` is the mean of its scales' maps; its
cut-off is chosen on the ``val`` places of all sets (pooled road IoU), and it is scored on the
``test`` places against the base model in one pass at 0.5: gains with the 90 % bootstrap
interval over places, for ``massachusetts`` + ``massachusetts_crops`` and all sets.

    python benchmarks/research/base_scales.py --scale-cache /work/runs/scales.zarr
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
from base_tta import cached_maps, open_cache  # noqa: E402
from prn_accuracy import (  # noqa: E402
    SETS,
    add_probability_options,
    labelled_probabilities,
    per_place,
    print_sets,
)

from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import resolve_device  # noqa: E402
from geoprn.models.checkpoint import file_sha256, load_cached  # noqa: E402
from geoprn.models.predictor import SymmetryMean  # noqa: E402
from geoprn.pseudo_labels import THRESHOLDS  # noqa: E402
from geoprn.train.prn import pooled_road_iou  # noqa: E402

TAUS = [round(float(t), 2) for t in THRESHOLDS]


def resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` (N, C, H, W) resampled bilinearly to ``size``, antialiased where it shrinks."""
    shrinks = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinks)


class ScaleMean(nn.Module):
    """A model's probabilities averaged over passes on each window resampled by each of
    ``scales`` (a side of ``n`` pixels becomes the multiple of 32 nearest ``s * n``, as the
    U-Net needs), each map resampled back to the window."""

    def __init__(self, model: nn.Module, scales: tuple[float, ...]):
        super().__init__()
        self.model, self.scales = model, tuple(map(float, scales))
        self.geoprn_meta = model.geoprn_meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        total = torch.zeros((x.shape[0], 1, h, w), dtype=torch.float32, device=x.device)
        for s in self.scales:
            size = (max(32, round(h * s / 32) * 32), max(32, round(w * s / 32) * 32))
            if size == (h, w):
                total += self.model(x).float()
            else:
                total += resample(self.model(resample(x, size)).float(), (h, w))
        return total / len(self.scales)


def scale_maps(group, base: str, scale: float, symmetries: int, tiles, device, batch_size):
    """Per tile, the base model's map with each window run at ``scale`` (cached)."""

    def make_model():
        model = load_cached(str(Path(base).resolve()), file_sha256(base), str(device))
        return SymmetryMean(ScaleMean(model, (scale,)), symmetries)

    return cached_maps(group, f"s{scale:g}_{symmetries}", make_model, tiles, device, batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probability_options(parser, "test")
    parser.add_argument("--scale-cache", required=True, help="Zarr cache of the scales' maps")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--scales", default="1,0.75,1.5,2")
    parser.add_argument("--scale-symmetries", type=int, default=8)
    parser.add_argument("--mixes", default="1;1,0.75;1,1.5;1,2;1,1.5,2;0.75,1,1.5")
    args = parser.parse_args()
    args.device = resolve_device(args.device)
    started = time.perf_counter()
    group = open_cache(args.scale_cache, args.base)
    scales = [float(s) for s in args.scales.split(",")]
    tune: dict[float, list] = {s: [] for s in scales}
    tune_tiles = []
    test: dict[str, dict] = {}
    for dataset in args.sets.split(","):
        ns = argparse.Namespace(**{**vars(args), "dataset": dataset, "symmetries": 1})
        for split in ("val", args.split):
            tiles, probs = labelled_probabilities(ns, [split])
            maps = {
                s: scale_maps(group, args.base, s, args.scale_symmetries, tiles, args.device,
                              args.batch_size)
                for s in scales
            }  # fmt: skip
            if split == "val":
                tune_tiles.extend(tiles)
                for s in scales:
                    tune[s].extend(maps[s])
            else:
                test[dataset] = {"tiles": tiles, "base": probs, **maps}
            print(f"{dataset} {split}: {time.perf_counter() - started:.0f} s", flush=True)

    rows: dict[str, dict] = {d: {} for d in test}
    for d, t in test.items():
        rows[d]["base @ 0.5"] = per_place([m > 0.5 for m in t["base"]], t["tiles"])
    for text in args.mixes.split(";"):
        mix = [float(s) for s in text.split(",")]
        val_maps = [np.mean([tune[s][i] for s in mix], axis=0) for i in range(len(tune_tiles))]
        scored = {t: pooled_road_iou([m > t for m in val_maps], tune_tiles) for t in TAUS}
        cut = max(scored, key=scored.get)
        label = f"scales {text} x {args.scale_symmetries} symmetries @ {cut}"
        print(f"{label}: val road IoU {100 * scored[cut]:.2f} on {len(tune_tiles)} places")
        for d, t in test.items():
            maps = [np.mean([t[s][i] for s in mix], axis=0) for i in range(len(t["tiles"]))]
            rows[d][label] = per_place([m > cut for m in maps], t["tiles"])
    print(f"{time.perf_counter() - started:.0f} s")

    print_sets(rows)


if __name__ == "__main__":
    run_script(main)

"""PRN end to end where a patch-wise bias exists (issue 18, point 6; a small version of
``benchmarks/research/prn_bias.py``): a known smooth field added to the shipped base model's
logits on real Massachusetts crops, PRN trained the paper's way on the biased ``val`` maps,
scored on biased ``test`` maps it never saw. It must win back a real share of what the bias
cost, and more than the best global threshold does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from geoprn.data import discover_pairs, load_tiles
from geoprn.pseudo_labels import THRESHOLDS
from geoprn.train import (
    base_probabilities,
    load_config,
    pooled_road_iou,
    refined_probabilities,
    train_prn,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "research"))
from prn_bias import add_bias, write_maps  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BASE = Path(__file__).resolve().parents[1] / "geoprn" / "weights" / "base_default.safetensors"
CROPS = DATA / "massachusetts_crops"
pytestmark = pytest.mark.skipif(not CROPS.is_dir(), reason="needs ../shared/data")


def crops(split: str, n: int):
    names = sorted(json.loads((DATA / "splits.json").read_text())["massachusetts_crops"][split])
    pairs = {p.name: p for p in discover_pairs([CROPS / split])}
    return [pairs[name] for name in names[:n]]


def biased(pairs, cache: Path, seed: int):
    tiles = load_tiles(pairs, [1, 2, 3])
    clean = base_probabilities(tiles, cache, BASE, batch_size=4, device="cpu")
    rng = np.random.default_rng(seed)
    return tiles, [add_bias(p, rng, strength=4.0, cell=256) for p in clean]


@pytest.mark.slow
def test_prn_wins_back_a_bias_a_global_threshold_cannot(tmp_path):
    val_pairs, test_pairs = crops("val", 130), crops("test", 41)  # every crop of both splits
    val, val_maps = biased(val_pairs, tmp_path / "base.zarr", seed=0)
    test, test_maps = biased(test_pairs, tmp_path / "base.zarr", seed=1)
    write_maps(val_maps, val, tmp_path / "biased")
    config = load_config("prn_tiny")
    config.update(epochs=4, patience=10)  # 4 x 50 steps of 8 crops: PRN needs > 100 steps here
    summary = train_prn(
        val_pairs, config, tmp_path / "prn.safetensors", probs_dir=tmp_path / "biased",
        val_fraction=0.2, seed=0, device="cpu",
    )  # fmt: skip
    refined = refined_probabilities(
        test_maps, [t.name for t in test], tmp_path / "cache.zarr", tmp_path / "prn.safetensors",
        4, "cpu", "auto",
    )  # fmt: skip
    clean_test = base_probabilities(test, tmp_path / "base.zarr", BASE, batch_size=4)
    iou = lambda maps, tau=0.5: pooled_road_iou([m > tau for m in maps], test)  # noqa: E731
    tau = max(
        (float(t) for t in THRESHOLDS),
        key=lambda t: pooled_road_iou([m > t for m in val_maps], val),
    )
    lost = iou(clean_test) - iou(test_maps)
    assert lost > 0.05, f"the field should cost road IoU, cost {lost:.3f}"
    recovered_prn = (iou(refined) - iou(test_maps)) / lost
    recovered_global = (iou(test_maps, tau) - iou(test_maps)) / lost
    print(f"recovered: PRN {recovered_prn:.2f}, global {recovered_global:.2f}", summary["epochs"])
    assert recovered_prn > 0.2
    assert recovered_prn > recovered_global + 0.1

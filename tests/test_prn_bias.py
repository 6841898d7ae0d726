"""A small version of ``benchmarks/prn_bias.py``: on real tiles whose base probabilities carry
a known smooth patch-wise bias, PRN trained the paper's way (pseudo-labels, both losses)
wins back part of what the bias cost, on tiles it never saw."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from geoprn.data import discover_pairs, load_tiles
from geoprn.inference import predict_array
from geoprn.metrics import Confusion, confusion
from geoprn.models.checkpoint import DEFAULT_BASE, load_model
from geoprn.train import load_config, refined_probabilities, train_prn

from .conftest import SHARED_DATA, crop_tiles

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from prn_bias import add_bias, write_maps  # noqa: E402

TEST_WINDOWS = {"17278960_15.png": (988, 494), "23428525_15.png": (494, 988)}


def road_iou(maps, tiles) -> float:
    pairs = zip(maps, tiles, strict=True)
    return sum((confusion(m > 0.5, t.label > 0, t.valid) for m, t in pairs), Confusion()).road_iou


@pytest.mark.slow
def test_prn_wins_back_a_known_bias(val_crops, tmp_path):
    base = load_model(DEFAULT_BASE, "base")
    header = base.geoprn_meta

    def biased(folder: Path, seed: int):
        tiles = load_tiles(discover_pairs([folder]), header["bands"], header["nodata"])
        rng = np.random.default_rng(seed)
        probs = [predict_array(base, t.image, batch_size=2) for t in tiles]
        return tiles, probs, [add_bias(p, rng, 3.0, 128) for p in probs]

    train_tiles, _, train_biased = biased(val_crops, 0)
    test_dir = crop_tiles(SHARED_DATA / "massachusetts" / "test", TEST_WINDOWS, tmp_path / "t")
    test_tiles, test_clean, test_biased = biased(test_dir, 1)
    write_maps(train_biased, train_tiles, tmp_path / "probs")
    config = load_config("prn_tiny", crop=256, batch_size=4, steps_per_epoch=8, epochs=12)
    out = tmp_path / "prn.safetensors"
    train_prn([val_crops], config, out, probs_dir=tmp_path / "probs", val_fraction=0.25,
              device="cpu")  # fmt: skip
    refined = refined_probabilities(
        test_biased, [t.name for t in test_tiles], tmp_path / "cache.zarr", out, 2, "cpu"
    )
    clean, before, after = (road_iou(m, test_tiles) for m in (test_clean, test_biased, refined))
    print(f"clean {clean:.4f}, biased {before:.4f}, PRN on biased {after:.4f}")
    assert before < clean - 0.05  # the bias costs road IoU
    assert after > before + 0.25 * (clean - before)  # PRN wins back a quarter of it or more

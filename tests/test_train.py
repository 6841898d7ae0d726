"""Base-model training on real Massachusetts tiles: split, loss, checkpoint, resume, CLI errors."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from click.testing import CliRunner
from rasterio.errors import NotGeoreferencedWarning
from safetensors import safe_open

from geoprn.cli.main import cli
from geoprn.data import RandomCrops, TilePair, band_statistics, discover_pairs, load_tiles
from geoprn.errors import CheckpointError, InputError, OutputError
from geoprn.inference import fast_math
from geoprn.losses import base_loss, masked_bce
from geoprn.models.base import build_base
from geoprn.models.checkpoint import load_model
from geoprn.models.predictor import Predictor
from geoprn.train import (
    export_checkpoint,
    load_config,
    road_confusion,
    split_tiles,
    state_path,
    train_base,
)
from geoprn.train.state import load_state
from tests.conftest import (
    CIL_TRAIN,
    MASS_TRAIN,
    NEEDS_TRAIN_DATA,
    SHARED_DATA,
    SMALL_BASE_RECIPE,
    crop_tiles,
    read_raster,
)

DATA, MASS, CIL = SHARED_DATA, MASS_TRAIN, CIL_TRAIN
# tiles with little white nodata; a 512 x 512 window of each is used to keep the runs short
SOURCES = {
    "19678630_15.png": (600, 500),
    "21328975_15.png": (500, 500),
    "25229185_15.png": (700, 700),
    "18778720_15.png": (500, 900),
}

pytestmark = NEEDS_TRAIN_DATA
read = read_raster


def write_png(path: Path, array: np.ndarray) -> None:
    array = array if array.ndim == 3 else array[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            path,
            "w",
            driver="PNG",
            width=array.shape[2],
            height=array.shape[1],
            count=array.shape[0],
            dtype=array.dtype,
        ) as dst:
            dst.write(array)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """images/ + masks/ with 512 x 512 windows of four real Massachusetts tiles."""
    return crop_tiles(MASS, SOURCES, tmp_path_factory.mktemp("mass512"))


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL_BASE_RECIPE))
    return load_config(path)


@pytest.fixture(scope="module")
def run(tiles, config, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("run") / "base.safetensors"
    return train_base([tiles], config, out, val_fraction=0.25, seed=0, device="cpu")


def test_split_is_seeded_disjoint_and_complete():
    pairs = discover_pairs([MASS])
    train, val = split_tiles(pairs, 0.1, seed=0)
    assert len(val) == 3 and len(train) == 27
    assert {p.name for p in train} | {p.name for p in val} == {p.name for p in pairs}
    assert not {p.name for p in train} & {p.name for p in val}
    assert split_tiles(list(reversed(pairs)), 0.1, seed=0) == (train, val)
    assert split_tiles(pairs, 0.1, seed=1)[1] != val
    with pytest.raises(InputError, match="at least two"):
        split_tiles(pairs[:1], 0.1, seed=0)


def test_training_records_split_and_round_trips(run, tiles, config):
    steps = SMALL_BASE_RECIPE["steps_per_epoch"]
    assert run["epochs"] == 2 and run["steps"] == 2 * steps and len(run["history"]) == 2
    model = load_model(run["checkpoint"], kind="base")
    meta = model.geoprn_meta
    trained_on = meta["trained_on"]
    assert trained_on["val_tiles"] == run["split"]["val"] and len(run["split"]["val"]) == 1
    assert sorted(trained_on["train_tiles"] + trained_on["val_tiles"]) == sorted(SOURCES)
    assert trained_on["best_val_road_iou"] == pytest.approx(run["best_val_road_iou"], abs=1e-6)
    assert meta["bands"] == [1, 2, 3] and meta["gsd"] == 1.0 and meta["output"] == "logits"
    train_pairs = [
        TilePair(tiles / "images" / n, tiles / "masks" / n) for n in trained_on["train_tiles"]
    ]
    mean, std = band_statistics(load_tiles(train_pairs, [1, 2, 3], 255))
    assert np.allclose(meta["mean"], mean) and np.allclose(meta["std"], std)
    # the loaded weights reproduce the validation score recorded for them
    val = load_tiles(
        [TilePair(tiles / "images" / n, tiles / "masks" / n) for n in trained_on["val_tiles"]],
        [1, 2, 3],
        255,
    )
    model = model.to(memory_format=torch.channels_last)  # validated as it trained:
    with fast_math(torch.device("cpu")):  # channels-last, bf16 where the CPU computes it
        iou = road_confusion(model, val).road_iou
    assert iou == pytest.approx(trained_on["best_val_road_iou"], abs=1e-6)


def test_loss_falls(run, tiles, config):
    train_pairs = [
        TilePair(tiles / "images" / n, tiles / "masks" / n) for n in run["split"]["train"]
    ]
    crops = RandomCrops(load_tiles(train_pairs, [1, 2, 3], 255), crop=128, length=8, seed=99)
    image, label, valid = (torch.stack(t) for t in zip(*(crops[i] for i in range(8)), strict=True))
    trained = load_model(run["checkpoint"])
    torch.manual_seed(0)  # the initial weights train_base started from (seed 0)
    initial = Predictor(
        build_base(config["architecture"], config["arguments"]), trained.geoprn_meta
    ).eval()
    with torch.no_grad():
        before, after = (base_loss(m.logits(image), label, valid) for m in (initial, trained))
        bce = [masked_bce(m.logits(image), label, valid) for m in (initial, trained)]
    assert after < 0.9 * before, (before, after)
    assert bce[1] < 0.5 * bce[0], bce
    assert run["best_val_road_iou"] > 0.05, run["history"]  # it found roads on the held-out tile


def test_max_minutes_then_resume_matches_straight_run(run, tiles, config, tmp_path):
    out = tmp_path / "capped.safetensors"
    capped = train_base([tiles], config, out, val_fraction=0.25, max_minutes=0, device="cpu")
    steps = SMALL_BASE_RECIPE["steps_per_epoch"]
    assert capped["stopped"] == "max_minutes" and capped["epochs"] == 1 and capped["steps"] == steps
    assert load_model(out).geoprn_meta["trained_on"]["epochs"] == 1
    with pytest.raises(OutputError, match="--resume"):
        train_base([tiles], config, out, val_fraction=0.25, device="cpu")
    resumed = train_base([tiles], config, out, val_fraction=0.25, resume=True, device="cpu")
    assert resumed["epochs"] == 2 and resumed["steps"] == 2 * steps
    assert resumed["split"] == run["split"]
    assert [h["val_road_iou"] for h in resumed["history"]] == pytest.approx(
        [h["val_road_iou"] for h in run["history"]], abs=1e-4
    )
    # 1 epoch + resume gives the weights of 2 epochs in one go (optimizer and crops restored)
    a = load_state(state_path(out))["model"]
    b = load_state(run["state"])["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train_base([tiles], config, tmp_path / "none.safetensors", resume=True, device="cpu")


def test_half_export(run, tmp_path):
    out = export_checkpoint(run["checkpoint"], tmp_path / "half.safetensors", half=True)
    with safe_open(str(out), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    assert out.stat().st_size < 0.6 * Path(run["checkpoint"]).stat().st_size
    x = torch.from_numpy(read(MASS / "images" / "19678630_15.png")[None, :, :256, :256]).float()
    with torch.no_grad():
        full, half = load_model(run["checkpoint"])(x), load_model(out)(x)
    assert (full - half).abs().max() < 0.02


def invoke(*args: str):
    result = CliRunner().invoke(cli, ["train", "base", *args])
    return result, result.output.strip().splitlines()


def assert_one_line_error(result, lines, match: str) -> None:
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("geoprn: error:"), result.output
    assert match in lines[0]
    assert "Traceback" not in result.output


def test_cli_folder_without_pairs(tmp_path):
    shutil.copy(CIL / "images" / "satImage_003.png", tmp_path / "satImage_003.png")
    result, lines = invoke(str(tmp_path), "-o", str(tmp_path / "m.safetensors"))
    assert_one_line_error(result, lines, "no labelled tiles")


def test_cli_mismatched_sizes(tmp_path):
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for name in ("10978945_15.png", "11278645_15.png"):
        shutil.copy(MASS / "images" / name, tmp_path / "images" / name)
        shutil.copy(CIL / "masks" / "satImage_003.png", tmp_path / "masks" / name)
    result, lines = invoke(str(tmp_path), "-o", str(tmp_path / "m.safetensors"))
    assert_one_line_error(result, lines, "400x400 but its image")


def test_cli_band_count_mismatch(tmp_path):
    image = read(CIL / "images" / "satImage_003.png")
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for name, bands in (("a.png", image), ("b.png", image[:1])):
        write_png(tmp_path / "images" / name, bands)
        shutil.copy(CIL / "masks" / "satImage_003.png", tmp_path / "masks" / name)
    result, lines = invoke(str(tmp_path), "-o", str(tmp_path / "m.safetensors"))
    assert_one_line_error(result, lines, "all tiles must match")


def test_cli_refuses_to_overwrite_and_bad_config(tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    result, lines = invoke(str(MASS), "-o", str(out))
    assert_one_line_error(result, lines, "exists; pass --resume")
    assert out.read_bytes() == b"precious"
    result, lines = invoke(str(MASS), "-o", str(tmp_path / "n.safetensors"), "--resume")
    assert_one_line_error(result, lines, "nothing to resume")
    result, lines = invoke(str(MASS), "-o", str(tmp_path / "n.safetensors"), "--config", "nope")
    assert_one_line_error(result, lines, "config nope not found")
    result, lines = invoke(
        str(MASS), "-o", str(tmp_path / "n.safetensors"), "--lovasz-weight", "-1"
    )
    assert_one_line_error(
        result, lines, "lovasz_weight: Input should be greater than or equal to 0"
    )


def test_cli_trains_and_resumes(tiles, tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump({**SMALL_BASE_RECIPE, "steps_per_epoch": 2}))
    out = tmp_path / "cli.safetensors"
    args = [
        str(tiles),
        "-o",
        str(out),
        "--config",
        str(cfg),
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--val-fraction",
        "0.25",
    ]
    result, lines = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "after 1 epochs, 2 steps" in result.output and out.is_file()
    result, lines = invoke(*args[:-4], "--epochs", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert "after 2 epochs, 4 steps" in result.output
    assert load_model(out).geoprn_meta["trained_on"]["config"]["steps_per_epoch"] == 2

"""Cross-fitting on real Massachusetts tiles: every tile's probabilities from the fold model
that did not train on it, then PRN on all of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from click.testing import CliRunner

from geoprn.cli.main import cli
from geoprn.crossfit import crossfit_probabilities, deal_folds, train_prn_crossfit
from geoprn.data import discover_pairs, load_tiles
from geoprn.errors import InputError
from geoprn.inference import predict_array
from geoprn.models.checkpoint import load_model
from geoprn.train import load_config
from tests.conftest import SHARED_DATA, SMALL_BASE_RECIPE, crop_tiles
from tests.test_train import SOURCES
from tests.test_train_prn import SMALL as SMALL_PRN

MASS = SHARED_DATA / "massachusetts" / "train"
pytestmark = pytest.mark.skipif(not MASS.is_dir(), reason="real data not found")


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return crop_tiles(MASS, SOURCES, tmp_path_factory.mktemp("tiles"))


@pytest.fixture(scope="module")
def base_config() -> dict:
    return {**load_config("base_unet_mnv2"), **SMALL_BASE_RECIPE, "epochs": 1, "steps_per_epoch": 3}


@pytest.fixture(scope="module")
def crossfit(tiles, base_config, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("folds")
    crossfit_probabilities([tiles], base_config, 2, workdir, device="cpu")
    return workdir


def test_deal_folds_is_seeded_disjoint_and_complete(tiles):
    pairs = discover_pairs([tiles])
    folds = deal_folds(pairs, 2, seed=0)
    names = [p.name for fold in folds for p in fold]
    assert sorted(names) == sorted(SOURCES) and len(folds[0]) == len(folds[1]) == 2
    assert deal_folds(list(reversed(pairs)), 2, seed=0) == folds
    with pytest.raises(InputError, match="between 2 and the 4 tiles"):
        deal_folds(pairs, 5, seed=0)


@pytest.fixture(scope="module")
def crossfit_on_cluster(tiles, base_config, tmp_path_factory) -> Path:
    """Both folds at once, in the two worker processes of a local Dask cluster, each loading
    its crops in a DataLoader process of its own."""
    workdir = tmp_path_factory.mktemp("folds_cluster")
    config = {**base_config, "workers": 1}
    events = []
    crossfit_probabilities(
        [tiles],
        config,
        2,
        workdir,
        device="cpu",
        fold_workers=2,
        progress=lambda event, info: events.append((event, info)),
    )
    assert sorted(info["fold"] for event, info in events if event == "fold") == [1, 2]
    return workdir


@pytest.mark.parametrize("workdir", ["crossfit", "crossfit_on_cluster"])
def test_each_tile_is_predicted_by_the_model_that_left_it_out(workdir, tiles, request):
    crossfit = request.getfixturevalue(workdir)
    manifest = json.loads((crossfit / "folds.json").read_text())
    assert [f["fold"] for f in manifest] == [0, 1]
    loaded = {t.name: t for t in load_tiles(discover_pairs([tiles]), [1, 2, 3], 255)}
    for fold in manifest:
        model = load_model(crossfit / fold["checkpoint"])
        trained_on = model.geoprn_meta["trained_on"]
        assert not set(fold["held_out"]) & set(trained_on["train_tiles"] + trained_on["val_tiles"])
        other = load_model(crossfit / manifest[1 - fold["fold"]]["checkpoint"])
        for name in fold["held_out"]:
            with rasterio.open(crossfit / "probs" / name.replace(".png", ".tif")) as ds:
                written = ds.read(1)
            np.testing.assert_array_equal(written, predict_array(model, loaded[name].image))
            assert not np.array_equal(written, predict_array(other, loaded[name].image))
    assert sorted(p.name for p in crossfit.glob("fold*.done")) == ["fold0.done", "fold1.done"]


def test_done_folds_are_not_trained_again(crossfit, tiles, base_config):
    stamps = {p: p.stat().st_mtime_ns for p in crossfit.glob("base_fold*.safetensors")}
    crossfit_probabilities([tiles], base_config, 2, crossfit, device="cpu")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_prn_on_crossfit_probabilities(tiles, base_config, tmp_path):
    config = {
        **load_config("prn_p64"),
        **SMALL_PRN,
        "epochs": 1,
        "steps_per_epoch": 2,
        "workers": 0,
    }
    out = tmp_path / "prn.safetensors"
    summary = train_prn_crossfit(
        [tiles], config, out, base_config, 2, device="cpu", val_fraction=0.25
    )
    assert summary["folds"] == 2 and (tmp_path / "prn.safetensors.folds" / "folds.json").is_file()
    meta = load_model(out, "prn").geoprn_meta
    assert meta["base"] == {"probs": str(tmp_path / "prn.safetensors.folds" / "probs")}


def test_cli_folds_excludes_base(tiles, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "prn",
            str(tiles),
            "-o",
            str(tmp_path / "p.safetensors"),
            "--folds",
            "2",
            "--base",
            "x.safetensors",
        ],
    )
    assert result.exit_code == 2 and "--folds trains its own base models" in result.output


def test_cli_fold_workers_need_folds(tiles, tmp_path):
    out = str(tmp_path / "p.safetensors")
    args = ["train", "prn", str(tiles), "-o", out, "--base", "x.safetensors", "--fold-workers", "2"]
    result = CliRunner().invoke(cli, args)
    assert (
        result.exit_code == 2 and "--fold-workers and --scheduler go with --folds" in result.output
    )


def test_cli_fold_workers_trains_quietly(tiles, base_config, tmp_path):
    """`train prn --folds 2 --fold-workers 2` as a user runs it: one line per finished fold,
    none of the local Dask cluster's own log lines."""
    configs = {
        "base.yaml": base_config,
        "prn.yaml": {**load_config("prn_p64"), **SMALL_PRN, "epochs": 1, "steps_per_epoch": 1},
    }
    for name, config in configs.items():
        (tmp_path / name).write_text(yaml.safe_dump(config))
    args = ["train", "prn", str(tiles), "-o", str(tmp_path / "p.safetensors"), "--folds", "2"]
    args += ["--fold-workers", "2", "--base-config", str(tmp_path / "base.yaml")]
    args += ["--config", str(tmp_path / "prn.yaml"), "--device", "cpu", "--val-fraction", "0.25"]
    done = subprocess.run(
        [sys.executable, "-m", "geoprn", *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "fold 1/2 trained" in done.stdout + done.stderr
    assert "fold 2/2 trained" in done.stdout + done.stderr
    assert "Scheduler at" not in done.stderr and "Nanny" not in done.stderr


def test_cli_bad_init_fails_before_any_fold_is_trained(tiles, tmp_path):
    from geoprn.models.checkpoint import DEFAULT_BASE

    out = tmp_path / "p.safetensors"
    args = ["train", "prn", str(tiles), "-o", str(out), "--folds", "2", "--init", DEFAULT_BASE]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1 and "is a base checkpoint, a prn one is needed" in result.output
    assert not (tmp_path / "p.safetensors.folds").exists()

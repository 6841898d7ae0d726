"""PRN training on real Massachusetts tiles the shipped base model never saw (the val split)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
import zarr
from click.testing import CliRunner

from geoprn.cli.main import cli
from geoprn.data import RandomCrops, discover_pairs, load_tiles
from geoprn.errors import InputError
from geoprn.inference import autocast_dtype, predict_array
from geoprn.losses import prn_loss
from geoprn.models.checkpoint import DEFAULT_BASE, file_sha256, load_cached, load_model
from geoprn.models.prn import PatchRefineNet
from geoprn.pseudo_labels import patch_optimal_labels
from geoprn.train import base_probabilities, prn_tile, train_prn
from tests.conftest import VAL_WINDOWS, config_from

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VAL = DATA / "massachusetts" / "val"
SMALL = {
    "architecture": "PatchRefineNet",
    "arguments": {
        "in_channels": 1,
        "channels": [8, 16, 32, 64],
        "patch_size": 32,
        "recurrence": 1,
        "pool_bins": [1, 2, 4, 8],
    },
    "bands": [1],
    "tile_size": 512,
    "crop": 128,
    "batch_size": 4,
    "lr": 3e-3,
    "epochs": 2,
    "steps_per_epoch": 30,  # at 10, the best epoch's eval-mode loss rose on the base of 2026-12-06
    "patience": 5,
    "val_batch": 4,
    "min_lr": 5e-8,
}

pytestmark = pytest.mark.skipif(not VAL.is_dir(), reason=f"real data not found at {DATA}")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    return config_from(SMALL, tmp_path_factory.mktemp("cfg"))


@pytest.fixture(scope="module")
def run(val_crops, config, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("prn") / "prn.safetensors"
    return train_prn([val_crops], config, out, base=DEFAULT_BASE, val_fraction=0.25, device="cpu")


def test_checkpoint_records_its_base_and_split(run):
    model = load_model(run["checkpoint"], kind="prn")
    meta = model.geoprn_meta
    assert meta["base"] == {"sha256": file_sha256(DEFAULT_BASE), "file": DEFAULT_BASE.name}
    assert meta["patch_size"] == 32 and meta["output"] == "probability" and meta["gsd"] == 1.0
    assert sorted(meta["trained_on"]["train_tiles"] + meta["trained_on"]["val_tiles"]) == sorted(
        VAL_WINDOWS
    )
    assert len(run["history"]) == 2 and 0.0 <= run["best_val_road_iou"] <= 1.0
    assert 0.2 < run["base_val_road_iou"] < 1.0  # the shipped base model finds roads here
    x = torch.rand(1, 1, 512, 512)
    with torch.inference_mode():
        probs = model(x)
    assert probs.shape == x.shape and probs.min() >= 0 and probs.max() <= 1
    csv_rows = Path(run["history_csv"]).read_text().splitlines()
    assert csv_rows[0].startswith("epoch,steps,train_loss,val_road_iou") and len(csv_rows) == 3
    with rasterio.open(run["curves_png"]) as png:
        curves = png.read()
    assert curves.shape == (3, 260, 840) and (curves[0] < 100).mean() > 0.005  # lines drawn


def test_the_recorded_cut_off_is_the_best_on_the_val_tiles(run, val_crops):
    from geoprn.train import pooled_road_iou

    tiles = load_tiles(discover_pairs([val_crops]), [1, 2, 3], 255)
    val = [t for t in tiles if t.name in run["split"]["val"]]
    base = load_cached(str(DEFAULT_BASE.resolve()), file_sha256(DEFAULT_BASE), "cpu")
    prn = load_model(run["checkpoint"], "prn")
    refined = [predict_array(prn, predict_array(base, t.image)[None]) for t in val]
    cut = load_model(run["checkpoint"]).geoprn_meta["threshold"]
    scores = {t / 20: pooled_road_iou([r > t / 20 for r in refined], val) for t in range(1, 20)}
    assert scores[cut] == pytest.approx(max(scores.values()), abs=1e-9)


def test_cache_holds_what_refine_computes(run, val_crops):
    cache = zarr.open_group(run["checkpoint"] + ".cache.zarr", mode="r")
    bf16 = autocast_dtype(torch.device("cpu")) == torch.bfloat16  # the cache keys its precision
    assert cache.attrs["source"] == file_sha256(DEFAULT_BASE) + ("_bfloat16" if bf16 else "")
    tile = load_tiles(discover_pairs([val_crops]), [1, 2, 3], 255)[0]
    model = load_cached(str(DEFAULT_BASE.resolve()), file_sha256(DEFAULT_BASE), "cpu")
    expected = predict_array(model, tile.image)  # the model as refine runs it
    np.testing.assert_array_equal(cache[f"probs/{tile.name}"][...], expected)
    # the training tiles' pseudo-labels are cached too, as patch_optimal_labels makes them
    name = run["split"]["train"][0]
    tile = next(
        t for t in load_tiles(discover_pairs([val_crops]), [1, 2, 3], 255) if t.name == name
    )
    pseudo, _ = patch_optimal_labels(cache[f"probs/{name}"][...], tile.label, 32, tile.valid)
    np.testing.assert_array_equal(cache[f"pseudo_p32/{name}"][...], pseudo)


def test_prn_tiles_carry_patch_aligned_pseudo_labels(val_crops):
    tile = load_tiles(discover_pairs([val_crops]), [1, 2, 3], 255)[0]
    probs = np.random.default_rng(0).random((500, 490), dtype=np.float32)
    tile.label, tile.valid = tile.label[:500, :490], tile.valid[:500, :490]
    prepared = prn_tile(tile, probs, 32)
    assert prepared.image.shape == (1, 512, 512) and not prepared.valid[500:].any()
    expected, _ = patch_optimal_labels(prepared.image[0], prepared.label, 32, prepared.valid)
    np.testing.assert_array_equal(prepared.pseudo, expected)
    crops = RandomCrops([prepared], crop=128, length=20, seed=0, step=32, augment=False)
    for i in range(20):
        image, label, valid, pseudo = crops[i]
        assert pseudo.shape == (1, 128, 128)
        # the crop's pseudo-labels are the tile's, so its origin lies on the patch grid
        hits = [
            (y, x)
            for y in range(0, 512 - 127, 32)
            for x in range(0, 512 - 127, 32)
            if np.array_equal(prepared.image[0, y : y + 128, x : x + 128], image[0].numpy())
        ]
        assert hits, "crop origin off the patch grid"


def test_loss_falls(run, val_crops, config):
    prepared = [
        prn_tile(t, p, 32)
        for t, p in zip(
            load_tiles(discover_pairs([val_crops]), [1, 2, 3], 255),
            base_probabilities(
                load_tiles(discover_pairs([val_crops]), [1, 2, 3], 255),
                run["checkpoint"] + ".cache.zarr",
                base=DEFAULT_BASE,
            ),
            strict=True,
        )
        if t.name in run["split"]["train"]
    ]
    crops = RandomCrops(prepared, crop=128, length=8, seed=7, step=32)
    batch = [crops[i] for i in range(8)]
    image, label, valid, pseudo = (torch.stack(b) for b in zip(*batch, strict=True))
    torch.manual_seed(0)  # the initial weights train_prn started from (seed 0)
    initial = PatchRefineNet(**config["arguments"]).eval()
    trained = load_model(run["checkpoint"]).net
    with torch.no_grad():
        before, after = (
            prn_loss(*m.logits(image), pseudo, label, valid) for m in (initial, trained)
        )
    assert after < 0.9 * before, (before, after)


def test_probability_rasters_instead_of_a_base(run, val_crops, config, tmp_path):
    probs_dir = tmp_path / "probs"
    probs_dir.mkdir()
    cache = zarr.open_group(run["checkpoint"] + ".cache.zarr", mode="r")
    for name in VAL_WINDOWS:
        data = np.round(cache[f"probs/{name}"][...] * 255).astype(np.uint8)[None]
        with rasterio.open(
            probs_dir / name.replace(".png", ".tif"),
            "w",
            driver="GTiff",
            width=512,
            height=512,
            count=1,
            dtype="uint8",
        ) as dst:
            dst.write(data)
    config = {**config, "epochs": 1, "steps_per_epoch": 2}
    out = tmp_path / "from_probs.safetensors"
    summary = train_prn(
        [val_crops], config, out, probs_dir=probs_dir, val_fraction=0.25, device="cpu"
    )
    assert load_model(out).geoprn_meta["base"] == {"probs": str(probs_dir)}
    assert summary["base_val_road_iou"] == pytest.approx(run["base_val_road_iou"], abs=0.01)
    (probs_dir / "18028870_15.tif").unlink()
    with pytest.raises(InputError, match="no probability raster for tile 18028870_15.png"):
        train_prn(
            [val_crops], config, tmp_path / "x.safetensors", probs_dir=probs_dir, device="cpu"
        )


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_errors(val_crops, run, tmp_path):
    code, out = invoke("train", "prn", val_crops, "-o", tmp_path / "p.safetensors")
    assert code == 1 and "give either a base checkpoint (--base) or probabilities" in out
    code, out = invoke(
        "train", "prn", val_crops, "-o", tmp_path / "p.safetensors", "--base", run["checkpoint"]
    )
    assert code == 1 and "is a prn checkpoint, a base one is needed" in out
    assert "Traceback" not in out


def test_cli_trains(val_crops, config, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**SMALL, "epochs": 1, "steps_per_epoch": 2}))
    out = tmp_path / "cli.safetensors"
    args = ("train", "prn", val_crops, "-o", out, "--base", DEFAULT_BASE, "--config", cfg)
    code, text = invoke(*args, "--device", "cpu", "--val-fraction", "0.25")
    assert code == 0, text
    assert "base model at 0.5 on the val tiles: road IoU" in text and out.is_file()
    code, text = invoke(*args)
    assert code == 1 and "--overwrite" in text
    shutil.rmtree(str(out) + ".cache.zarr")


def test_init_starts_from_a_checkpoint(run, val_crops, config, tmp_path):
    """With --init and a zero learning rate, the parameters written are the checkpoint's; the
    checkpoint records where it started."""
    out = tmp_path / "tuned.safetensors"
    frozen = {**config, "lr": 0.0, "epochs": 1, "steps_per_epoch": 1}
    train_prn(
        [val_crops],
        frozen,
        out,
        base=DEFAULT_BASE,
        val_fraction=0.25,
        device="cpu",
        init=run["checkpoint"],
    )
    tuned, start = load_model(out).net, load_model(run["checkpoint"]).net
    started = dict(start.named_parameters())  # batch-norm statistics move even at lr 0
    for name, value in tuned.named_parameters():
        assert torch.equal(value, started[name]), name
    fresh = PatchRefineNet(**config["arguments"])
    assert not torch.equal(fresh.state_dict()[name], started[name])
    init = load_model(out).geoprn_meta["trained_on"]["init"]
    assert init == {"file": "prn.safetensors", "sha256": file_sha256(run["checkpoint"])}


@pytest.fixture(scope="module")
def skip_run(val_crops, tmp_path_factory) -> dict:
    """A PRN that starts as the identity (``input_skip``, as the CPU configs): whatever 20
    steps do, it finds the base model's roads (one from scratch may find none yet)."""
    folder = tmp_path_factory.mktemp("prn_skip")
    arguments = {**SMALL["arguments"], "input_skip": True}
    config = config_from({**SMALL, "arguments": arguments}, folder)
    out = folder / "prn.safetensors"
    return train_prn([val_crops], config, out, base=DEFAULT_BASE, val_fraction=0.25, device="cpu")


def test_init_is_kept_unless_an_epoch_beats_it(skip_run, val_crops, tmp_path):
    """An epoch that wrecks the weights (learning rate 1) scores below the starting point,
    which was validated first: the checkpoint written is the starting one."""
    run = skip_run
    config = load_model(run["checkpoint"]).geoprn_meta["trained_on"]["config"]
    assert run["best_val_road_iou"] > 0.2  # a starting point worth keeping
    out = tmp_path / "wrecked.safetensors"
    wreck = {**config, "lr": 1.0, "epochs": 1, "steps_per_epoch": 2}
    summary = train_prn(
        [val_crops],
        wreck,
        out,
        base=DEFAULT_BASE,
        val_fraction=0.25,
        device="cpu",
        init=run["checkpoint"],
    )
    assert summary["best_epoch"] == 0 and summary["history"][0]["val_road_iou"] < 0.2
    assert summary["best_val_road_iou"] == pytest.approx(run["best_val_road_iou"], abs=0.02)
    kept, start = load_model(out).net, load_model(run["checkpoint"]).net
    started = dict(start.named_parameters())
    assert all(torch.equal(v, started[k]) for k, v in kept.named_parameters())


def test_init_must_be_a_prn_of_the_same_network(run, val_crops, tmp_path):
    args = ["train", "prn", val_crops, "-o", tmp_path / "p.safetensors", "--base", DEFAULT_BASE]
    code, out = invoke(*args, "--init", DEFAULT_BASE)
    assert code == 1 and "is a base checkpoint, a prn one is needed" in out
    code, out = invoke(*args, "--init", run["checkpoint"])  # a P = 32 PRN for prn_p64
    assert code == 1 and "the config builds one with" in out and "Traceback" not in out
    assert not (tmp_path / "p.safetensors").exists()


def test_micro_batches_follow_the_memory_budget(val_crops, config, tmp_path, monkeypatch):
    """`auto` puts as many crops through at once as the memory allows (GEOPRN_TRAIN_MEMORY_MB
    caps it): the whole batch of 4 with room, one crop at a time in 1 MiB; a number is kept."""
    short = {**config, "epochs": 1, "steps_per_epoch": 2}
    cases = [("100000", "auto", 4), ("1", "auto", 1), ("100000", 2, 2)]
    for i, (budget, setting, expected) in enumerate(cases):
        monkeypatch.setenv("GEOPRN_TRAIN_MEMORY_MB", budget)
        summary = train_prn(
            [val_crops],
            {**short, "micro_batch": setting},
            tmp_path / f"m{i}.safetensors",
            base=DEFAULT_BASE,
            val_fraction=0.25,
            device="cpu",
        )
        assert summary["micro_batch"] == expected and summary["steps"] == 2
        assert np.isfinite(summary["history"][0]["train_loss"])


def test_micro_batch_errors(val_crops, tmp_path, monkeypatch):
    args = ["train", "prn", val_crops, "-o", tmp_path / "p.safetensors", "--base", DEFAULT_BASE]
    args += ["--config", "prn_p64", "--crop", "64", "--epochs", "1", "--steps-per-epoch", "1"]
    code, out = invoke(*args, "--micro-batch", "0")
    assert code == 1 and "micro_batch must be 'auto' or a whole number of crops" in out
    monkeypatch.setenv("GEOPRN_TRAIN_MEMORY_MB", "lots")
    code, out = invoke(*args)
    assert code == 1 and "GEOPRN_TRAIN_MEMORY_MB='lots' is not a whole number" in out
    assert not (tmp_path / "p.safetensors.cache.zarr").exists()  # refused before any work


def test_micro_batches_accumulate_the_batch_gradient(val_crops, config):
    """Gradients accumulated one crop or three at a time equal the whole batch's (batch norms
    frozen, every pixel valid, so the batch's loss is the mean of its crops'). In float64: in
    float32 this small random network's gradients move by 1 to 5 % with the batch's split."""
    from geoprn.train import accumulate_gradients

    torch.manual_seed(0)
    net = PatchRefineNet(**config["arguments"]).eval().double()
    probs = torch.rand(4, 1, 64, 64, dtype=torch.float64)
    label = (torch.rand(4, 1, 64, 64) > 0.8).double()
    batch = [probs, label, torch.ones_like(label), (probs > 0.5).double()]

    def loss_of(part):
        image, label, valid, pseudo = part
        return prn_loss(*net.logits(image), pseudo, label, valid)

    gradients = []
    for micro in (4, 1, 3):
        net.zero_grad()
        loss = accumulate_gradients(loss_of, batch, micro)
        gradients.append([p.grad.clone() for p in net.parameters()])
        if micro == 4:
            whole = loss
        torch.testing.assert_close(loss, whole, rtol=1e-6, atol=0)  # the loss sums in fp32
    for other in gradients[1:]:
        for a, b in zip(gradients[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_prn_learns_from_the_base_model_averaged_over_symmetries(val_crops, config, tmp_path):
    from geoprn.models.predictor import SymmetryMean

    config = {**config, "epochs": 1, "steps_per_epoch": 2}
    out = tmp_path / "s4.safetensors"
    train_prn([val_crops], config, out, base=DEFAULT_BASE, device="cpu", symmetries=4)
    assert load_model(out).geoprn_meta["base"]["symmetries"] == 4
    cache = zarr.open_group(str(out) + ".cache.zarr", mode="r")
    assert cache.attrs["source"].endswith("_s4")
    tile = load_tiles(discover_pairs([val_crops]), [1, 2, 3], 255)[0]
    model = load_cached(str(DEFAULT_BASE.resolve()), file_sha256(DEFAULT_BASE), "cpu")
    expected = predict_array(SymmetryMean(model, 4), tile.image)  # as refine --symmetries 4
    np.testing.assert_array_equal(cache[f"probs/{tile.name}"][...], expected)
    with pytest.raises(InputError, match="--probs has none"):
        train_prn([val_crops], config, tmp_path / "x.safetensors", probs_dir=tmp_path,
                  device="cpu", symmetries=4)  # fmt: skip

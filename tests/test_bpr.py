"""Boundary Patch Refinement: boundary boxes on real road masks, cropping and pasting, the
window-level refiner, and a short real training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
import zarr
from click.testing import CliRunner

from geoprn import refine
from geoprn.cli.main import cli
from geoprn.data import BoundaryPatches, discover_pairs, load_tiles
from geoprn.inference import predict_array
from geoprn.losses import masked_bce
from geoprn.models.base import build_base
from geoprn.models.bpr import (
    BoundaryRefiner,
    boundary_boxes,
    boundary_map,
    box_counts,
    crop_boxes,
    paste_boxes,
    recentred,
    upsample,
)
from geoprn.models.checkpoint import (
    DEFAULT_BASE,
    file_sha256,
    load_cached,
    load_model,
    read_header,
    rewrite_header,
)
from geoprn.train import train_bpr
from tests.conftest import SHARED_DATA, config_from

MASKS = SHARED_DATA / "massachusetts" / "test" / "masks"
VAL = SHARED_DATA / "massachusetts" / "val"
SMALL = {
    "kind": "bpr",
    "architecture": "Unet",
    "arguments": {
        "encoder_name": "timm-mobilenetv3_small_minimal_100",
        "encoder_depth": 3,
        "decoder_channels": [16, 8, 8],
        "in_channels": 4,
    },
    "bands": [1, 2, 3],
    "tile_size": 512,
    "box": 64,
    "input_size": 128,
    "nms_iou_train": 0.25,
    "nms_iou": 0.55,
    "batch_size": 8,
    "lr": 3e-3,
    "epochs": 2,
    "steps_per_epoch": 6,
    "patience": 5,
    "val_batch": 4,
}


def real_masks(size: int = 512) -> torch.Tensor:
    """(N, size, size) bool crops of real label masks holding roads."""
    out = []
    for path in sorted(MASKS.glob("*.png"))[:3]:
        with rasterio.open(path) as src:
            mask = src.read(1)[-size:, -size:] > 127  # bottom-right: imagery, not nodata
        out.append(mask)
    return torch.from_numpy(np.stack(out))


def test_boundary_lies_between_road_and_background_not_along_window_edges():
    mask = torch.zeros(1, 100, 100, dtype=torch.bool)
    mask[0, :, 40:50] = True  # a road crossing the window top to bottom
    boundary = boundary_map(mask)[0]
    assert boundary[:, 39:41].all() and boundary[:, 49:51].all()
    assert boundary.sum() == 4 * 100  # both sides of both edges, and nothing at rows 0 / 99
    assert not boundary_map(torch.ones(1, 50, 50, dtype=torch.bool)).any()


@pytest.mark.parametrize("nms_iou", [0.25, 0.55])
def test_every_boundary_pixel_of_real_masks_lies_in_a_box(nms_iou):
    masks = real_masks()
    boundary = boundary_map(masks)
    assert boundary.sum() > 1000
    boxes = boundary_boxes(boundary, 64, nms_iou)
    assert (boxes[:, 3] - boxes[:, 1] == 64).all() and (boxes[:, 4] - boxes[:, 2] == 64).all()
    assert (boxes[:, 1:] >= 0).all() and (boxes[:, 1:] <= 512).all()  # inside the window
    assert set(boxes[:, 0].tolist()) == {0, 1, 2}
    assert (box_counts(boxes, boundary.shape)[boundary] > 0).all()


def test_fewer_boxes_as_the_nms_threshold_falls():
    boundary = boundary_map(real_masks())
    counts = [len(boundary_boxes(boundary, 64, iou)) for iou in (0.8, 0.55, 0.25)]
    assert counts[0] > counts[1] > counts[2] > 0, counts


def test_crop_then_paste_is_exact_and_averages_overlaps():
    x = torch.rand(2, 3, 100, 120)
    boxes = torch.tensor([[0, 0, 0, 64, 64], [0, 30, 40, 94, 104], [1, 36, 56, 100, 120]])
    patches = crop_boxes(x, boxes)
    for patch, (n, y0, x0, y1, x1) in zip(patches, boxes.tolist(), strict=True):
        assert torch.equal(patch, x[n, :, y0:y1, x0:x1])
    probs = torch.rand(2, 100, 120)
    assert torch.equal(paste_boxes(probs, boxes, crop_boxes(probs[:, None], boxes)[:, 0]), probs)
    values = torch.stack([torch.full((64, 64), v) for v in (1.0, 3.0, 5.0)])
    pasted = paste_boxes(probs, boxes, values)
    assert pasted[0, 10, 10] == 1 and pasted[0, 90, 100] == 3 and pasted[1, 50, 60] == 5
    assert pasted[0, 40, 50] == 2  # covered by the first two boxes: their mean
    assert pasted[0, 99, 0] == probs[0, 99, 0]  # no box: unchanged


def test_refiner_changes_only_pixels_in_boxes():
    masks = real_masks()[:1]
    probs = masks.float()[:, None] * 0.8 + 0.1
    image = torch.rand(1, 3, 512, 512) * 255
    torch.manual_seed(0)
    net = build_base("Unet", SMALL["arguments"]).eval()
    refiner = BoundaryRefiner(lambda x: torch.sigmoid(net(x)), box=64, input_size=128)
    with torch.inference_mode():
        out = refiner(torch.cat([probs, image], 1))
    assert out.shape == probs.shape and refiner.boxes_seen > 0
    covered = (box_counts(boundary_boxes(boundary_map(masks), 64, 0.55), masks.shape) > 0)[0]
    assert torch.equal(out[0, 0][~covered], probs[0, 0][~covered])
    assert not torch.equal(out[0, 0][covered], probs[0, 0][covered])


def test_bpr_sees_the_mask_the_previous_stage_makes_at_its_cut_off():
    """A PRN whose checkpoint records a cut-off t: BPR boxes the boundary of ``probs > t``,
    and pixels no box covers leave it recentred (cut at 0.5 exactly where PRN's cut at t)."""
    masks = real_masks()[:1]
    smooth = torch.nn.functional.avg_pool2d(masks.float()[:, None], 9, 1, 4)
    probs = (0.05 + 0.6 * smooth).clamp(0, 1)  # roads mostly between 0.3 and 0.5
    for at in (0.3, 0.7):
        moved = recentred(probs, at)
        assert torch.equal(moved > 0.5, probs > at)
        assert torch.equal(moved.flatten().argsort(stable=True),
                           probs.flatten().argsort(stable=True))  # fmt: skip
    assert recentred(probs, 0.5) is probs
    before = torch.nn.Identity()
    before.geoprn_meta = {"kind": "prn", "arguments": {"in_channels": 1}, "threshold": 0.3}
    torch.manual_seed(0)
    net = build_base("Unet", SMALL["arguments"]).eval()
    refiner = BoundaryRefiner(lambda x: torch.sigmoid(net(x)), before, box=64, input_size=128)
    image = torch.rand(1, 3, 512, 512) * 255
    with torch.inference_mode():
        out = refiner(torch.cat([probs, image], 1))
    at_cut = boundary_boxes(boundary_map(probs[:, 0] > 0.3), 64, 0.55)
    assert (
        refiner.boxes_seen
        == len(at_cut)
        != len(boundary_boxes(boundary_map(probs[:, 0] > 0.5), 64, 0.55))
    )
    covered = (box_counts(at_cut, masks.shape) > 0)[0]
    assert torch.equal(out[0, 0][~covered], recentred(probs, 0.3)[0, 0][~covered])


pytestmark_data = pytest.mark.skipif(not VAL.is_dir(), reason=f"real data not found at {VAL}")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    return config_from(SMALL, tmp_path_factory.mktemp("cfg"))


@pytest.fixture(scope="module")
def run(val_crops, config, models, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bpr") / "bpr.safetensors"
    return train_bpr(
        [val_crops], config, out, DEFAULT_BASE, models["prn"], val_fraction=0.25, device="cpu"
    )


@pytestmark_data
def test_checkpoint_records_what_it_refines(run, models):
    model = load_model(run["checkpoint"], kind="bpr")
    meta = model.geoprn_meta
    assert meta["base"]["sha256"] == file_sha256(DEFAULT_BASE)
    assert meta["prn"]["sha256"] == file_sha256(models["prn"])
    assert (meta["box"], meta["input_size"], meta["nms_iou"]) == (64, 128, 0.55)
    assert len(meta["mean"]) == len(meta["std"]) == 4 and meta["trained_on"]["boxes"] > 20
    assert len(run["history"]) == 2 and 0 <= run["best_val_road_iou"] <= 1
    x = torch.rand(5, 4, 128, 128) * 255
    with torch.inference_mode():
        probs = model(x)
    assert probs.shape == (5, 1, 128, 128) and probs.min() >= 0 and probs.max() <= 1


@pytestmark_data
def test_bpr_loss_falls(run, val_crops, config):
    loaded = load_tiles(discover_pairs([val_crops]), [1, 2, 3], 255)
    train = [t for t in loaded if t.name in run["split"]["train"]]
    probs = [np.where(t.label > 0, 0.9, 0.1).astype(np.float32) for t in train]
    boxes = [boundary_boxes(boundary_map(torch.from_numpy(p > 0.5)[None])).numpy() for p in probs]
    data = BoundaryPatches(train, probs, boxes, length=16, seed=3)
    items = [data[i] for i in range(len(data))]
    patch, label, valid = (upsample(torch.stack(b), 128) for b in zip(*items, strict=True))
    torch.manual_seed(0)  # the initial weights train_bpr started from (seed 0)
    initial = build_base("Unet", config["arguments"]).eval()
    trained = load_model(run["checkpoint"])
    normalise = (patch - trained.mean) / trained.std
    with torch.no_grad():
        before, after = (masked_bce(m(normalise), label, valid) for m in (initial, trained.net))
    assert after < 0.9 * before, (before, after)


@pytestmark_data
def test_train_bpr_command(val_crops, tmp_path):
    out = tmp_path / "b.safetensors"
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "epochs": 1, "steps_per_epoch": 1}))
    args = ["train", "bpr", val_crops, "-o", out, "--config", path, "--no-prn", "--device", "cpu",
            "--symmetries", "8"]  # fmt: skip
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "without BPR on the val tiles: road IoU" in result.output and out.is_file()
    meta = load_model(out).geoprn_meta
    assert meta["prn"] is None and meta["base"]["symmetries"] == 8  # the averaged map, recorded
    cache = zarr.open_group(Path(f"{out}.cache.zarr"), mode="r")
    assert cache.attrs["source"].endswith("_s8")  # and learned from
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1 and "exists; pass --resume" in result.output
    wrong = ["train", "bpr", val_crops, "-o", tmp_path / "w.safetensors", "--prn", DEFAULT_BASE]
    result = CliRunner().invoke(cli, [str(a) for a in wrong])
    assert result.exit_code == 1 and "a prn one is needed" in result.output
    assert not list(tmp_path.glob("w.safetensors*"))  # refused before any work or file


def refined(outdir: Path, stem: str = "mass") -> np.ndarray:
    return zarr.open_array(outdir / f"{stem}.zarr" / "refined", mode="r")[:]


@pytest.fixture(scope="module")
def with_bpr(mass_scene, models, tmp_path_factory) -> Path:
    """base + PRN + BPR on a real scene, blocks of 512."""
    out = tmp_path_factory.mktemp("bpr_refine")
    refine(mass_scene, out, base=models["base"], prn=models["prn"], bpr=models["bpr"],
           use_bpr=True, block_size=512, device="cpu")  # fmt: skip
    return out


def test_refine_with_bpr_does_not_depend_on_the_block_size(with_bpr, mass_scene, models, tmp_path):
    refine(mass_scene, tmp_path, base=models["base"], prn=models["prn"], bpr=models["bpr"],
           use_bpr=True, block_size=1024, device="cpu")  # fmt: skip
    np.testing.assert_array_equal(refined(with_bpr), refined(tmp_path))
    record = json.loads((tmp_path / "mass_run.json").read_text())
    assert record["inputs"]["bpr"]["sha256"] == file_sha256(models["bpr"])


def test_bpr_alone_refines_the_base_model(mass_scene, models, tmp_path):
    result = CliRunner().invoke(
        cli,
        [str(a) for a in ("refine", mass_scene, "-o", tmp_path, "--base", models["base"],
                          "--refiner", "bpr", "--bpr", models["bpr"], "--device", "cpu")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    base, out = (
        zarr.open_array(tmp_path / "mass.zarr" / v, mode="r")[:] for v in ("base", "refined")
    )
    assert not np.array_equal(base, out) and np.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1


def test_bpr_alone_sees_the_base_mask_at_its_recorded_cut_off(mass_scene, models, tmp_path):
    """With no PRN before it, BPR refines the mask the base model makes at the cut-off its
    checkpoint records (as ``train bpr`` trains it), not at 0.5: what refine writes is BPR run
    window by window on the stitched base map recentred there."""
    header = {**read_header(models["base"]), "threshold": 0.3}
    base = rewrite_header(models["base"], header, tmp_path / "base.safetensors")
    options = {"use_prn": False, "bpr": models["bpr"], "use_bpr": True, "device": "cpu"}
    refine(mass_scene, tmp_path, base=base, block_size=512, **options)
    probs = zarr.open_array(tmp_path / "mass.zarr" / "base", mode="r")[:]
    with rasterio.open(mass_scene) as scene:
        x = np.concatenate([probs[None], scene.read().astype(np.float32)])
    bpr = load_cached(str(models["bpr"]), file_sha256(models["bpr"]), "cpu")
    out = refined(tmp_path)  # equal but for float rounding in a few boxes
    np.testing.assert_allclose(out, predict_array(BoundaryRefiner(bpr, cut_off=0.3), x), atol=5e-3)
    assert not np.allclose(out, predict_array(BoundaryRefiner(bpr), x), atol=5e-3)


def test_bpr_on_a_probability_raster_sees_the_scene_image(mass_scene, models, tmp_path):
    """--probs + BPR: what refine writes is BPR run window by window over the probabilities
    and the scene's own pixels (predict_array, no blocks, no Dask)."""
    options = {"use_prn": False, "bpr": models["bpr"], "use_bpr": True, "device": "cpu"}
    refine(mass_scene, tmp_path / "a", base=models["base"], **options)
    base = zarr.open_array(tmp_path / "a" / "mass.zarr" / "base", mode="r")[:]
    with rasterio.open(mass_scene) as scene:
        profile = {**scene.profile, "count": 1, "dtype": "float32", "nodata": None}
        image = scene.read().astype(np.float32)
    probs = tmp_path / "probs.tif"
    with rasterio.open(probs, "w", **profile) as dst:
        dst.write(base[None])
    refine(mass_scene, tmp_path / "b", probs=probs, block_size=512, **options)
    bpr = load_cached(str(models["bpr"]), file_sha256(models["bpr"]), "cpu")
    expected = predict_array(BoundaryRefiner(bpr), np.concatenate([base[None], image]))
    np.testing.assert_array_equal(refined(tmp_path / "b"), expected)

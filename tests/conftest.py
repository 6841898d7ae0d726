"""Shared fixtures: real scenes from ../shared/data and the repo sample, small real models."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin

from geoprn.models.base import build_base
from geoprn.models.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_SCENE = REPO / "data" / "sample" / "paris_img1447.tif"
MASSACHUSETTS_TILE = SHARED_DATA / "massachusetts" / "test" / "images" / "10078735_15.png"
IMAGERY_TILE = SHARED_DATA / "massachusetts" / "train" / "images" / "19678630_15.png"
MASS_TRAIN = SHARED_DATA / "massachusetts" / "train"
CIL_TRAIN = SHARED_DATA / "cil_roads" / "train"
"""A Massachusetts tile whose top-left 1024 x 1100 px hold imagery, no white nodata."""

# A small, fast encoder so that tests run real forward passes in CI's two CPU cores.
TINY = {
    "encoder_name": "timm-mobilenetv3_small_minimal_100",
    "encoder_depth": 3,
    "decoder_channels": [16, 8, 8],
}


SMALL_BASE_RECIPE = {
    "architecture": "Unet",
    "arguments": {
        "encoder_name": "mobilenet_v2",
        "in_channels": 3,
        "encoder_depth": 3,
        "decoder_channels": [32, 16, 8],
    },
    "bands": [1, 2, 3],
    "gsd": 1.0,
    "nodata": 255,
    "crop": 128,  # at 64 px a run learned no roads in 40 steps (val road IoU 0)
    "batch_size": 4,
    "lr": 3e-3,
    "epochs": 2,
    "steps_per_epoch": 30,  # at 20, no road found on some CPUs (val IoU 0.006 on an AMD EPYC)
    "patience": 5,
    "val_batch": 1,
}
"""A base-model training recipe small enough for CI's two cores (the training tests')."""


def write_raster(
    path: Path,
    data: np.ndarray,
    crs: str | None = "EPSG:26919",
    transform=None,
    nodata: float | None = None,
) -> Path:
    """Write a (C, H, W) array as a GeoTIFF (tiled, like real scenes)."""
    count, height, width = data.shape
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": data.dtype.name,
        "crs": crs,
        "transform": transform or from_origin(300_000.0, 4_700_000.0, 1.0, 1.0),
        "nodata": nodata,
    }
    if width >= 256 and height >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def massachusetts_pixels(height: int = 1500, width: int = 1500) -> np.ndarray:
    """Top-left crop of a real Massachusetts Roads test tile, (3, H, W) uint8."""
    with rasterio.open(MASSACHUSETTS_TILE) as src:
        return src.read(window=((0, height), (0, width)))


def read_raster(path: Path) -> np.ndarray:
    """Every band of a raster, (C, H, W), without the warning of a file with no CRS."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return src.read()


NEEDS_TRAIN_DATA = pytest.mark.skipif(
    not MASS_TRAIN.is_dir(), reason=f"real data not found at {SHARED_DATA}"
)
"""For a module whose tests read the shared ``train`` tiles."""


def imagery_pixels(height: int = 1024, width: int = 1100) -> np.ndarray:
    """Top-left crop of :data:`IMAGERY_TILE`, (3, H, W) uint8, all of it imagery."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(IMAGERY_TILE) as src:
            return src.read(window=((0, height), (0, width)))


def make_checkpoint(path: Path, kind: str, in_channels: int, seed: int, **meta) -> Path:
    """A real (randomly initialised) smp network saved as a geoprn checkpoint."""
    import torch

    torch.manual_seed(seed)
    arguments = {**TINY, "in_channels": in_channels}
    header = {
        "kind": kind,
        "architecture": "Unet",
        "arguments": arguments,
        "bands": list(range(1, in_channels + 1)),
        "tile_size": 512,
        **meta,
    }
    return save_checkpoint(build_base("Unet", arguments), header, path)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Base (RGB, uint8 statistics), one-band base (uint16), a PRN-kind refiner and a BPR."""
    root = tmp_path_factory.mktemp("models")
    rgb = {"mean": [110.0, 110.0, 100.0], "std": [50.0, 50.0, 50.0]}
    return {
        "base": make_checkpoint(root / "base.safetensors", "base", 3, 0, **rgb),
        "base1": make_checkpoint(
            root / "base1.safetensors", "base", 1, 1, mean=[400.0], std=[200.0]
        ),
        "prn": make_checkpoint(root / "prn.safetensors", "prn", 1, 2),
        "bpr": make_checkpoint(
            root / "bpr.safetensors",
            "bpr",
            4,
            3,
            bands=[1, 2, 3],
            mean=[*rgb["mean"], 0.5],
            std=[*rgb["std"], 0.5],
            box=64,
            input_size=128,
            nms_iou=0.55,
        ),
    }


@pytest.fixture(scope="session")
def mass_scene(tmp_path_factory) -> Path:
    """A real 1100 x 900 aerial scene (Massachusetts Roads, 1 m) given a UTM 19N grid."""
    path = tmp_path_factory.mktemp("scenes") / "mass.tif"
    return write_raster(path, massachusetts_pixels(900, 1100))


def crop_tiles(folder: Path, windows: dict[str, tuple[int, int]], root: Path, size: int = 512):
    """images/ + masks/ under ``root`` holding ``size`` px PNG crops of real labelled tiles:
    ``windows`` maps a tile name in ``folder`` to the (row, col) of its crop."""
    for kind in ("images", "masks"):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for name, (y, x) in windows.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(folder / kind / name) as src:
                    array = src.read(window=((y, y + size), (x, x + size)))
                profile = {"driver": "PNG", "width": size, "height": size, "count": len(array)}
                with rasterio.open(root / kind / name, "w", dtype=array.dtype, **profile) as dst:
                    dst.write(array)
    return root


VAL_WINDOWS = {  # 512 x 512 windows of val-split tiles, all imagery (no white nodata)
    "18028870_15.png": (0, 0),
    "21628930_15.png": (900, 900),
    "22679080_15.png": (900, 0),
    "26278705_15.png": (0, 500),
}


@pytest.fixture(scope="session")
def val_crops(tmp_path_factory) -> Path:
    """images/ + masks/ of four 512 px crops of real val-split tiles (PRN and BPR training)."""
    return crop_tiles(
        SHARED_DATA / "massachusetts" / "val", VAL_WINDOWS, tmp_path_factory.mktemp("val512")
    )


def config_from(settings: dict, folder: Path) -> dict:
    """A training config written as YAML from ``settings`` and loaded as ``geoprn train`` would."""
    import yaml

    from geoprn.train import load_config

    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return load_config(path)

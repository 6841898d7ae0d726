"""The base model's probabilities under the 8 symmetries of the square (flips and quarter
turns), each mapped back and cached per place, for the mask-rule study (``mask_rules.py``).

Each transform is predicted as ``refine`` predicts a scene (overlapping 512 windows,
blended), on the ``val`` and ``test`` places of each set, and stored as float16 in a Zarr
group (``--cache``; a different base starts it afresh).

    python benchmarks/research/base_tta.py --cache /work/runs/tta.zarr
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from prn_accuracy import SETS, split_tiles  # noqa: E402

from geoprn.data import load_tiles  # noqa: E402
from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import predict_array, resolve_device  # noqa: E402
from geoprn.models.checkpoint import DEFAULT_BASE, file_sha256, load_cached, read_header  # noqa: E402
from geoprn.models.predictor import inverse, symmetry  # noqa: E402

SYMMETRIES = ("id", "flip_x", "flip_y", "rot180", "rot90", "rot270", "transpose", "antitranspose")
"""The dihedral group D4 in ``geoprn.models.predictor.symmetry``'s order: the first four
keep a rectangle's shape."""


def forward(a: np.ndarray, k: int) -> np.ndarray:
    """``a`` (..., H, W) under symmetry ``k``, as ``refine --symmetries`` turns a window."""
    return np.ascontiguousarray(symmetry(torch.from_numpy(np.ascontiguousarray(a)), k).numpy())


def backward(a: np.ndarray, k: int) -> np.ndarray:
    """Undo :func:`forward`."""
    return forward(a, inverse(k))


def tta_probabilities(group, base: str, tiles, device, batch_size: int) -> list[np.ndarray]:
    """Per tile, an (8, H, W) float16 stack of the base model's probabilities under each
    symmetry, mapped back; computed once per tile and cached in ``group``."""
    model = None
    out = []
    for tile in tiles:
        key = f"tta/{tile.name}"
        if key not in group:
            model = model or load_cached(str(Path(base).resolve()), file_sha256(base), str(device))
            stack = np.stack([
                backward(predict_array(model, forward(tile.image, k), batch_size=batch_size,
                                       device=device), k)
                for k in range(len(SYMMETRIES))
            ]).astype(np.float16)  # fmt: skip
            group.create_array(key, data=stack, chunks=(8, 512, 512))
        out.append(np.asarray(group[key][...]))
    return out


def cached_maps(group, prefix: str, make_model, tiles, device, batch_size: int, precision="auto"):
    """Per tile, the map of ``make_model()`` (a window model, made only if a tile is not cached
    yet) predicted as ``refine`` predicts a scene, cached in ``group`` under ``prefix/<tile>``
    as float16."""
    model = None
    out = []
    for tile in tiles:
        key = f"{prefix}/{tile.name}"
        if key not in group:
            if model is None:
                model = make_model()
            probs = predict_array(model, tile.image, batch_size=batch_size, device=device,
                                  precision=precision)  # fmt: skip
            group.create_array(key, data=probs.astype(np.float16), chunks=(512, 512))
        out.append(np.asarray(group[key][...], dtype=np.float32))
    return out


def open_cache(path: str, base: str):
    import zarr

    group = zarr.open_group(path, mode="a")
    if group.attrs.get("source") != file_sha256(base):
        group = zarr.open_group(path, mode="w")
        group.attrs["source"] = file_sha256(base)
    return group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(DEFAULT_BASE))
    parser.add_argument("--cache", required=True)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--splits", default="test,val")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    device = resolve_device(args.device)
    header = read_header(args.base, "base")
    group = open_cache(args.cache, args.base)
    for split in args.splits.split(","):
        for dataset in args.sets.split(","):
            started = time.perf_counter()
            tiles = load_tiles(split_tiles(dataset, split), header["bands"], header.get("nodata"))
            tta_probabilities(group, args.base, tiles, device, args.batch_size)
            print(f"{dataset} {split}: {len(tiles)} places, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    run_script(main)

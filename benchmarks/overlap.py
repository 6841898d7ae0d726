"""Seams, accuracy and recomputation against the overlap of neighbouring 512 windows.

For each overlap, on the Massachusetts test tiles (1 m, white areas nodata), base + PRN run as
``refine`` runs them (windows on the scene-wide grid, blended linearly across each overlap)
and the benchmark prints:

- the seam index of the base and of the refined probabilities: the mean absolute difference
  between neighbouring pixels where one window hands over to the next (the overlap strips; the
  window borders at overlap 0) over the same mean everywhere. 1.00 means the hand-over cannot
  be told from the rest of the map; a visible seam is a jump there, an index above 1;
- road IoU and mBA of both at 0.5, so a narrow overlap that costs accuracy (pixels predicted
  near a window's rim, with less context) shows;
- the work: windows ``refine`` runs (both stages, halos included, default block size) on a
  100,000 px square scene, over the 512 x 512 tiles that cover it without overlap.

    python benchmarks/overlap.py                      # overlaps 0,16,32,64,128, 5 test tiles
    python benchmarks/overlap.py --overlaps 0,32 --tiles 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from prn_accuracy import scores, split_tiles  # noqa: E402

from geoprn.blocks import window_cache_bytes  # noqa: E402
from geoprn.data import load_tiles  # noqa: E402
from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import PRECISIONS, predict_array, resolve_device, windows_run  # noqa: E402
from geoprn.models.checkpoint import (  # noqa: E402
    DEFAULT_BASE,
    DEFAULT_PRN,
    file_sha256,
    load_cached,
    read_header,
)
from geoprn.tiling import DEFAULT_BLOCK_SIZE, block_grid, serpentine, window_origins  # noqa: E402

TILE = 512
SCENE = 100_000


def handover_columns(width: int, overlap: int) -> np.ndarray:
    """(width - 1,) bool: True for the pixel pairs (x, x + 1) inside a hand-over between
    windows: both pixels in the overlap strip of two windows, or, at overlap 0, the pair that
    straddles a window border."""
    origins = window_origins(width, TILE, overlap)
    pairs = np.zeros(width - 1, bool)
    for left, right in zip(origins[:-1], origins[1:], strict=True):
        if overlap == 0:
            if 0 < right < width:
                pairs[right - 1] = True
        else:
            pairs[max(right, 0) : min(left + TILE, width) - 1] = True
    return pairs


def pair_differences(probs: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|p(x + 1) - p(x)| along the columns of ``probs`` and whether both pixels are valid."""
    return np.abs(np.diff(probs, axis=1)), valid[:, 1:] & valid[:, :-1]


def seam_index(maps: list[np.ndarray], tiles, overlap: int) -> float:
    """Mean neighbour difference in the hand-overs over the mean everywhere, both axes, all
    tiles pooled."""
    sums = np.zeros(2)  # hand-over, everywhere
    counts = np.zeros(2)
    for probs, tile in zip(maps, tiles, strict=True):
        for p, v in ((probs, tile.valid), (probs.T, tile.valid.T)):
            diff, ok = pair_differences(p, v)
            handover = ok & handover_columns(p.shape[1], overlap)[None, :]
            sums += diff[handover].sum(), diff[ok].sum()
            counts += handover.sum(), ok.sum()
    inside, everywhere = sums / counts
    return float(inside / everywhere)


def work_factor(overlap: int, block_size: int) -> float:
    """Windows both stages run on a SCENE px square scene over its 512 x 512 tiles, blocks run
    one after another sharing windows as ``refine`` does on the local scheduler."""
    origins = window_origins(SCENE, TILE, overlap)
    blocks = serpentine(block_grid(SCENE, SCENE, block_size))  # refine's order
    runs = windows_run((origins, origins), blocks, TILE, 2, window_cache_bytes())
    return sum(runs) / (2 * (SCENE / TILE) ** 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overlaps", default="0,16,32,64,128")
    parser.add_argument("--tiles", type=int, default=5, help="test tiles to use (of 5)")
    parser.add_argument("--base", default=str(DEFAULT_BASE))
    parser.add_argument("--prn", default=str(DEFAULT_PRN))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    args = parser.parse_args()
    device = resolve_device(args.device)
    header = read_header(args.base, "base")
    read_header(args.prn, "prn")
    tiles = load_tiles(split_tiles("massachusetts", "test"), header["bands"], header.get("nodata"))
    tiles = tiles[: args.tiles]
    base, prn = (
        load_cached(str(Path(p).resolve()), file_sha256(p), str(device))
        for p in (args.base, args.prn)
    )
    started = time.perf_counter()
    print(
        f"{len(tiles)} Massachusetts test tiles; device {device}, precision {args.precision}; "
        f"work on a {SCENE}² px scene at block size {args.block_size}\n"
    )
    print(
        "| overlap | windows run / 512² tiles | base seam index | base road IoU | base mBA "
        "| refined seam index | refined road IoU | refined mBA |\n|---|---|---|---|---|---|---|---|"
    )
    for overlap in (int(o) for o in args.overlaps.split(",")):
        options = (TILE, overlap, args.batch_size, device, args.precision)
        base_maps = [predict_array(base, t.image, *options) for t in tiles]
        refined_maps = [
            predict_array(prn, np.where(t.valid, p, 0)[None], *options)  # as refine: 0 at nodata
            for p, t in zip(base_maps, tiles, strict=True)
        ]
        row = [f"{work_factor(overlap, args.block_size):.3f}"]
        for maps in (base_maps, refined_maps):
            s = scores([m > 0.5 for m in maps], tiles)
            row += [
                f"{seam_index(maps, tiles, overlap):.3f}",
                f"{100 * s['road IoU']:.2f}",
                f"{100 * s['mBA']:.2f}",
            ]
        print(f"| {overlap} | " + " | ".join(row) + " |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run_script(main)

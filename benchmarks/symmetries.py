"""What the base model's symmetry averaging and the PRN cost: ``refine`` end to end on one scene
with the base model alone in one pass, with the PRN after it, averaged over 4 and 8 window
symmetries (``--symmetries``), and averaged over 8 with the PRN after it (the default now),
side by side.

The runs take turns, ``--repeats`` times; each prints its median seconds (and spread), scene
tiles/s (the scene's area in 512 x 512 tiles over the seconds), km²/h at 0.5 m/px (0.0655 km²
a tile) and its time over the default's. The default scene is one Massachusetts test tile on a
UTM 19N grid (1500 x 1500 px at 1 m, as ``throughput.py`` builds it).

    python benchmarks/symmetries.py --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from memory import build_mosaic

from geoprn.errors import run_script
from geoprn.models.checkpoint import DEFAULT_BASE, DEFAULT_PRN
from geoprn.pipeline import refine
from geoprn.raster import open_scene

RUNS = {
    "base, 1 pass": {"symmetries": 1, "use_prn": False, "use_bpr": False},
    "base + PRN, 1 pass": {"symmetries": 1, "use_prn": True, "use_bpr": False},
    "base, 4 symmetries": {"symmetries": 4, "use_prn": False, "use_bpr": False},
    "base, 8 symmetries": {"symmetries": 8, "use_prn": False, "use_bpr": False},
    "base, 8 symmetries + PRN (the default)": {"symmetries": 8, "use_prn": True, "use_bpr": False},
}
DEFAULT = "base, 8 symmetries + PRN (the default)"
TILE_KM2 = 512 * 512 * 0.5**2 / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scene", nargs="?", help="GeoTIFF (default: a Massachusetts test tile)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", default="/tmp/geoprn-bench")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scene = Path(args.scene) if args.scene else build_mosaic(workdir / "mosaic_1x1.tif", 1)
    info = open_scene(scene)
    tiles = info.height * info.width / 512**2
    seconds: dict[str, list[float]] = {name: [] for name in RUNS}
    for _ in range(args.repeats + 1):  # the first round warms the models up, untimed
        for name, options in RUNS.items():
            out = workdir / "symmetries"
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            refine(scene, out, base=DEFAULT_BASE, prn=DEFAULT_PRN, device=args.device,
                   resample="off", **options)  # fmt: skip
            seconds[name].append(time.perf_counter() - started)
    print(f"{scene.name}: {info.width} x {info.height} px, {tiles:.1f} tiles of 512², "
          f"{args.repeats} repeats, median (min to max)\n")  # fmt: skip
    print("| run | s | tiles/s | km²/h at 0.5 m | time over the default's |")
    print("|---|---|---|---|---|")
    medians = {name: statistics.median(s[1:]) for name, s in seconds.items()}
    for name, s in seconds.items():
        rate = tiles / medians[name]
        print(f"| {name} | {medians[name]:.1f} ({min(s[1:]):.1f} to {max(s[1:]):.1f}) | "
              f"{rate:.2f} | {rate * TILE_KM2 * 3600:.0f} | "
              f"{medians[name] / medians[DEFAULT]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    run_script(main)

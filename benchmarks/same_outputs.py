"""Are ``refine``'s outputs bit-identical to those of another revision? For refactors that
must not change behaviour: the README demo (the sample scene, default refiner) and a mosaic
of real tiles (with PRN), each run by this checkout and by ``--rev`` (checked out as a git
worktree and imported first on ``PYTHONPATH``), then every Zarr array, the mask COG's pixels,
grid and profile, and the quicklook PNG compared.

    python benchmarks/same_outputs.py --rev HEAD~1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import build_mosaic  # noqa: E402

from geoprn.errors import run_script  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUN = """
import sys
from geoprn.pipeline import refine
prn = sys.argv[3] == "prn"  # else the default rule, as `geoprn refine SCENE -o OUT` runs it
refine(sys.argv[1], sys.argv[2], use_prn=True if prn else None, use_bpr=False if prn else None)
"""


def run(code: Path, scene: Path, out: Path, refiner: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(code)}
    subprocess.run([sys.executable, "-c", RUN, str(scene), str(out), refiner], env=env, check=True)


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two output folders of one scene (empty: bit-identical)."""
    found = []
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".zarr", ".tif", ".png"))
    if names != sorted(p.name for p in b.iterdir() if p.suffix in (".zarr", ".tif", ".png")):
        return [f"different files: {names}"]
    for name in names:
        if name.endswith(".zarr"):
            ga, gb = zarr.open_group(a / name, mode="r"), zarr.open_group(b / name, mode="r")
            for key in sorted(dict(ga.arrays())):
                if not np.array_equal(ga[key][...], gb[key][...], equal_nan=True):
                    found.append(f"{name}/{key}: values differ")
        elif name.endswith(".tif"):
            with rasterio.open(a / name) as da, rasterio.open(b / name) as db:
                if da.profile != db.profile or not np.array_equal(da.read(), db.read()):
                    found.append(f"{name}: profile or pixels differ")
        elif (a / name).read_bytes() != (b / name).read_bytes():
            found.append(f"{name}: bytes differ")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the revision to compare with")
    parser.add_argument("--tiles", type=int, default=3, help="mosaic of TILES x TILES tiles")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO.parent) as folder:
        work = Path(folder)
        other = work / "rev"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(other), args.rev],
            check=True,
        )
        try:
            cases = [
                ("README demo", REPO / "data" / "sample" / "paris_img1447.tif", "auto"),
                ("mosaic + PRN", build_mosaic(work / "mosaic.tif", args.tiles), "prn"),
            ]
            failed = False
            for name, scene, refiner in cases:
                mine, theirs = work / f"{refiner}-here", work / f"{refiner}-rev"
                run(REPO, scene, mine, refiner)
                run(other, scene, theirs, refiner)
                found = differences(mine, theirs)
                failed |= bool(found)
                print(f"{name}: " + ("bit-identical" if not found else "; ".join(found)))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(other)])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    run_script(main)

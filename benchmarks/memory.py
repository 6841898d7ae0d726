"""Peak memory of ``geoprn refine`` as the scene grows: it must stay flat.

Builds mosaics of real Massachusetts Roads tiles (1500 x 1500 px at 1 m; tiles are reused
in order when a mosaic needs more than the 45 there are), georeferenced on an arbitrary
UTM 19N grid at 1 m, then runs ``refine`` on each in a fresh process and prints that
process's peak resident set size. The scene at scale k has k times the pixels of the first.

    python benchmarks/memory.py                 # 1x and 4x (2x2 and 4x4 tiles)
    python benchmarks/memory.py --scales 1,4,16 --base my.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "massachusetts"
TILE = 1500


def build_mosaic(path: Path, tiles_per_side: int, data: Path = DATA, kind: str = "images") -> Path:
    """Write a tiles_per_side^2 mosaic of real tiles (``images``, or their road ``masks``),
    one tile at a time (never whole)."""
    if path.exists():
        return path
    sources = sorted(data.glob(f"*/{kind}/*.png"))
    bands = [1, 2, 3] if kind == "images" else [1]
    side = TILE * tiles_per_side
    profile = {
        "driver": "GTiff",
        "width": side,
        "height": side,
        "count": len(bands),
        "dtype": "uint8",
        "crs": "EPSG:26919",
        "transform": from_origin(300_000, 4_700_000, 1.0, 1.0),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
    }
    tmp = path.with_suffix(".part.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for k in range(tiles_per_side**2):
            with rasterio.open(sources[k % len(sources)]) as src:
                pixels = src.read(bands)
            row, col = divmod(k, tiles_per_side)
            dst.write(pixels, window=Window(col * TILE, row * TILE, TILE, TILE))
    tmp.rename(path)
    return path


def with_nodata(scene: Path) -> Path:
    """A copy of a mosaic beside it (``<stem>_nodata.tif``) declaring 255 nodata: the
    Massachusetts tiles' white areas, whose blocks and windows ``refine`` then skips."""
    path = scene.with_name(f"{scene.stem}_nodata.tif")
    if not path.exists():
        shutil.copyfile(scene, path)
        with rasterio.open(path, "r+") as ds:
            ds.nodata = 255
    return path


def child(scene: str, outdir: str, options: dict) -> None:
    """Run refine in this process and print its peak RSS (MiB) as JSON."""
    import torch

    import geoprn

    started = time.perf_counter()
    record = geoprn.refine(scene, outdir, overwrite=True, **options)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    print(
        json.dumps(
            {
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_gpu_mib": gpu,
                "seconds": time.perf_counter() - started,
                "windows": record.windows,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1,4", help="pixel multiples of the first scene")
    parser.add_argument("--tiles", type=int, default=2, help="tiles per side at scale 1")
    parser.add_argument("--workdir", default="/tmp/geoprn-bench")
    parser.add_argument("--base")
    parser.add_argument("--prn")
    parser.add_argument("--no-prn", action="store_true")
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, help="blocks in flight (default: refine's)")
    parser.add_argument("--data", type=Path, default=DATA, help="folder of */images/*.png tiles")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], json.loads(args.child[2]))
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    options = {
        "base": args.base,
        "prn": args.prn,
        "use_prn": not args.no_prn,
        "block_size": args.block_size,
        "device": args.device,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }
    rows = []
    for scale in (int(s) for s in args.scales.split(",")):
        per_side = round(args.tiles * math.sqrt(scale))
        scene = build_mosaic(workdir / f"mosaic_{per_side}x{per_side}.tif", per_side, args.data)
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(scene),
                str(workdir / f"out_{scale}"),
                json.dumps(options),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((scale, per_side * TILE, result))

    print(
        f"{'scale':>5} {'scene px':>13} {'windows':>8} {'seconds':>8} {'km2/h':>8} "
        f"{'peak RSS MiB':>13} {'peak GPU MiB':>13}"
    )
    for scale, side, r in rows:
        km2_per_hour = side * side / 1e6 / r["seconds"] * 3600  # the mosaics are at 1 m/px
        print(
            f"{scale:>4}x {side:>6}x{side:<6} {r['windows']:>8} {r['seconds']:>8.1f} "
            f"{km2_per_hour:>8.0f} {r['peak_rss_mib']:>13.0f} {r['peak_gpu_mib']:>13.0f}"
        )
    first = rows[0][2]["peak_rss_mib"]
    for scale, _, r in rows[1:]:
        ratio = r["peak_rss_mib"] / first
        print(f"peak RSS ratio {scale}x/{rows[0][0]}x: {ratio:.3f}")


if __name__ == "__main__":
    main()

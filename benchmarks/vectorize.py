"""Speed and peak memory of road vectorization as the scene grows, and block-size invariance.

Builds mosaics of the real Massachusetts Roads label masks (1500 x 1500 px at 1 m, roads
255), georeferenced on a UTM 19N grid, and vectorizes each in a fresh process
(``geoprn.vectorize.extract_roads``, block size 2048, local threaded Dask scheduler), printing
seconds, roads, kilometres of centreline and the process's peak resident set size. Then the
largest mosaic is vectorized again with a second block size, and the two networks compared.

    python benchmarks/vectorize.py                       # 2x2, 4x4 and 8x8 tiles: 1x, 4x, 16x
    python benchmarks/vectorize.py --tiles 2 --scales 1,4
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import build_mosaic  # noqa: E402


def child(mask: str, block_size: int) -> None:
    """Vectorize in this process; print figures as JSON."""
    from geoprn.vectorize import extract_roads

    started = time.perf_counter()
    roads = extract_roads(mask, block_size=block_size)
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - started,
                "roads": len(roads.lines),
                "km": roads.total_length_m / 1000,
                "ends": sorted(
                    round(c, 3) for g in roads.lines for c in (g.coords[0] + g.coords[-1])
                ),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def run_child(mask: Path, block_size: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(mask), "--block-size", str(block_size)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=2, help="mosaic side, in tiles, at 1x")
    parser.add_argument("--scales", default="1,4,16", help="areas relative to the first")
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--other-block-size", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.block_size)
        return

    print(
        f"{'scale':>5} {'mask px':>13} {'seconds':>8} {'roads':>6} {'km':>7} {'peak RSS MiB':>13}"
    )
    peaks, last = {}, None
    for scale in (int(s) for s in args.scales.split(",")):
        per_side = args.tiles * math.isqrt(scale)
        side = per_side * 1500
        mask = build_mosaic(
            args.workdir / f"mask_mosaic_{per_side}x{per_side}.tif", per_side, kind="masks"
        )
        result = run_child(mask, args.block_size)
        peaks[scale], last = result["peak_rss_mib"], (mask, result)
        print(
            f"{scale:>4}x {side:>6}x{side:<6} {result['seconds']:>8.1f} {result['roads']:>6} "
            f"{result['km']:>7.1f} {result['peak_rss_mib']:>13.0f}"
        )
    first = min(peaks)
    for scale in sorted(peaks)[1:]:
        print(f"peak RSS ratio {scale}x/{first}x: {peaks[scale] / peaks[first]:.3f}")
    mask, reference = last
    other = run_child(mask, args.other_block_size)
    same = other["ends"] == reference["ends"]
    print(
        f"block size {args.other_block_size} vs {args.block_size} on the largest mosaic: "
        f"{other['roads']} vs {reference['roads']} roads, total length ratio "
        f"{other['km'] / reference['km']:.6f}, same end points: {same}"
    )


if __name__ == "__main__":
    main()

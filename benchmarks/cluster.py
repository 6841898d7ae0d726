"""``refine`` on a ``distributed.LocalCluster`` with 1 and 2 worker processes: speed-up, and
proof that the outputs are identical.

The scene is a mosaic of real Massachusetts tiles (see ``memory.py``). Every worker's PyTorch
uses the same number of threads (``--torch-threads``, 1 by default): a different intra-op
thread count changes how convolutions sum, hence the last bits of the probabilities (about
6e-6 here, and no mask pixel), while the worker count must change nothing.

    python benchmarks/cluster.py                       # 2 x 2 tiles, base model only
    python benchmarks/cluster.py --tiles 3 --prn       # with the shipped PRN
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import zarr
from distributed import LocalCluster

sys.path.insert(0, str(Path(__file__).parent))
from memory import build_mosaic  # noqa: E402

import geoprn  # noqa: E402


def run(
    scene: Path, outdir: Path, workers: int, threads: int, with_prn: bool, block_size: int
) -> tuple[float, int]:
    """Seconds for one refine on a fresh cluster of ``workers`` processes, and the windows
    it ran (neighbouring blocks in different processes compute their shared windows twice)."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        env=env,
    ) as cluster:
        started = time.perf_counter()
        record = geoprn.refine(
            scene,
            outdir,
            use_prn=with_prn,
            block_size=block_size,
            device="cpu",
            scheduler=cluster.scheduler_address,
            overwrite=True,
        )
        return time.perf_counter() - started, record.windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=2, help="real tiles per mosaic side")
    parser.add_argument("--prn", action="store_true", help="run the shipped PRN too (slow)")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--torch-threads", type=int, default=1, help="per worker")
    parser.add_argument("--workdir", default="/tmp/geoprn-bench")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scene = build_mosaic(workdir / f"mosaic_{args.tiles}x{args.tiles}.tif", args.tiles)
    seconds, windows = {}, {}
    for workers in (1, 2):
        seconds[workers], windows[workers] = run(
            scene,
            workdir / f"dist_{workers}",
            workers,
            args.torch_threads,
            args.prn,
            args.block_size,
        )
    stem = scene.stem
    variables = ["base", "refined"] if args.prn else ["base"]
    same = all(
        np.array_equal(
            zarr.open_array(workdir / "dist_1" / f"{stem}.zarr" / v, mode="r")[:],
            zarr.open_array(workdir / "dist_2" / f"{stem}.zarr" / v, mode="r")[:],
            equal_nan=True,
        )
        for v in variables
    )
    side = args.tiles * 1500
    print(
        f"scene {side}x{side} px, block size {args.block_size}, {os.cpu_count()} cores, "
        f"{args.torch_threads} torch thread(s) per worker, "
        f"{'base + PRN' if args.prn else 'base only'}"
    )
    for workers, s in seconds.items():
        print(f"{workers} worker process(es): {s:.1f} s, {windows[workers]} windows")
    print(f"speed-up 2 workers / 1 worker: {seconds[1] / seconds[2]:.2f}x")
    print(f"outputs identical: {same}")


if __name__ == "__main__":
    main()

"""``refine`` on a ``distributed.LocalCluster`` with 1 and 2 worker processes: speed-up, and
proof that the outputs are identical.

The scene is a mosaic of real Massachusetts tiles (see ``memory.py``). Every worker's PyTorch
uses the same number of threads (``--torch-threads``, 1 by default): a different intra-op
thread count changes how convolutions sum, hence the last bits of the probabilities (about
6e-6 here, and no mask pixel), while the worker count must change nothing.

    python benchmarks/cluster.py                       # 2 x 2 tiles, base model only
    python benchmarks/cluster.py --tiles 3 --prn       # with the shipped PRN
    python benchmarks/cluster.py --tiles 4 --nodata --lanes 1,2,4

``--lanes`` compares how many runs of neighbouring blocks each worker thread gets
(``geoprn.blocks.LANES_PER_THREAD``) in the 2-worker runs; ``--nodata`` declares the tiles'
white areas nodata (255), so their blocks are skipped and the runs' work is uneven.
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
from memory import build_mosaic, with_nodata  # noqa: E402

import geoprn  # noqa: E402
from geoprn import blocks  # noqa: E402
from geoprn.errors import run_script  # noqa: E402


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
    parser.add_argument("--nodata", action="store_true", help="white areas are nodata (255)")
    parser.add_argument("--lanes", default=str(blocks.LANES_PER_THREAD), help="e.g. 1,2,4")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scene = build_mosaic(workdir / f"mosaic_{args.tiles}x{args.tiles}.tif", args.tiles)
    if args.nodata:
        scene = with_nodata(scene)
    runs = [(1, blocks.LANES_PER_THREAD)] + [(2, int(n)) for n in args.lanes.split(",")]
    seconds, windows = {}, {}
    for workers, lanes in runs:
        blocks.LANES_PER_THREAD = lanes  # read where the tasks are made: in this process
        seconds[workers, lanes], windows[workers, lanes] = run(
            scene,
            workdir / f"dist_{workers}_{lanes}",
            workers,
            args.torch_threads,
            args.prn,
            args.block_size,
        )
    stem = scene.stem
    variables = ["base", "refined"] if args.prn else ["base"]
    first, *others = (workdir / f"dist_{w}_{n}" / f"{stem}.zarr" for w, n in runs)
    same = all(
        np.array_equal(
            zarr.open_array(first / v, mode="r")[:],
            zarr.open_array(other / v, mode="r")[:],
            equal_nan=True,
        )
        for other in others
        for v in variables
    )
    side = args.tiles * 1500
    print(
        f"scene {side}x{side} px{' (white = nodata)' if args.nodata else ''}, block size "
        f"{args.block_size}, {os.cpu_count()} cores, {args.torch_threads} torch thread(s) per "
        f"worker, {'base + PRN' if args.prn else 'base only'}"
    )
    for (workers, lanes), s in seconds.items():
        print(
            f"{workers} worker process(es), {lanes} run(s) of blocks per thread: {s:.1f} s, "
            f"{windows[workers, lanes]} windows, speed-up {seconds[runs[0]] / s:.2f}x"
        )
    print(f"outputs identical: {same}")


if __name__ == "__main__":
    run_script(main)

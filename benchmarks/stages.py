"""Where ``geoprn.refine``'s time goes: seconds per pipeline function, summed over block threads.

Wraps the pipeline's reading, model, blending, Zarr-writing, COG and quicklook functions
with timers and runs ``refine`` once per ``--runs`` (a second run shows a process that has
already loaded, or compiled, its models). Sums over threads can exceed the wall time.
``--trivial-model`` swaps the models for stand-ins that cost next to nothing
(``FirstBand``), so what is left is the pipeline's own cost.

    python benchmarks/stages.py --tiles 8 --trivial-model         # 12000² mosaic, CPU
    python benchmarks/stages.py SCENE.tif --device cuda --batch-size 32 --compile --runs 2
    python benchmarks/stages.py SCENE.tif --device cuda --compile --runs 2 --turns both

``--turns both`` runs each run twice, block threads taking turns on the GPU
(``inference.DEVICE_TURNS``, the default) and not, one after the other.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import build_mosaic, with_nodata  # noqa: E402

from geoprn import blocks, inference, pipeline, store  # noqa: E402
from geoprn.errors import run_script  # noqa: E402

TIMED = {
    blocks: [
        "process_block",
        "predict_stages",
        "warm_up",
        "read_region",
        "to_device",
        "predict_region",
        "write_mask_piece",
        "sample_block",
    ],
    pipeline: ["write_mask_cog", "write_quicklook"],
    store: ["write_block"],
}
seconds: dict[str, float] = collections.defaultdict(float)
calls: collections.Counter = collections.Counter()
lock = threading.Lock()


def timed(name: str, function):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            with lock:
                seconds[name] += time.perf_counter() - started
                calls[name] += 1

    return wrapper


class FirstBand(torch.nn.Module):
    """A stand-in model that costs next to nothing. As the base model: road where the first
    band is bright (above 160: 7 % of the valid pixels of the Massachusetts mosaics, about
    their real road share, so the mask compresses like a real one); as PRN (one band in):
    its input unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            return x
        return torch.sigmoid((x[:, :1] - 160.0) / 8.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scene", nargs="?", help="GeoTIFF (default: a mosaic of real tiles)")
    parser.add_argument("--tiles", type=int, default=8, help="tiles per side of that mosaic")
    parser.add_argument("--nodata", action="store_true", help="its white areas are nodata (255)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--trivial-model", action="store_true")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--turns", choices=("on", "off", "both"), default="on")
    parser.add_argument("--workdir", default="/tmp/geoprn-bench")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mosaic = workdir / f"mosaic_{args.tiles}x{args.tiles}.tif"
    scene = Path(args.scene) if args.scene else build_mosaic(mosaic, args.tiles)
    if args.nodata:
        scene = with_nodata(scene)
    for module, names in TIMED.items():
        for name in names:
            if hasattr(module, name):  # (warm_up: only since --compile)
                setattr(module, name, timed(name, getattr(module, name)))
    if args.trivial_model:
        blocks.stage_model = lambda refs, device, compiled=False: FirstBand()
    out = workdir / "stages"
    turns = {"on": [True], "off": [False], "both": [True, False]}[args.turns]
    for run, turn in itertools.product(range(1, args.runs + 1), turns):
        inference.DEVICE_TURNS = turn
        seconds.clear()
        calls.clear()
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        record = pipeline.refine(
            scene,
            out,
            device=args.device,
            batch_size=args.batch_size,
            block_size=args.block_size,
            threads=args.threads,
            resample="off",
            **({"compile": True} if args.compile else {}),  # runs on commits before --compile
        )
        print(
            f"run {run}: {scene.name}, wall {time.perf_counter() - started:.2f} s, blocks "
            f"{record.seconds['blocks']:.2f} s, {record.windows} windows, "
            f"{record.inputs['scheduler']}, device {record.inputs['device']}"
            f"{', trivial model' if args.trivial_model else ''}"
            f"{', compiled' if args.compile else ''}"
            f", device turns {'on' if turn else 'off'}"
        )
        for name in sorted(seconds, key=seconds.get, reverse=True):
            print(f"  {name:16s} {seconds[name]:8.2f} s  {calls[name]:5d} calls")
        if torch.cuda.is_available():
            print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    run_script(main)

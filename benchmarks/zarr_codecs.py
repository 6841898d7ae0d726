"""Zarr compressors for ``refine``'s probabilities: stored size, write and read speed.

Real probabilities: the shipped base model on the Massachusetts tiles with the most imagery
(1500² each, NaN at nodata, as ``refine`` stores them; most of some tiles is nodata, which any
codec stores for nothing), side by side in one array. Each candidate stores that
array in 512² chunks through zarr's own write path (as ``store.write_block`` writes a block)
and reads it back, ``--repeats`` times, as ``--dtype`` values; the table gives the stored bytes
over the raw float32 bytes and the medians of write and read speed in million probabilities
(pixels) a second. ``*`` marks the compressor ``refine`` uses.

    python benchmarks/zarr_codecs.py                 # 4 train tiles, format 2
    python benchmarks/zarr_codecs.py --zarr-format 3
    python benchmarks/zarr_codecs.py --dtype float16
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from numcodecs import Blosc, Zstd
from zarr.codecs import BloscCodec, ZstdCodec

sys.path.insert(0, str(Path(__file__).parent))
from prn_accuracy import add_probability_options, labelled_probabilities  # noqa: E402

from geoprn import store  # noqa: E402
from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import resolve_device  # noqa: E402

CANDIDATES = {
    2: {
        "zstd level 0 (zarr's default)": Zstd(0),
        "zstd level 1": Zstd(1),
        "blosc lz4, byte shuffle": Blosc("lz4", 5, Blosc.SHUFFLE),
        "blosc lz4, bit shuffle": Blosc("lz4", 5, Blosc.BITSHUFFLE),
        "blosc zstd 1, byte shuffle": Blosc("zstd", 1, Blosc.SHUFFLE),
    },
    3: {
        "zstd level 0 (zarr's default)": ZstdCodec(level=0),
        "blosc lz4, byte shuffle": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
        "blosc zstd 1, byte shuffle": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
    },
}


def probabilities(args: argparse.Namespace) -> np.ndarray:
    """The base model's probabilities (NaN at nodata, as ``refine`` stores them) on the
    ``--tiles`` tiles of ``--split`` with the most imagery, side by side; computed as
    ``prn_accuracy.py`` computes them, in its cache."""
    tiles, probs = labelled_probabilities(args, [args.split])
    kept = sorted(zip(tiles, probs, strict=True), key=lambda pair: -pair[0].valid.mean())
    masked = [np.where(t.valid, p, np.nan) for t, p in kept[: args.tiles]]
    return np.concatenate(masked, axis=1).astype(np.float32)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probability_options(parser, "train")
    parser.add_argument("--tiles", type=int, default=4, help="the split's tiles with most imagery")
    parser.add_argument("--zarr-format", type=int, choices=(2, 3), default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args()
    args.device = resolve_device(args.device)
    values = probabilities(args).astype(args.dtype)
    raw = values.size * 4  # float32 bytes, whatever is stored
    used = repr(store.compressor(args.zarr_format))
    print(
        f"{values.shape[0]}x{values.shape[1]} {args.dtype} probabilities "
        f"({values.nbytes / 2**20:.0f} MiB, {np.isnan(values).mean():.0%} nodata), "
        f"Zarr format {args.zarr_format}, 512 chunks\n"
    )
    print("| compressor | stored / raw float32 | write Mpx/s | read Mpx/s |")
    print("|---|---|---|---|")
    workdir = Path(tempfile.mkdtemp(prefix="geoprn-codecs-"))
    try:
        for name, codec in CANDIDATES[args.zarr_format].items():
            writes, reads = [], []
            for _ in range(args.repeats):
                path = workdir / "a.zarr"
                shutil.rmtree(path, ignore_errors=True)
                array = zarr.create_array(
                    path,
                    shape=values.shape,
                    chunks=(512, 512),
                    dtype=args.dtype,
                    fill_value=np.nan,
                    zarr_format=args.zarr_format,
                    compressors=codec,
                )
                started = time.perf_counter()
                array[:, :] = values
                writes.append(time.perf_counter() - started)
                started = time.perf_counter()
                back = array[:, :]
                reads.append(time.perf_counter() - started)
            np.testing.assert_array_equal(back, values)  # lossless, NaN included
            mark = " *" if repr(codec) == used else ""
            print(
                f"| {name}{mark} | {folder_bytes(path) / raw:.3f} "
                f"| {values.size / statistics.median(writes) / 1e6:.0f} "
                f"| {values.size / statistics.median(reads) / 1e6:.0f} |"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    run_script(main)

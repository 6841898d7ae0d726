"""The models' own speed limit: forward passes alone, tensors already on the device.

Prints GFLOP per 512 x 512 window (torch's ``FlopCounterMode``), tiles/s for the base model,
PRN and both in a row, and km²/h at a given GSD, for the shipped weights (or given ones), and
for PRNs of other sizes (``--prn-config``, random weights: speed does not depend on them). This
is the ceiling ``refine`` can approach.

    python benchmarks/model_speed.py                       # CPU, batch 2
    python benchmarks/model_speed.py --fold-bn --channels-last --dtype bf16 \
        --prn-config prn_p64 --prn-config prn_lite --prn-config prn_tiny
    python benchmarks/model_speed.py --device cuda --batch-size 64 --dtype bf16
    python benchmarks/model_speed.py --channels-last --fold-bn --dtype bf16 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from geoprn.errors import run_script
from geoprn.inference import resolve_device
from geoprn.models.checkpoint import DEFAULT_BASE, DEFAULT_PRN, load_model
from geoprn.models.predictor import Predictor, fold_batchnorm
from geoprn.models.prn import PatchRefineNet
from geoprn.train import load_config

TILE = 512


def median_seconds(run: Callable[[], object], repeats: int, warm_ups: int, cuda: bool) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls after ``warm_ups``, synchronised
    on CUDA."""
    times = []
    for i in range(warm_ups + repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        if i >= warm_ups:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def window_gflop(net: torch.nn.Module, bands: int) -> float:
    """GFLOP of one 512 x 512 window through ``net`` (a PRN's two branches), counted by
    ``FlopCounterMode`` on a copy on the meta device (nothing is computed)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(getattr(net, "net", net)).to("meta").eval()
    x = torch.empty(1, bands, TILE, TILE, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.logits(x) if isinstance(net, PatchRefineNet) else net(x)
    return counter.get_total_flops() / 1e9


def seconds_per_batch(model, x: torch.Tensor, autocast, repeats: int) -> float:
    """Median wall time of one forward pass (after two warm-ups)."""
    with torch.inference_mode(), autocast:
        return median_seconds(lambda: model(x), repeats, 2, x.is_cuda)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(DEFAULT_BASE))
    parser.add_argument("--prn", default=str(DEFAULT_PRN))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--fold-bn", action="store_true", help="fold batch norms into convolutions, as refine does"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile both models (warm-ups compile)"
    )
    parser.add_argument(
        "--prn-config",
        action="append",
        help="time a PRN of this config (random weights) instead of --prn; repeatable",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gsd", type=float, default=0.5, help="metres per pixel for km²/h")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    base = load_model(args.base, "base", device)
    prns = {"PRN": load_model(args.prn, "prn", device)}
    if args.prn_config:
        prns = {}
        for name in args.prn_config:
            config = load_config(name)
            meta = {"bands": config["bands"], "output": "probability"}  # as train_prn writes
            net = PatchRefineNet(**config["arguments"])
            prns[f"PRN {name}"] = Predictor(net, meta).to(device).eval()
    bands = len(base.geoprn_meta["bands"])
    gflop = {"base": window_gflop(base, bands)}
    channels = {name: prn.net.in_channels for name, prn in prns.items()}  # 1 + image bands
    gflop.update({name: window_gflop(prn, channels[name]) for name, prn in prns.items()})
    for model in (base, *prns.values()):
        if args.fold_bn:
            fold_batchnorm(model)
    base = base.to(memory_format=memory_format)
    prns = {name: prn.to(memory_format=memory_format) for name, prn in prns.items()}
    if args.compile:
        base = torch.compile(base)
        prns = {name: torch.compile(prn) for name, prn in prns.items()}
    x = (torch.rand(args.batch_size, bands, TILE, TILE, device=device) * 255).to(
        memory_format=memory_format
    )
    timings = {"base": seconds_per_batch(base, x, autocast, args.repeats)}
    for name, prn in prns.items():
        p = torch.rand(args.batch_size, channels[name], TILE, TILE, device=device)
        p = p.to(memory_format=memory_format)
        timings[name] = seconds_per_batch(prn, p, autocast, args.repeats)
        timings[f"base + {name}"] = timings["base"] + timings[name]
        gflop[f"base + {name}"] = gflop["base"] + gflop[name]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {name} ({torch.get_num_threads()} threads), batch {args.batch_size}, "
        f"{args.dtype}{', channels_last' if args.channels_last else ''}"
        f"{', batch norms folded' if args.fold_bn else ''}"
        f"{', torch.compile' if args.compile else ''}, "
        f"median of {args.repeats}"
    )
    km2_per_tile = (TILE * args.gsd) ** 2 / 1e6
    print(
        f"| model | GFLOP / window | s / batch | s / window | tiles/s | km²/h at {args.gsd:g} m |"
        "\n|---|---|---|---|---|---|"
    )
    for model, seconds in timings.items():
        tiles = args.batch_size / seconds
        print(
            f"| {model} | {gflop[model]:.1f} | {seconds:.4f} | {seconds / args.batch_size:.4f} | "
            f"{tiles:.2f} | {tiles * km2_per_tile * 3600:,.0f} |"
        )
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    run_script(main)

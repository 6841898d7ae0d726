"""Training speed: seconds per crop for one step (forward, backward, Adam) of the base model
and PRN, as ``geoprn train`` runs them (channels-last, bf16 autocast where the device computes
bf16 natively) against plain fp32 contiguous tensors.

The last column is what ``train`` sizes its micro-batches by: the bytes autograd keeps for
one crop's backward pass (``train`` allows 1.5 times that for the step's peak).
Networks as the configs build them (``base_unet_mnv2``, and ``prn_p64`` with the CPU-sized
``prn_lite`` and ``prn_tiny``, or ``--prn-config``), with their GFLOP per 512 x 512 window
(forward, both PRN branches), random inputs of 512 px crops; the median of ``--repeats`` steps
after one warm-up step, synchronised on CUDA.

    python benchmarks/train_speed.py                           # CPU, batch 2
    python benchmarks/train_speed.py --device cuda --batch-size 8
"""

from __future__ import annotations

import argparse
import functools
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import median_seconds, window_gflop  # noqa: E402

from geoprn.errors import run_script  # noqa: E402
from geoprn.inference import resolve_device
from geoprn.models.base import build_base
from geoprn.models.prn import PatchRefineNet
from geoprn.train import load_config, mixed_precision, saved_bytes


def seconds_per_step(
    net: torch.nn.Module, forward, x: torch.Tensor, autocast, repeats: int
) -> float:
    """Median wall time of one training step of ``net`` (outputs ``forward(net, x)``) on ``x``,
    after one warm-up step."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step() -> None:
        with autocast:
            loss = sum(o.float().mean() for o in forward(net, x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return median_seconds(step, repeats, 1, x.is_cuda)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--prn-config", action="append", help="PRN configs to time (default: p64, lite, tiny)"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    base = load_config("base_unet_mnv2")
    networks = {  # name: (build, input bands, forward giving the trained outputs)
        "base": (
            lambda: build_base(base["architecture"], base["arguments"]),
            3,
            lambda n, x: [n(x)],
        ),
    }
    for name in args.prn_config or ["prn_p64", "prn_lite", "prn_tiny"]:
        arguments = load_config(name)["arguments"]
        networks[f"PRN {name}"] = (
            lambda a=arguments: PatchRefineNet(**a),
            arguments.get("in_channels", 1),  # the probabilities, and image bands if any
            lambda n, x: n.logits(x),
        )
    autocast, _ = mixed_precision(device)
    precision = str(getattr(autocast, "fast_dtype", "fp32")).replace("torch.", "")
    ways = {
        "fp32, contiguous": (nullcontext(), False),
        f"channels-last, {precision}": (autocast, True),
    }
    print(
        f"device {device}, {torch.get_num_threads()} torch threads, batch {args.batch_size}, "
        f"{args.crop} px crops; train runs: channels-last, {precision}"
    )
    header = " | ".join(f"{w} (s/crop)" for w in ways)
    print(f"\n| model | GFLOP / window | {header} | speed-up | kept for backward (GB/crop) |")
    print("|---|---|" + "---|" * (len(ways) + 2))
    for name, (build, bands, forward) in networks.items():
        seconds = []
        for context, channels_last in ways.values():
            torch.manual_seed(0)
            net = build().to(device).train()
            x = torch.rand(args.batch_size, bands, args.crop, args.crop, device=device)
            if channels_last:
                net = net.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            step = seconds_per_step(net, forward, x, context, args.repeats)
            seconds.append(step / args.batch_size)
        with context:  # the last way's: as train runs it
            kept = saved_bytes(net, functools.partial(forward, net, x[:1])) / 1e9
        cells = " | ".join(f"{s:.3f}" for s in seconds)
        gflop = window_gflop(build(), bands)
        print(f"| {name} | {gflop:.1f} | {cells} | {seconds[0] / seconds[-1]:.2f}x | {kept:.2f} |")


if __name__ == "__main__":
    run_script(main)

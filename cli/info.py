"""``geoprn info CKPT``: print a checkpoint's header."""

from __future__ import annotations

import json

import click

from geoprn.gain import passes, recorded_gain
from geoprn.models.checkpoint import load_model
from geoprn.models.header import recorded_symmetries


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
def info(checkpoint: str) -> None:
    """Print the JSON header of CHECKPOINT, its parameter count and, for a refiner, its
    validated gain on held-out places (what decides whether `refine` runs it by default)."""
    model = load_model(checkpoint)
    header = dict(model.geoprn_meta)
    header["parameters"] = sum(p.numel() for p in model.net.parameters())
    click.echo(json.dumps(header, indent=2))
    gain = recorded_gain(header)  # a bad one: one line
    cut = header.get("threshold")
    click.echo(
        f"mask cut-off (refine --threshold auto): {cut:g}, tuned on held-out val places"
        if cut else "mask cut-off (refine --threshold auto): 0.5, none recorded",
        err=True,
    )  # fmt: skip
    if header["kind"] == "base":
        click.echo(
            "window symmetries averaged (refine --symmetries auto): "
            f"{recorded_symmetries(header)}", err=True,
        )  # fmt: skip
        if gain is not None:
            click.echo(f"measured: {gain.describe()}", err=True)
        return
    if gain is None:
        click.echo(
            "validated gain: none recorded (refine runs it only when asked by name)", err=True
        )
        return
    verdict = "a default refiner" if gain.positive else "not a default refiner: no gain"
    after = f"base {gain.base_sha256[:12]} {passes(gain.base_symmetries)}"
    click.echo(f"validated gain: {gain.describe()}; {verdict} after {after}", err=True)

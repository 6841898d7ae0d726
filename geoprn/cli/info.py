"""``geoprn info CKPT``: print a checkpoint's header."""

from __future__ import annotations

import json

import click

from geoprn.models.checkpoint import load_model


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
def info(checkpoint: str) -> None:
    """Print the JSON header of CHECKPOINT and its parameter count."""
    model = load_model(checkpoint)
    header = dict(model.geoprn_meta)
    header["parameters"] = sum(p.numel() for p in model.net.parameters())
    click.echo(json.dumps(header, indent=2))

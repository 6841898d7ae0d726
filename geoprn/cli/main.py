"""The ``geoprn`` command group; every GeoprnError becomes one line on stderr and exit 1."""

from __future__ import annotations

import logging
import warnings

import click
import dask

from geoprn import __version__
from geoprn.errors import GeoprnError, GeoprnWarning


class GeoprnGroup(click.Group):
    """A group that reports library errors as one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # third-party chatter
                warnings.simplefilter("default", GeoprnWarning)
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except GeoprnError as exc:
            click.echo(f"geoprn: error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("geoprn: interrupted; rerun the same command to resume", err=True)
            ctx.exit(130)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"geoprn: warning: {message}", err=True)


@click.group(cls=GeoprnGroup)
@click.version_option(__version__, prog_name="geoprn")
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does.")
def cli(verbose: bool) -> None:
    """Road segmentation of large GeoTIFF scenes: base model + PatchRefineNet, on Dask."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    # distributed sets its own loggers' levels when first imported (by a local cluster)
    dask.config.set({"logging.distributed": "info" if verbose else "warning"})


def _register() -> None:
    from geoprn.cli.evaluate import evaluate
    from geoprn.cli.info import info
    from geoprn.cli.refine import refine
    from geoprn.cli.train import train
    from geoprn.cli.vectorize import vectorize

    for command in (refine, train, vectorize, evaluate, info):
        cli.add_command(command)


_register()

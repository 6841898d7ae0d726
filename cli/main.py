"""The ``geoprn`` command group; every GeoprnError becomes one line on stderr and exit 1."""

from __future__ import annotations

import warnings

import click
import dask

from geoprn import __version__
from geoprn.cli.output import configure_logging, note
from geoprn.errors import GeoprnError, GeoprnWarning


class GeoprnGroup(click.Group):
    """A group that reports library errors as one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # third-party chatter
                if not ctx.params.get("quiet"):
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
    note(f"geoprn: warning: {message}")  # above a running progress bar, not into it


@click.group(cls=GeoprnGroup)
@click.version_option(__version__, prog_name="geoprn")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Also say what each stage does: blocks planned and resumed, where the time went "
    "(and other libraries' warnings).",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Print nothing but errors and what a command is for (info's header, evaluate's table).",
)
def cli(verbose: bool, quiet: bool) -> None:
    """Road segmentation of large GeoTIFF scenes: base model + PatchRefineNet, on Dask."""
    if verbose and quiet:
        raise click.UsageError("-v and -q contradict each other: give one")
    configure_logging(verbose, quiet)
    # distributed configures its loggers when first imported: levels only, no handler of its
    # own, so its records reach configure_logging's (workers it starts get the same setting)
    level = "WARNING" if verbose else "CRITICAL"
    loggers = {"distributed": {"level": level, "propagate": True}}
    dask.config.set({"logging": {"version": 1, "incremental": True, "loggers": loggers}})


def _register() -> None:
    from geoprn.cli.evaluate import evaluate
    from geoprn.cli.info import info
    from geoprn.cli.refine import refine
    from geoprn.cli.train import train
    from geoprn.cli.vectorize import vectorize

    for command in (refine, train, vectorize, evaluate, info):
        cli.add_command(command)


_register()

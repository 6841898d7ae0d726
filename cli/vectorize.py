"""``geoprn vectorize MASK -o roads.gpkg``: road centrelines from a road mask."""

from __future__ import annotations

from collections.abc import Callable

import click

from geoprn.cli.output import say
from geoprn.labels import parse_metres


def metres(what: str, allow_zero: bool = False) -> Callable:
    """A Click callback turning ``4m`` / ``4`` into metres, refusing anything else."""

    def parse(ctx: click.Context, param: click.Parameter, value: str) -> float:
        return parse_metres(value, what, allow_zero)

    return parse


def auto_threshold(ctx: click.Context, param: click.Parameter, value: str) -> float | None:
    """A ``--threshold`` of ``auto`` (None: the cut-off a refine run recorded) or a number."""
    if value == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"'auto' or a number, not {value!r}") from None


def vector_options(command: Callable) -> Callable:
    """``--simplify`` and ``--min-length``, shared by ``vectorize`` and ``refine --vectors``."""
    command = click.option(
        "--min-length",
        default="10m",
        show_default=True,
        callback=metres("--min-length", allow_zero=True),
        help="Drop spurs and isolated lines shorter than this.",
    )(command)
    return click.option(
        "--simplify",
        default="1m",
        show_default=True,
        callback=metres("--simplify", allow_zero=True),
        help="Simplification tolerance of the lines (Douglas-Peucker).",
    )(command)


@click.command()
@click.argument("mask", type=click.Path())
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Vector file to write: .gpkg, .geojson or .fgb.",
)
@vector_options
@click.option(
    "--threshold",
    default="auto",
    show_default=True,
    callback=auto_threshold,
    help="Road probability cut-off, for probability rasters and Zarr stores; auto: for the "
    "variable a refine store's mask came from, the cut-off its run recorded, else 0.5.",
)
@click.option(
    "--variable",
    default="auto",
    show_default=True,
    help="Variable of a refine Zarr store to read: refined, base, or auto: the one its mask "
    "came from (refined where a refiner ran).",
)
@click.option(
    "--block-size",
    default=2048,
    show_default=True,
    type=click.IntRange(min=64),
    help="Pixels per block side; the lines do not depend on it.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def vectorize(
    mask, output, simplify, min_length, threshold, variable, block_size, overwrite
) -> None:
    """Road centrelines of MASK (a mask GeoTIFF, a probability raster or a refine Zarr store)
    as LineStrings in its CRS, one per road between junctions and ends."""
    from geoprn.vectorize import check_output, extract_roads, write_roads

    check_output(output, overwrite)  # before the work, not after
    roads = extract_roads(
        mask,
        threshold=threshold,
        variable=variable,
        simplify_m=simplify,
        min_length_m=min_length,
        block_size=block_size,
    )
    path = write_roads(roads, output, overwrite=overwrite)
    say(f"{len(roads.lines)} roads, {roads.total_length_m / 1000:.2f} km: {path}")

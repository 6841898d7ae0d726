"""``geoprn evaluate PRED... --labels LABELS``: metrics table, CSV/JSON and an HTML report."""

from __future__ import annotations

from pathlib import Path

import click

from geoprn.cli.output import progress_bar, say
from geoprn.cli.vectorize import auto_threshold
from geoprn.labels import DEFAULT_ROAD_WIDTH, parse_metres


def _metres(ctx: click.Context, param: click.Parameter, value: str) -> float:
    return parse_metres(value, f"--{param.name.replace('_m', '').replace('_', '-')}")


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


@click.command()
@click.argument("predictions", nargs=-1, required=True, type=click.Path())
@click.option(
    "--labels",
    required=True,
    type=click.Path(),
    help="Label raster on the predictions' grid (0 background, nonzero road) or road "
    "centreline vectors (GeoPackage, GeoJSON, Shapefile, FlatGeobuf).",
)
@click.option(
    "--road-width",
    default=f"{DEFAULT_ROAD_WIDTH:g}m",
    show_default=True,
    callback=_metres,
    help="Width vector labels are burnt at, in metres.",
)
@click.option(
    "--buffer",
    "buffer_m",
    default="5m",
    show_default=True,
    callback=_metres,
    help="Centrelines within this distance match (completeness, correctness, quality).",
)
@click.option(
    "--threshold",
    default="auto",
    show_default=True,
    callback=auto_threshold,
    help="Road probability cut-off; auto: the one the refine run recorded (its mask's), for "
    "the variable its mask came from, else 0.5.",
)
@click.option(
    "--block-size",
    default=512,
    show_default=True,
    type=click.IntRange(min=16),
    help="Side of the blocks of the per-block figures, in pixels.",
)
@click.option(
    "--chip",
    "chip_m",
    default="400m",
    show_default=True,
    callback=_metres,
    help="Side of the chips APLS is computed on and averaged over (SpaceNet: 400 m).",
)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write the table as CSV.")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Write the table as JSON."
)
@click.option(
    "--report", type=click.Path(dir_okay=False), help="Write a self-contained HTML report."
)
@click.option(
    "--image",
    type=click.Path(dir_okay=False),
    help="The scene, for the report's pictures (default: the one refine recorded).",
)
@click.option("--overwrite", is_flag=True, help="Replace existing CSV, JSON or report files.")
def evaluate(
    predictions,
    labels,
    road_width,
    buffer_m,
    threshold,
    block_size,
    chip_m,
    csv_path,
    json_path,
    report,
    image,
    overwrite,
) -> None:
    """Score PREDICTIONS (refine output folders, masks or probability rasters) against LABELS.

    Prints road IoU, mIoU, mBA (d = 15 px), completeness, correctness, quality and APLS, with
    the base model's row beside the refined one when a folder holds both.
    """
    from geoprn import evaluate as ev  # numpy, shapely and zarr load only when needed
    from geoprn import evaluate_inputs as inputs

    outputs = [_path(csv_path), _path(json_path), _path(report)]
    ev.check_outputs(outputs, overwrite)
    settings = ev.Settings(threshold, road_width, buffer_m, block_size=block_size, chip_m=chip_m)
    evaluations = []
    for path in predictions:
        prediction = inputs.open_prediction(path)
        if image is not None:
            prediction.image = inputs.check_image(image, prediction.grid)
        inputs.warn_if_no_crs(prediction.grid)
        truth = inputs.open_labels(labels, prediction.grid, road_width)
        with progress_bar(desc=prediction.name, unit="part", leave=False) as bar:

            def progress(done: int, total: int, bar=bar) -> None:
                bar.total = total
                bar.update(done - bar.n)

            evaluations.append(ev.evaluate(prediction, truth, settings, progress))
    records = ev.results_table(evaluations)
    click.echo(ev.format_table(records))  # what the command is for: printed even with -q
    if csv_path:
        say(f"csv: {ev.write_csv(records, Path(csv_path))}")
    if json_path:
        say(f"json: {ev.write_json(records, settings, labels, Path(json_path))}")
    if report:
        from geoprn.report import write_report

        say(f"report: {write_report(evaluations, Path(report), settings)}")

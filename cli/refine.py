"""``geoprn refine SCENE -o OUTDIR``: base model + PRN over a whole scene."""

from __future__ import annotations

import contextlib
import glob
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from geoprn.cli.output import progress_bar, say
from geoprn.cli.vectorize import vector_options
from geoprn.errors import BatchError
from geoprn.inference import PRECISIONS
from geoprn.tiling import DEFAULT_BLOCK_SIZE

if TYPE_CHECKING:
    from geoprn.blocks import BlockResult
    from geoprn.pipeline import RunRecord


def _bands(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(b) for b in value.split(",")]
    except ValueError:
        raise click.BadParameter("give band numbers like 3,2,1") from None


@click.command()
@click.argument("scenes", nargs=-1, metavar="SCENE...")
@click.option(
    "--scenes",
    "scenes_file",
    type=click.Path(dir_okay=False),
    help="A file of scenes to refine, one path or URL a line (with or instead of SCENE...).",
)
@click.option(
    "--stac",
    type=click.Path(dir_okay=False),
    help="A STAC Item or ItemCollection file: each item's asset is a scene, named by its id.",
)
@click.option(
    "--asset",
    help="The STAC asset to refine (default: visual, else the item's first GeoTIFF asset).",
)
@click.option(
    "-o",
    "--outdir",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder (created if missing).",
)
@click.option(
    "--base",
    type=click.Path(dir_okay=False),
    help="Base model checkpoint (default: the shipped weights).",
)
@click.option(
    "--prn",
    type=click.Path(dir_okay=False),
    help="PRN checkpoint (default: the shipped weights, when shipped).",
)
@click.option(
    "--probs",
    type=click.Path(dir_okay=False),
    help="Refine this probability raster (on the scene's grid) instead of running the base model.",
)
@click.option(
    "--refiner",
    type=click.Choice(["auto", "prn", "bpr", "prn+bpr", "none"]),
    default="auto",
    show_default=True,
    help="What refines the base probabilities: PatchRefineNet, Boundary Patch Refinement "
    "(on each window, with the image), both in that order, or nothing. auto: each refiner "
    "whose checkpoint records a gain above zero (90 %% interval) on held-out places for this "
    "base model (`geoprn info` prints it); else the base model alone, said once.",
)
@click.option("--bpr", type=click.Path(dir_okay=False), help="BPR checkpoint (default: shipped).")
@click.option("--no-prn", is_flag=True, help="Leave PRN out of --refiner (base model only).")
@click.option("--bands", callback=_bands, help="Scene bands to feed the base model, e.g. 3,2,1.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="Model arithmetic: auto is bf16 where the device computes it natively (recent GPUs, "
    "CPUs with AVX512-BF16 or AMX), else fp32.",
)
@click.option(
    "--batch-size",
    default="auto",
    show_default=True,
    help="Windows per forward pass; auto: 1 on a CPU (fastest there), up to 32 on a GPU as its "
    "memory allows.",
)
@click.option(
    "--block-size",
    default=DEFAULT_BLOCK_SIZE,
    show_default=True,
    help="Pixels per Dask block side (multiple of 512); the result does not change.",
)
@click.option(
    "--overlap",
    default=64,
    show_default=True,
    help="Pixels shared by neighbouring 512 windows, blended linearly.",
)
@click.option(
    "--compile",
    "compile_models",
    is_flag=True,
    help="Compile base model and PRN with torch.compile: about 2x faster on a GPU once "
    "compiled, which takes about 20 s per worker on an H100; worth it on large scenes.",
)
@click.option(
    "--scheduler",
    help="Address of a Dask distributed scheduler, tcp://HOST:PORT (default: local threads).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Blocks in flight on the local scheduler (default: 1 on the CPU, 3 on a GPU).",
)
@click.option(
    "--threshold",
    default="auto",
    show_default=True,
    help="Road probability cut-off: a number, or auto: the one the last model's checkpoint "
    "records (chosen on held-out val places; geoprn info prints it), else 0.5.",
)
@click.option(
    "--symmetries",
    type=click.Choice(["auto", "1", "4", "8"]),
    default="auto",
    show_default=True,
    help="Average the base model over this many flips and quarter turns of each window "
    "(that many passes); auto: as its checkpoint records (geoprn info prints it), else 1.",
)
@click.option(
    "--zarr-format",
    type=click.Choice(["2", "3"]),
    default="2",
    show_default=True,
    help="Zarr format of the probability store (GDAL 3.10 and older read only 2).",
)
@click.option(
    "--resample",
    type=click.Choice(["auto", "off"]),
    default="auto",
    show_default=True,
    help="auto: run the models at the ground resolution they were trained at when the "
    "scene's differs by more than 1.5x; off: on the scene's own pixels.",
)
@click.option(
    "--vectors", is_flag=True, help="Also write road centrelines, OUTDIR/<stem>_roads.gpkg."
)
@vector_options
@click.option("--overwrite", is_flag=True, help="Replace outputs of a different command.")
def refine(
    scenes,
    scenes_file,
    stac,
    asset,
    outdir,
    refiner,
    no_prn,
    compile_models,
    simplify,
    min_length,
    zarr_format,
    **options,
) -> None:
    """Segment roads in each SCENE; write probabilities (Zarr), a road mask (COG) and, with
    --vectors, road centrelines (GeoPackage) to OUTDIR, a folder or an s3://bucket/prefix/.

    A SCENE is a file, an https:// or s3:// URL (or a GDAL /vsi path), a folder or an
    s3://bucket/prefix/ (its GeoTIFFs), or a glob. Given more than one scene (or --scenes,
    --stac), the models load once, a scene that fails is reported and skipped, and a table
    of every scene is printed and written to OUTDIR/batch.json; the exit status is 0 only
    if every scene succeeded.

    Rerunning the same command after a crash computes only the blocks that are missing.
    """
    from geoprn.batch import gather_scenes, refine_batch, summary_table
    from geoprn.pipeline import refine as run_refine  # Dask and Zarr load only when needed

    auto = refiner == "auto" and not no_prn  # the default rule: validated refiners only
    options.update(
        use_prn=None if auto else "prn" in refiner and not no_prn,
        use_bpr=None if auto else "bpr" in refiner,
        compile=compile_models,
        zarr_format=int(zarr_format),
        simplify_m=simplify,
        min_length_m=min_length,
    )
    single = len(scenes) == 1 and scenes_file is None and stac is None
    if single and not _names_many(scenes[0]):
        with _progress(scenes[0]) as callbacks:
            record = run_refine(scenes[0], outdir, **options, **callbacks)
        _say_record(record)
        return
    if options["probs"] is not None:
        raise click.UsageError("--probs holds one scene's probabilities: give one SCENE")
    sources = gather_scenes(scenes, scenes_file, stac, asset)
    if not sources:
        raise click.UsageError("give at least one SCENE, --scenes FILE or --stac FILE")
    report = refine_batch(sources, outdir, callbacks=lambda s: _progress(s.name), **options)
    say(summary_table(report))
    if report.failed:
        raise BatchError(
            f"{len(report.failed)} of {len(report.scenes)} scenes failed "
            f"(see {str(outdir).rstrip('/')}/batch.json); rerun the same command to resume"
        )


def _names_many(scene: str) -> bool:
    """Whether one SCENE argument names a batch: a folder, a bucket prefix or a glob."""
    from geoprn.remote import is_remote

    if scene.startswith("s3://"):
        return scene.endswith("/") or glob.has_magic(scene)
    path = Path(scene)
    return not is_remote(scene) and (
        (path.is_dir() and path.suffix != ".zarr") or (not path.exists() and glob.has_magic(scene))
    )


@contextlib.contextmanager
def _progress(name: str) -> Iterator[dict[str, Callable]]:
    """A progress bar over one scene's windows, as ``refine``'s callbacks."""
    bar = progress_bar(unit="window", desc=Path(name).stem or "refine")

    def on_windows(run: int, planned: int) -> None:
        if bar.total is None:
            bar.reset(total=planned)
        bar.update(run)

    def progress(done: int, total: int, result: BlockResult | None) -> None:
        bar.set_postfix(blocks=f"{done}/{total}")

    try:
        yield {"progress": progress, "on_windows": on_windows}
        bar.total = bar.n  # fewer than planned where windows were nodata
        bar.refresh()
    finally:
        bar.close()


def _say_record(record: RunRecord) -> None:
    blocks = record.blocks
    say(
        f"{blocks['computed']} blocks computed, {blocks['skipped']} skipped (nodata), "
        f"{blocks['resumed']} done before; {record.windows} windows in "
        f"{record.seconds['total']:.1f} s"
    )
    for name, path in record.outputs.items():
        say(f"{name}: {path}")

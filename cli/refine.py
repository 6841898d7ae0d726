"""``geoprn refine SCENE -o OUTDIR``: base model + PRN over a whole scene."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from geoprn.cli.output import progress_bar, say
from geoprn.cli.vectorize import vector_options
from geoprn.inference import PRECISIONS
from geoprn.tiling import DEFAULT_BLOCK_SIZE

if TYPE_CHECKING:
    from geoprn.blocks import BlockResult


def _bands(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(b) for b in value.split(",")]
    except ValueError:
        raise click.BadParameter("give band numbers like 3,2,1") from None


@click.command()
@click.argument("scene", type=click.Path(dir_okay=False))
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
@click.option("--threshold", default=0.5, show_default=True, help="Road probability cut-off.")
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
    scene,
    outdir,
    base,
    prn,
    probs,
    refiner,
    bpr,
    no_prn,
    bands,
    device,
    precision,
    batch_size,
    block_size,
    overlap,
    compile_models,
    scheduler,
    threads,
    threshold,
    zarr_format,
    resample,
    vectors,
    simplify,
    min_length,
    overwrite,
) -> None:
    """Segment roads in SCENE; write probabilities (Zarr), a road mask (COG) and, with
    --vectors, road centrelines (GeoPackage) to OUTDIR.

    Rerunning the same command after a crash computes only the blocks that are missing.
    """
    from geoprn.pipeline import refine as run_refine  # Dask and Zarr load only when needed

    auto = refiner == "auto" and not no_prn  # the default rule: validated refiners only
    bar = progress_bar(unit="window", desc="refine")  # windows: a block can take minutes

    def on_windows(run: int, planned: int) -> None:
        if bar.total is None:
            bar.reset(total=planned)
        bar.update(run)

    def progress(done: int, total: int, result: BlockResult | None) -> None:
        bar.set_postfix(blocks=f"{done}/{total}")

    try:
        record = run_refine(
            scene,
            outdir,
            base=base,
            prn=prn,
            probs=probs,
            use_prn=None if auto else "prn" in refiner and not no_prn,
            bpr=bpr,
            use_bpr=None if auto else "bpr" in refiner,
            bands=bands,
            device=device,
            precision=precision,
            batch_size=batch_size,
            block_size=block_size,
            overlap=overlap,
            compile=compile_models,
            scheduler=scheduler,
            threads=threads,
            threshold=threshold,
            overwrite=overwrite,
            zarr_format=int(zarr_format),
            resample=resample,
            vectors=vectors,
            simplify_m=simplify,
            min_length_m=min_length,
            progress=progress,
            on_windows=on_windows,
        )
        bar.total = bar.n  # fewer than planned where windows were nodata
        bar.refresh()
    finally:
        bar.close()
    blocks = record.blocks
    say(
        f"{blocks['computed']} blocks computed, {blocks['skipped']} skipped (nodata), "
        f"{blocks['resumed']} done before; {record.windows} windows in "
        f"{record.seconds['total']:.1f} s"
    )
    for name, path in record.outputs.items():
        say(f"{name}: {path}")

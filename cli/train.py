"""``geoprn train base|prn TILES... -o OUT.safetensors``: train models from labelled tiles."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from geoprn.cli.output import progress_bar, quiet, say
from geoprn.crossfit import train_prn_crossfit
from geoprn.labels import parse_metres
from geoprn.train import load_config, train_base, train_bpr, train_prn


def _nodata(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None or value.lower() == "none":
        return value and "none"
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter("give a number, or 'none'") from None


def _road_width(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    return None if value is None else parse_metres(value)


def _common_options(default_config: str, default_val_fraction: float) -> Callable:
    """The options ``train base`` and ``train prn`` share."""
    options = [
        click.argument("tiles", nargs=-1, required=True),
        click.option(
            "-o",
            "--output",
            required=True,
            type=click.Path(dir_okay=False),
            help="Checkpoint to write (.safetensors); <OUTPUT>.state.safetensors holds the "
            "resumable state, <OUTPUT>.log.csv one row per epoch.",
        ),
        click.option(
            "--config",
            "config_name",
            default=default_config,
            show_default=True,
            help="Config name in the shipped configs/ or a path to a YAML file.",
        ),
        click.option(
            "--val",
            "val_tiles",
            multiple=True,
            help="Validation tiles (same forms as TILES); default: hold out --val-fraction.",
        ),
        click.option(
            "--val-fraction",
            default=default_val_fraction,
            show_default=True,
            help="Share of TILES held out for validation (seeded by --seed).",
        ),
        click.option("--epochs", type=int, help="Override the config's epochs."),
        click.option("--steps-per-epoch", type=int, help="Override the config's steps per epoch."),
        click.option("--batch-size", type=int, help="Override the config's batch size."),
        click.option("--crop", type=int, help="Override the config's crop size (pixels)."),
        click.option(
            "--micro-batch",
            help="Crops per forward/backward pass, gradients accumulated over the batch; 'auto' "
            "(the configs' default): as many as fit in half the free memory.",
        ),
        click.option("--lr", type=float, help="Override the config's learning rate."),
        click.option(
            "--ema-decay",
            type=float,
            help="Validate and keep the moving average of the weights with this decay per "
            "step, e.g. 0.998 (default: the config's, 0: off).",
        ),
        click.option(
            "--road-width",
            callback=_road_width,
            help="Width in metres of roads burnt from centreline vectors, e.g. 4m "
            "(default: the config's, 4m).",
        ),
        click.option(
            "--max-minutes",
            type=float,
            help="Stop after the epoch in progress once this many minutes have passed; the "
            "best checkpoint is kept.",
        ),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
        click.option("--seed", default=0, show_default=True, help="Seeds split, weights, crops."),
        click.option("--resume", is_flag=True, help="Continue from <OUTPUT>.state.safetensors."),
        click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT and its state."),
        click.option("--half", is_flag=True, help="Store the final weights as float16."),
    ]

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _run(trainer: Callable, desc: str, tiles, output, config: dict, **kwargs: Any) -> dict:
    """Run ``trainer`` with a progress bar and print its summary."""
    bar = progress_bar(unit="step", desc=desc)

    def tell(line: str) -> None:  # above the bar, on stdout; not with -q
        if not quiet():
            bar.write(line)

    def progress(event: str, info: dict) -> None:
        if event == "start":
            bar.reset(total=info["total_steps"])
            bar.update(info["done_steps"])
        elif event == "step":
            bar.set_postfix(epoch=info["epoch"], loss=f"{info['loss']:.3f}", refresh=False)
            bar.update(1)
        elif event == "fold":
            tell(f"fold {info['fold']}/{info['folds']} trained, its held-out tiles predicted")
        elif event == "epoch":
            tell(
                f"epoch {info['epoch']}: train loss {info['train_loss']:.4f}, "
                f"val road IoU {info['val_road_iou']:.4f} "
                f"(best {info['best_val_road_iou']:.4f}), lr {info['lr']:.1e}"
            )

    try:
        summary = trainer(tiles, config, output, progress=progress, **kwargs)
    finally:
        bar.close()
    say(
        f"stopped ({summary['stopped']}) after {summary['epochs']} epochs, "
        f"{summary['steps']} steps, {summary['minutes']:.1f} min; best val road IoU "
        f"{summary['best_val_road_iou']:.4f} at epoch {summary['best_epoch']}"
    )
    say(
        f"train tiles: {len(summary['split']['train'])}, "
        f"val tiles: {', '.join(summary['split']['val'])}"
    )
    say(f"checkpoint: {summary['checkpoint']}")
    say(f"epoch log: {summary['history_csv']}, curves: {summary['curves_png']}")
    return summary


INIT_OPTION = click.option(
    "--init",
    type=click.Path(dir_okay=False),
    help="Start from this checkpoint's weights (a later piece of a long run, or fine-tuning "
    "on your own labels) instead of random ones; same network as --config. They are "
    "validated first and kept unless an epoch beats them.",
)

SYMMETRIES_OPTION = click.option(
    "--symmetries",
    type=click.Choice(["1", "4", "8"]),
    default="1",
    show_default=True,
    help="Learn from the base model's map averaged over this many flips and quarter turns "
    "of each window, as refine --symmetries makes it.",
)

OVERRIDES = (
    "epochs",
    "steps_per_epoch",
    "batch_size",
    "crop",
    "road_width",
    "micro_batch",
    "ema_decay",
)
"""Options that override a config setting of the same name."""


@click.group()
def train() -> None:
    """Train a model from labelled tiles."""


@train.command("base")
@_common_options("base_unet_mnv2", 0.1)
@click.option(
    "--nodata",
    callback=_nodata,
    help="Pixels whose bands all equal this value are nodata; 'none' turns that off "
    "(default: the config's).",
)
@click.option(
    "--lovasz-weight",
    type=float,
    help="Add the Lovász hinge of each crop (a surrogate of its road IoU) to the loss with "
    "this weight, e.g. 1 (default: the config's, 0: BCE + Dice alone).",
)
@INIT_OPTION
def base(tiles, output, config_name, nodata, val_tiles, **options) -> None:
    """Train a base segmentation model on TILES and save its best weights to OUTPUT.

    TILES are folders with images/ + masks/ (matching names), folders of <id>_sat/<id>_mask
    pairs, IMAGE,LABEL pairs, or images with a <stem>_mask raster beside them. A label may be
    road centreline vectors (.gpkg, .geojson, .shp, .fgb; any CRS), burnt --road-width wide;
    <stem>_roads.<ext> beside an image is found too.
    """
    overrides = {k: options.pop(k) for k in OVERRIDES}
    lovasz_weight = options.pop("lovasz_weight")
    config = load_config(
        config_name, lr=options.pop("lr"), nodata=nodata, lovasz_weight=lovasz_weight, **overrides
    )
    if nodata == "none":
        config["nodata"] = None
    _run(train_base, "train base", tiles, output, config, val_tiles=val_tiles or None, **options)


@train.command("prn")
@_common_options("prn_p64", 0.2)
@click.option(
    "--base",
    type=click.Path(dir_okay=False),
    help="The base checkpoint PRN learns to refine (its probabilities are cached).",
)
@click.option(
    "--probs",
    "probs_dir",
    type=click.Path(file_okay=False),
    help="Instead of --base: a folder of probability rasters named like the tiles' images.",
)
@click.option(
    "--folds",
    type=click.IntRange(min=2),
    help="Instead of --base: cross-fit K base models (each tile's probabilities from the one "
    "that did not train on it) so PRN learns from every tile; kept in <OUTPUT>.folds/.",
)
@click.option(
    "--base-config",
    default="base_unet_mnv2",
    show_default=True,
    help="With --folds: the config of the fold base models.",
)
@INIT_OPTION
@SYMMETRIES_OPTION
@click.option(
    "--fold-workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --folds: folds trained at once, in worker processes sharing the device.",
)
@click.option(
    "--scheduler",
    help="With --folds: a Dask scheduler address (tcp://HOST:PORT) whose workers train the "
    "folds; they must see TILES and OUTPUT at the same paths.",
)
def prn(
    tiles,
    output,
    config_name,
    base,
    probs_dir,
    folds,
    base_config,
    init,
    symmetries,
    fold_workers,
    scheduler,
    val_tiles,
    **options,
) -> None:
    """Train a PatchRefineNet on TILES for a base model and save its best weights to OUTPUT.

    Use tiles the base model never trained on (the paper's protocol: the base model trains on
    the train split, PRN on the val split). TILES take the same forms as for `train base`.
    """
    overrides = {k: options.pop(k) for k in OVERRIDES}
    config = load_config(config_name, lr=options.pop("lr"), **overrides)
    if folds is None:
        if fold_workers != 1 or scheduler:
            raise click.UsageError("--fold-workers and --scheduler go with --folds")
        sources = {"base": base, "probs_dir": probs_dir, "init": init}
        sources["symmetries"] = int(symmetries)
        trainer = train_prn
    elif base or probs_dir or symmetries != "1":
        raise click.UsageError(
            "--folds trains its own base models: drop --base, --probs and --symmetries"
        )
    else:
        base_settings = load_config(base_config, road_width=config["road_width"])
        sources = {
            "base_config": base_settings,
            "folds": folds,
            "fold_workers": fold_workers,
            "scheduler": scheduler,
            "init": init,
        }
        trainer = train_prn_crossfit
    summary = _run(
        trainer,
        "train prn",
        tiles,
        output,
        config,
        val_tiles=val_tiles or None,
        **sources,
        **options,
    )
    say(f"base model at 0.5 on the val tiles: road IoU {summary['base_val_road_iou']:.4f}")
    if "threshold" in summary:
        say(f"mask cut-off {summary['threshold']:.2f}, best on the val tiles (recorded)")


@train.command("bpr")
@_common_options("bpr_default", 0.2)
@click.option(
    "--base",
    type=click.Path(dir_okay=False),
    help="The base checkpoint whose predictions BPR refines (default: the shipped weights).",
)
@click.option(
    "--prn",
    type=click.Path(dir_okay=False),
    help="The PRN run after the base model (default: the shipped weights).",
)
@click.option("--no-prn", is_flag=True, help="Train BPR on the base model's predictions alone.")
@SYMMETRIES_OPTION
def bpr(tiles, output, config_name, base, prn, no_prn, symmetries, val_tiles, **options) -> None:
    """Train a Boundary Patch Refinement network on TILES and save its best weights to OUTPUT.

    Boxes are cut along the boundary of the base (+ PRN) predictions on the tiles, which are
    computed once and cached beside OUTPUT. TILES take the same forms as for `train base`.
    """
    from geoprn.models.checkpoint import DEFAULT_BASE, DEFAULT_PRN

    overrides = {k: options.pop(k) for k in OVERRIDES}
    config = load_config(config_name, lr=options.pop("lr"), **overrides)
    prn = None if no_prn else prn or DEFAULT_PRN
    summary = _run(
        train_bpr,
        "train bpr",
        tiles,
        output,
        config,
        val_tiles=val_tiles or None,
        base=base or DEFAULT_BASE,
        prn=prn,
        symmetries=int(symmetries),
        **options,
    )
    say(f"without BPR on the val tiles: road IoU {summary['before_val_road_iou']:.4f}")

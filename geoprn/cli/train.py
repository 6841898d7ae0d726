"""``geoprn train base TILES... -o OUT.safetensors``: train models from labelled tiles."""

from __future__ import annotations

import click
from tqdm import tqdm

from geoprn.train import load_config, train_base


def _nodata(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None or value.lower() == "none":
        return value and "none"
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter("give a number, or 'none'") from None


@click.group()
def train() -> None:
    """Train a model from labelled tiles."""


@train.command("base")
@click.argument("tiles", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Checkpoint to write (.safetensors); <OUTPUT>.state.pt holds the resumable state.",
)
@click.option(
    "--config",
    "config_name",
    default="base_unet_mnv2",
    show_default=True,
    help="Config name in geoprn/configs/ or a path to a YAML file.",
)
@click.option(
    "--val",
    "val_tiles",
    multiple=True,
    help="Validation tiles (same forms as TILES); default: hold out --val-fraction.",
)
@click.option(
    "--val-fraction",
    default=0.1,
    show_default=True,
    help="Share of TILES held out for validation (seeded by --seed).",
)
@click.option("--epochs", type=int, help="Override the config's epochs.")
@click.option("--steps-per-epoch", type=int, help="Override the config's steps per epoch.")
@click.option("--batch-size", type=int, help="Override the config's batch size.")
@click.option("--crop", type=int, help="Override the config's crop size (pixels).")
@click.option("--lr", type=float, help="Override the config's learning rate.")
@click.option(
    "--nodata",
    callback=_nodata,
    help="Pixels whose bands all equal this value are "
    "nodata; 'none' turns that off (default: the config's).",
)
@click.option(
    "--max-minutes",
    type=float,
    help="Stop after the epoch in progress once this "
    "many minutes have passed; the best checkpoint is kept.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--seed", default=0, show_default=True, help="Seeds the split, weights and crops.")
@click.option("--resume", is_flag=True, help="Continue from <OUTPUT>.state.pt.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT and its state.")
@click.option("--half", is_flag=True, help="Store the final weights as float16.")
def base(
    tiles,
    output,
    config_name,
    val_tiles,
    val_fraction,
    epochs,
    steps_per_epoch,
    batch_size,
    crop,
    lr,
    nodata,
    max_minutes,
    device,
    seed,
    resume,
    overwrite,
    half,
) -> None:
    """Train a base segmentation model on TILES and save its best weights to OUTPUT.

    TILES are folders with images/ + masks/ (matching names), folders of <id>_sat/<id>_mask
    pairs, IMAGE,LABEL pairs, or images with a <stem>_mask raster beside them.
    """
    config = load_config(
        config_name,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        crop=crop,
        lr=lr,
        nodata=nodata,
    )
    if nodata == "none":
        config["nodata"] = None
    bar = tqdm(unit="step", desc="train base", dynamic_ncols=True, disable=None)

    def progress(event: str, info: dict) -> None:
        if event == "start":
            bar.reset(total=info["total_steps"])
            bar.update(info["done_steps"])
        elif event == "step":
            bar.set_postfix(epoch=info["epoch"], loss=f"{info['loss']:.3f}", refresh=False)
            bar.update(1)
        elif event == "epoch":
            bar.write(
                f"epoch {info['epoch']}: train loss {info['train_loss']:.4f}, "
                f"val road IoU {info['val_road_iou']:.4f} "
                f"(best {info['best_val_road_iou']:.4f}), lr {info['lr']:.1e}"
            )

    try:
        summary = train_base(
            tiles,
            config,
            output,
            val_fraction=val_fraction,
            val_tiles=val_tiles or None,
            seed=seed,
            resume=resume,
            overwrite=overwrite,
            max_minutes=max_minutes,
            device=device,
            half=half,
            progress=progress,
        )
    finally:
        bar.close()
    click.echo(
        f"stopped ({summary['stopped']}) after {summary['epochs']} epochs, "
        f"{summary['steps']} steps, {summary['minutes']:.1f} min; best val road IoU "
        f"{summary['best_val_road_iou']:.4f} at epoch {summary['best_epoch']}"
    )
    click.echo(
        f"train tiles: {len(summary['split']['train'])}, "
        f"val tiles: {', '.join(summary['split']['val'])}"
    )
    click.echo(f"checkpoint: {summary['checkpoint']}")

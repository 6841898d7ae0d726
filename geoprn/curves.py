"""A PNG of the training curves (train loss and validation road IoU per epoch), drawn with
Pillow, which torchvision and scikit-image already bring."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

PANEL = (420, 260)
MARGIN = (56, 30, 16, 36)  # left, top, right, bottom
SERIES = (
    ("train_loss", "train loss", (31, 119, 180)),
    ("val_road_iou", "validation road IoU (grey: best epoch)", (214, 39, 40)),
)


def _panel(
    draw: ImageDraw.ImageDraw,
    offset: int,
    epochs: list[int],
    values: list[float],
    best: int,
    title: str,
    colour: tuple[int, int, int],
) -> None:
    font = ImageFont.load_default(size=13)
    left, top = offset + MARGIN[0], MARGIN[1]
    right, bottom = offset + PANEL[0] - MARGIN[2], PANEL[1] - MARGIN[3]
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text((left, 8), title, fill=colour, font=font)
    low, high = min(values), max(values)
    first, last = epochs[0], epochs[-1]
    xs = [left + (right - left) * (e - first) / max(last - first, 1) for e in epochs]
    ys = [bottom - (bottom - top) * (v - low) / ((high - low) or 1.0) for v in values]
    best_x = left + (right - left) * (best - first) / max(last - first, 1)
    draw.line((best_x, top, best_x, bottom), fill=(160, 160, 160))
    if len(xs) > 1:
        draw.line(list(zip(xs, ys, strict=True)), fill=colour, width=2)
    for x, y in zip(xs, ys, strict=True):
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    draw.text((offset + 4, top - 6), f"{high:.3f}", fill="black", font=font)
    draw.text((offset + 4, bottom - 8), f"{low:.3f}", fill="black", font=font)
    draw.text((left, bottom + 6), f"epoch {first}", fill="black", font=font)
    draw.text((right - 64, bottom + 6), f"epoch {last}", fill="black", font=font)


def plot_history(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Draw one panel per series against the epoch, each scaled to its own range, with the
    best validation epoch marked. ``history`` rows need ``epoch``, ``train_loss`` and
    ``val_road_iou`` (numbers or numeric strings, as read back from the CSV log)."""
    image = Image.new("RGB", (PANEL[0] * len(SERIES), PANEL[1]), "white")
    if history:
        draw = ImageDraw.Draw(image)
        epochs = [int(h["epoch"]) for h in history]
        scores = [float(h["val_road_iou"]) for h in history]
        best = epochs[scores.index(max(scores))]
        for k, (key, title, colour) in enumerate(SERIES):
            values = [float(h[key]) for h in history]
            _panel(draw, k * PANEL[0], epochs, values, best, title, colour)
    path = Path(path)
    image.save(path)
    return path

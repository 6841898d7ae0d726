"""Training recipes: the YAML configs in ``configs/`` (or the user's own), read and checked."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import Field

from geoprn.errors import InputError
from geoprn.models.header import reads_image
from geoprn.train.memory import memory_cap

PositiveInt = Annotated[int, Field(gt=0)]
Count = Annotated[int, Field(ge=0)]
Share = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class Recipe(pydantic.BaseModel):
    """A training recipe's settings, each checked for type and range (a wrong one is one
    line naming it). Settings a recipe leaves out take these defaults; unknown ones (a typo)
    are refused rather than ignored."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=False)

    name: str | None = None
    kind: Literal["base", "prn", "bpr"] = "base"
    architecture: str
    arguments: dict[str, Any]
    bands: Annotated[list[PositiveInt], Field(min_length=1)]
    tile_size: PositiveInt = 512
    gsd: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    nodata: int | float | list[int | float] | Literal["none"] | None = None
    crop: PositiveInt = 256
    batch_size: PositiveInt = 8
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    epochs: PositiveInt = 30
    steps_per_epoch: PositiveInt = 100
    patience: Count = 8
    lr_patience: Count = 3
    lr_factor: Annotated[float, Field(gt=0, lt=1)] = 0.5
    min_lr: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-6
    dice_weight: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    lovasz_weight: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Weight of the Lovász hinge in a base model's loss (0: BCE + Dice alone)."""
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Validate and keep an exponential moving average of the weights (0: the weights)."""
    val_batch: PositiveInt = 4
    workers: Count = 0
    road_width: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 4.0
    micro_batch: str | int = "auto"  # 'auto' or a whole number of crops (checked below)
    # BPR's boxes (kind: bpr)
    box: PositiveInt | None = None
    input_size: PositiveInt | None = None
    nms_iou: Share | None = None
    nms_iou_train: Share | None = None

    @pydantic.field_validator("micro_batch", mode="before")
    @classmethod
    def _micro_batch(cls, value: Any) -> str | int:
        text = str(value)
        if text == "auto":
            return text
        if not (text.isdigit() and int(text) >= 1):
            raise ValueError(f"must be 'auto' or a whole number of crops, not {text!r}")
        return int(text)


BPR_KEYS = ("box", "input_size", "nms_iou", "nms_iou_train")
DEFAULTS: dict[str, Any] = {
    k: f.default
    for k, f in Recipe.model_fields.items()
    if not f.is_required() and k not in BPR_KEYS
}
"""Training settings a config may leave out."""


MODEL_KEYS = ("architecture", "arguments", "bands")


def config_path(name_or_path: str | Path) -> Path:
    """Resolve a shipped config's name (``base_unet_mnv2``, in ``configs/``) or a YAML path.

    Raises:
        InputError: no such config.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    packaged = resources.files("geoprn.configs") / f"{path.stem}.yaml"
    if path.parent == Path(".") and packaged.is_file():
        return Path(str(packaged))
    known = sorted(
        Path(p.name).stem
        for p in (resources.files("geoprn.configs")).iterdir()
        if p.name.endswith(".yaml")
    )
    raise InputError(f"config {name_or_path!s} not found (packaged configs: {', '.join(known)})")


def load_config(name_or_path: str | Path, **overrides: Any) -> dict[str, Any]:
    """Read a training config and apply ``overrides`` (``None`` values are ignored).

    Raises:
        InputError: missing file, bad YAML, or a setting of the wrong type or range
            (:class:`Recipe`), one line naming it.
    """
    path = config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path} must hold a mapping of settings")
    given = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    given.setdefault("name", path.stem)
    try:
        recipe = Recipe.model_validate(given)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "the recipe"
        if error["type"] == "value_error":  # the message says what was given
            message = error["msg"].removeprefix("Value error, ")
            raise InputError(f"{path}: {where} {message}") from None
        got = "" if error["type"] == "missing" else f" (got {error['input']!r})"
        raise InputError(f"{path}: {where}: {error['msg']}{got}") from None
    if recipe.kind == "bpr":
        missing = [k for k in BPR_KEYS if getattr(recipe, k) is None]
        if missing:
            raise InputError(f"{path}: a bpr recipe needs {', '.join(missing)}")
    config = recipe.model_dump(exclude={k for k in BPR_KEYS if getattr(recipe, k) is None})
    in_channels = config["arguments"].get("in_channels", 3)
    expected = len(config["bands"]) + reads_image(config)  # and the mask or probabilities
    if in_channels != expected:
        raise InputError(f"{path}: in_channels is {in_channels}, {expected} channels are read")
    if config["micro_batch"] == "auto":
        memory_cap()  # a bad GEOPRN_TRAIN_MEMORY_MB fails here, before any work
    return config

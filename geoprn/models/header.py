"""The checkpoint header's schema: each field's type and range, checked on every load and save.

A header is JSON, so it can be well-formed and still wrong (``"bands": []``, ``"tile_size":
"512"``); :func:`check_header` refuses those with one line naming the first bad field, before
anything is built from them. Fields this schema does not know are kept as they are.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT = "geoprn-checkpoint"
FORMAT_VERSION = 1

Band = Annotated[int, Field(ge=1)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1)]


class ModelFile(BaseModel):
    """Another checkpoint this one was trained with or for (or, for a PRN trained on
    probability rasters, the folder they came from: ``probs``)."""

    model_config = ConfigDict(strict=True, extra="allow")

    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    file: str | None = None
    probs: str | None = None


class CheckpointHeader(BaseModel):
    """The JSON header of a geoprn checkpoint (strict types: ``"512"`` is not a number)."""

    model_config = ConfigDict(strict=True, extra="allow")

    format: Literal["geoprn-checkpoint"]
    format_version: int = Field(ge=1, le=FORMAT_VERSION)
    geoprn_version: str | None = None
    created: str | None = None
    kind: Literal["base", "prn", "bpr"]
    architecture: str = Field(min_length=1)
    arguments: dict[str, Any]
    bands: list[Band] = Field(min_length=1, description="1-based raster bands read, in order")
    tile_size: int = Field(ge=32, multiple_of=32, description="window side in pixels")
    mean: list[Finite] | None = None
    std: list[Positive] | None = None
    gsd: Positive | None = Field(default=None, description="metres per pixel trained at")
    nodata: Finite | None = None
    input_dtype: str | None = None
    output: Literal["logits", "probability"] = "logits"
    patch_size: Count | None = None
    box: Count | None = None
    input_size: Count | None = None
    nms_iou: float | None = Field(default=None, gt=0, le=1)
    base: ModelFile | None = None
    prn: ModelFile | None = None
    trained_on: dict[str, Any] | None = None
    threshold: float | None = Field(
        default=None, gt=0, lt=1, allow_inf_nan=False,
        description="the road cut-off chosen on held-out val places (refine --threshold auto)",
    )  # fmt: skip
    symmetries: Literal[1, 4, 8] | None = Field(
        default=None,
        description="a base model's: the window symmetries its probabilities are averaged "
        "over (refine --symmetries auto; its threshold is the cut-off chosen for them)",
    )
    validated_gain: dict[str, Any] | None = None
    """Checked by :func:`geoprn.gain.recorded_gain` when a refiner is chosen."""

    @property
    def channels(self) -> int:
        """Input channels of the network: the bands, and for BPR (or a PRN that reads the
        image) the mask or probabilities beside them."""
        return len(self.bands) + self.reads_image

    @property
    def reads_image(self) -> bool:
        """:func:`reads_image` of this header."""
        return reads_image({"kind": self.kind, "arguments": self.arguments})

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointHeader:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) != self.channels:
                raise ValueError(
                    f"{name} holds {len(values)} values for {self.channels} input channel(s)"
                )
        in_channels = self.arguments.get("in_channels", self.channels)
        if in_channels != self.channels:
            beside = {"bpr": " and the mask", "prn": " and the probabilities"}.get(self.kind, "")
            mask = beside if self.reads_image else ""
            raise ValueError(
                f"arguments.in_channels is {in_channels!r}, but {self.channels} channel(s) "
                f"are read ({len(self.bands)} band(s){mask})"
            )
        if self.kind == "bpr":
            missing = [k for k in ("box", "input_size", "nms_iou") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a bpr header needs {', '.join(missing)}")
        return self


def reads_image(header: dict[str, Any]) -> bool:
    """Whether a model reads the scene's image beside a probability map: BPR always, a PRN
    whose network takes more than one channel (the probabilities, then the image ``bands``)."""
    if header.get("kind") == "bpr":
        return True
    return header.get("kind") == "prn" and header.get("arguments", {}).get("in_channels", 1) > 1


def recorded_symmetries(header: dict[str, Any]) -> int:
    """The window symmetries a base model's checkpoint says to average its probabilities
    over (:class:`geoprn.models.predictor.SymmetryMean`), else 1."""
    return int(header.get("symmetries") or 1)


def recorded_cut_off(header: dict[str, Any]) -> float:
    """The road cut-off of a model's probabilities: the ``threshold`` its checkpoint records
    (chosen on held-out val places), else 0.5."""
    return float(header.get("threshold") or 0.5)


def header_problem(header: Any) -> str | None:
    """What is wrong with ``header`` in one line (the first bad field, its value and how many
    more are bad), or None when :class:`CheckpointHeader` accepts it."""
    try:
        CheckpointHeader.model_validate(header)
    except ValidationError as exc:
        return describe(exc)
    return None


def describe(exc: ValidationError) -> str:
    """The first error of ``exc`` as ``field: message (got value)``, and the count of others."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    text = f"{where}: {message}" if where else message
    if first["type"] not in ("missing", "value_error"):
        got = repr(first["input"])
        text += f" (got {got[:60] + '...' if len(got) > 60 else got})"
    if len(errors) > 1:
        text += f"; {len(errors) - 1} more problem(s)"
    return text

"""A refiner's validated gain: what it adds to its base model on held-out places, with a
bootstrap interval over the places, recorded in its checkpoint header.

``refine``'s default refiner follows one rule (:func:`qualifies`): a refiner runs by default
only if its recorded gain in road IoU, measured with the base model it runs after, has a 90 %
interval above zero. A gain whose interval holds zero is no gain.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from geoprn.errors import CheckpointError
from geoprn.metrics import BoundaryCounts, Confusion

LEVEL = 0.9
"""Coverage of the bootstrap interval."""
DRAWS = 2000
"""Bootstrap resamples of the places."""


class ValidatedGain(BaseModel):
    """A refiner's gain on held-out places (road IoU and mBA in points) over its
    ``reference``: the base model at 0.5, or for a BPR after a PRN that PRN at its cut-off
    (what runs without BPR), as :func:`geoprn.models.checkpoint.record_gain` stores it."""

    places: dict[str, int] = Field(description="places scored, per data set and split")
    base_sha256: str = Field(description="the base model the gain was measured after")
    base_symmetries: int = Field(
        default=1, description="the window symmetries that base model's map was averaged over"
    )
    prn_sha256: str | None = Field(
        default=None, description="for BPR: the PRN it ran after (None: right after the base)"
    )
    reference: str = Field(
        default="the base model at 0.5",
        description="what the gain is over: for BPR after a PRN, that PRN at its cut-off",
    )
    base_road_iou: float
    refined_road_iou: float
    road_iou_gain: float
    road_iou_interval: tuple[float, float]
    mba_gain: float
    mba_interval: tuple[float, float]
    level: float = LEVEL
    measured_by: str = Field(description="the command that printed these figures")
    date: str = Field(default_factory=lambda: dt.date.today().isoformat())

    @property
    def positive(self) -> bool:
        """The road IoU gain's whole interval lies above zero."""
        return self.road_iou_interval[0] > 0

    def describe(self) -> str:
        """One line: the gain, its interval and the places."""
        lo, hi = self.road_iou_interval
        mlo, mhi = self.mba_interval
        places = ", ".join(f"{n} {name}" for name, n in self.places.items())
        return (
            f"{self.road_iou_gain:+.2f} road IoU ({100 * self.level:.0f} % interval {lo:+.2f} to "
            f"{hi:+.2f}), {self.mba_gain:+.2f} mBA ({mlo:+.2f} to {mhi:+.2f}) over "
            f"{self.reference}, on {places} held-out places ({self.date})"
        )


def recorded_gain(header: dict) -> ValidatedGain | None:
    """The validated gain a checkpoint header records, or None.

    Raises:
        CheckpointError: the header holds a malformed record.
    """
    record = header.get("validated_gain")
    if record is None:
        return None
    try:
        return ValidatedGain.model_validate(record)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "validated_gain"
        message = f"malformed validated_gain in the header: {where}: {error['msg']}"
        raise CheckpointError(message) from None


def place_counts(confusions: Sequence[Confusion]) -> np.ndarray:
    """(n, 3) true positives, false positives, false negatives of each place."""
    return np.array([(c.tp, c.fp, c.fn) for c in confusions], dtype=np.float64)


def boundary_arrays(counts: Sequence[BoundaryCounts]) -> np.ndarray:
    """(n, 4) road and background boundary intersections and unions of each place."""
    return np.array(
        [(b.road_inter, b.road_union, b.bg_inter, b.bg_union) for b in counts], dtype=np.float64
    )


def _road_iou(counts: np.ndarray) -> np.ndarray:
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    union = tp + fp + fn
    return np.where(union > 0, tp / np.maximum(union, 1), 1.0)


def _mba(counts: np.ndarray) -> np.ndarray:
    road = np.where(counts[..., 1] > 0, counts[..., 0] / np.maximum(counts[..., 1], 1), 1.0)
    bg = np.where(counts[..., 3] > 0, counts[..., 2] / np.maximum(counts[..., 3], 1), 1.0)
    return 0.5 * (road + bg)


METRICS = {"road IoU": _road_iou, "mBA": _mba}
"""Each metric pooled from summed per-place counts (:func:`place_counts`,
:func:`boundary_arrays`), vectorised over leading axes (one row per bootstrap draw)."""


def bootstrap_gain(
    base: np.ndarray,
    refined: np.ndarray,
    metric: str = "road IoU",
    level: float = LEVEL,
    draws: int = DRAWS,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Gain of ``refined`` over ``base`` in points, pooled over places, with a paired
    percentile bootstrap interval over the places.

    Args:
        base, refined: per-place counts, (n, k), from :func:`place_counts` (road IoU) or
            :func:`boundary_arrays` (mBA), for the same places in the same order.
        metric: ``road IoU`` or ``mBA``.
        level: interval coverage.
        draws: bootstrap resamples; each draws n places with replacement, the same places
            for both models, and pools their counts.

    Returns:
        (gain, low, high), in points (100 x the metric's difference).
    """
    if base.shape != refined.shape or len(base) == 0:
        raise ValueError("base and refined need counts for the same, non-empty places")
    score = METRICS[metric]
    gain = 100 * float(score(refined.sum(0)) - score(base.sum(0)))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(base), np.full(len(base), 1 / len(base)), size=draws)
    diffs = 100 * (score(weights @ refined) - score(weights @ base))
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return gain, float(low), float(high)


def passes(symmetries: int) -> str:
    """How the base model ran, in words: in one pass, or averaged over window symmetries."""
    return "in one pass" if symmetries == 1 else f"averaged over {symmetries} window symmetries"


def qualifies(header: dict, base_sha256: str | None, symmetries: int = 1) -> tuple[bool, str]:
    """Whether a refiner checkpoint may run by default after the base model ``base_sha256``
    (None: refining given probabilities, whose model no gain was measured with) averaged over
    ``symmetries`` window symmetries.

    Returns:
        (yes or no, the reason in a few words).
    """
    gain = recorded_gain(header)
    if gain is None:
        return False, "no validated gain is recorded in it"
    if base_sha256 is None or gain.base_sha256 != base_sha256:
        return False, "its gain was measured after another base model"
    if gain.base_symmetries != symmetries:
        return False, (
            f"its gain was measured after the base model {passes(gain.base_symmetries)}, "
            f"not {passes(symmetries)}"
        )
    lo, hi = gain.road_iou_interval
    if not gain.positive:
        return False, (
            f"its recorded gain, {gain.road_iou_gain:+.2f} road IoU ({lo:+.2f} to {hi:+.2f}), "
            "is not above zero"
        )
    return True, gain.describe()

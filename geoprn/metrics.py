"""Segmentation metrics for binary road masks: IoU, mIoU and Boundary IoU (mBA).

Every function takes one tile: a prediction, a ground truth and an optional ``valid`` mask, all
2-D and of the same shape (bool or 0/1). Invalid pixels count nowhere. Per-tile results are
integer counts that add up, so a data set is scored by pooling the counts of its tiles::

    conf, bnd = Confusion(), BoundaryCounts()
    for pred, truth, valid in tiles:
        c, b = evaluate(pred, truth, valid)
        conf, bnd = conf + c, bnd + b
    print(summary(conf, bnd))

Boundary IoU follows Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation
Evaluation" (CVPR 2021): the boundary band ``B_d(M)`` of a mask ``M`` is the set of pixels of
``M`` whose Euclidean distance to the nearest pixel outside ``M`` is at most ``d``, and the
Boundary IoU of a class is ``|B_d(G) & B_d(P)| / |B_d(G) | B_d(P)|``. The project's *mBA* is the
mean of the Boundary IoU of the road class and of the background class.

The image border is not a contour: outside the tile counts as a copy of the nearest pixel
(edge padding), so a road running off the tile has no band along the tile edge. This is the
same as measuring distances only to pixels inside the tile, which is what is computed.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Self

import numpy as np
from scipy import ndimage

DEFAULT_D = 15
"""Default width of the boundary band, in pixels."""


@dataclass(frozen=True)
class Counts:
    """Counts that add field by field with ``+``, so ``sum(per_tile, Kind())`` pools tiles."""

    def __add__(self, other: object) -> Self:
        if type(other) is not type(self):
            return NotImplemented
        return type(self)(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __radd__(self, other: object) -> Self:
        # Lets the built-in ``sum`` start from 0.
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented


def _ratio(num: int, den: int) -> float:
    """``num / den``, or 1.0 when ``den`` is 0 (nothing to find and nothing found)."""
    return num / den if den else 1.0


@dataclass(frozen=True)
class Confusion(Counts):
    """Pixel counts of the road class: true/false positives, false/true negatives.

    Counts add with ``+``, so ``sum(per_tile, Confusion())`` pools tiles.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def road_iou(self) -> float:
        """TP / (TP + FP + FN); 1.0 when there is neither road nor predicted road."""
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def background_iou(self) -> float:
        """TN / (TN + FP + FN); 1.0 when there is neither background nor predicted background."""
        return _ratio(self.tn, self.tn + self.fp + self.fn)

    @property
    def miou(self) -> float:
        """Mean of the road and background IoU."""
        return (self.road_iou + self.background_iou) / 2


@dataclass(frozen=True)
class BoundaryCounts(Counts):
    """Boundary-band intersection and union pixel counts of the road and background classes.

    Counts add with ``+``, so ``sum(per_tile, BoundaryCounts())`` pools tiles.
    """

    road_inter: int = 0
    road_union: int = 0
    bg_inter: int = 0
    bg_union: int = 0

    @property
    def road_biou(self) -> float:
        """Boundary IoU of the road class; 1.0 when both road bands are empty."""
        return _ratio(self.road_inter, self.road_union)

    @property
    def background_biou(self) -> float:
        """Boundary IoU of the background class; 1.0 when both background bands are empty."""
        return _ratio(self.bg_inter, self.bg_union)

    @property
    def mba(self) -> float:
        """Mean of the road and background Boundary IoU."""
        return (self.road_biou + self.background_biou) / 2


def _check(
    pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Cast the inputs to bool and check that they are 2-D and of one shape."""
    pred = np.asarray(pred).astype(bool, copy=False)
    truth = np.asarray(truth).astype(bool, copy=False)
    if pred.ndim != 2:
        raise ValueError(f"expected 2-D masks, got shape {pred.shape}")
    if truth.shape != pred.shape:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} differ in shape")
    if valid is not None:
        valid = np.asarray(valid).astype(bool, copy=False)
        if valid.shape != pred.shape:
            raise ValueError(f"valid {valid.shape} and pred {pred.shape} differ in shape")
    return pred, truth, valid


def _count(mask: np.ndarray, valid: np.ndarray | None) -> int:
    """Number of True pixels of ``mask`` that are valid."""
    return int(np.count_nonzero(mask if valid is None else mask & valid))


def confusion(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> Confusion:
    """Confusion counts of the road class over the valid pixels of one tile.

    Args:
        pred: (H, W) predicted road mask, bool or 0/1.
        truth: (H, W) ground-truth road mask, bool or 0/1.
        valid: (H, W) mask of the pixels to score; all of them if None.
    """
    pred, truth, valid = _check(pred, truth, valid)
    tp = _count(pred & truth, valid)
    fp = _count(pred & ~truth, valid)
    fn = _count(~pred & truth, valid)
    total = pred.size if valid is None else int(np.count_nonzero(valid))
    return Confusion(tp, fp, fn, total - tp - fp - fn)


def boundary_band(mask: np.ndarray, d: float = DEFAULT_D) -> np.ndarray:
    """Pixels of ``mask`` within Euclidean distance ``d`` of a pixel outside it.

    The tile border is not a contour (see the module docstring); ``d = 0`` gives an empty band.

    Args:
        mask: (H, W) bool mask.
        d: band width in pixels, >= 0.
    """
    if d < 0:
        raise ValueError(f"the band width d must be >= 0, got {d}")
    mask = np.asarray(mask, dtype=bool)
    if mask.all() or not mask.any():
        # No contour; and the EDT of an array without zeros is undefined.
        return np.zeros(mask.shape, dtype=bool)
    dist = ndimage.distance_transform_edt(mask)
    return mask & (dist <= d)


def boundary_counts(
    pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None, d: float = DEFAULT_D
) -> BoundaryCounts:
    """Boundary-band intersections and unions of the road and background classes of one tile.

    Bands are computed on the full masks, then counted over valid pixels only.

    Args:
        pred: (H, W) predicted road mask, bool or 0/1.
        truth: (H, W) ground-truth road mask, bool or 0/1.
        valid: (H, W) mask of the pixels to count; all of them if None.
        d: band width in pixels.
    """
    pred, truth, valid = _check(pred, truth, valid)
    road_p, road_t = boundary_band(pred, d), boundary_band(truth, d)
    bg_p, bg_t = boundary_band(~pred, d), boundary_band(~truth, d)
    return BoundaryCounts(
        road_inter=_count(road_p & road_t, valid),
        road_union=_count(road_p | road_t, valid),
        bg_inter=_count(bg_p & bg_t, valid),
        bg_union=_count(bg_p | bg_t, valid),
    )


def boundary_confusion(
    pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None, d: float = DEFAULT_D
) -> tuple[int, int]:
    """(intersection, union) of the road boundary bands of one tile, over valid pixels.

    Args:
        pred: (H, W) predicted road mask, bool or 0/1.
        truth: (H, W) ground-truth road mask, bool or 0/1.
        valid: (H, W) mask of the pixels to count; all of them if None.
        d: band width in pixels.
    """
    pred, truth, valid = _check(pred, truth, valid)
    road_p, road_t = boundary_band(pred, d), boundary_band(truth, d)
    return _count(road_p & road_t, valid), _count(road_p | road_t, valid)


def evaluate(
    pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None, d: float = DEFAULT_D
) -> tuple[Confusion, BoundaryCounts]:
    """Confusion and boundary counts of one tile; see :func:`confusion`, :func:`boundary_counts`."""
    return confusion(pred, truth, valid), boundary_counts(pred, truth, valid, d)


def summary(conf: Confusion, bnd: BoundaryCounts) -> dict[str, float]:
    """Road IoU, mIoU and mBA of pooled counts, as fractions in [0, 1]."""
    return {"road_iou": conf.road_iou, "miou": conf.miou, "mba": bnd.mba}

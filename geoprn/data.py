"""Labelled tiles for training: discovery of image/label pairs, loading, and random crops.

Three layouts are understood:

- a folder holding ``images/`` and ``masks/`` with matching file stems (Massachusetts Roads,
  CIL);
- a folder of DeepGlobe-style pairs ``<id>_sat.<ext>`` + ``<id>_mask.<ext>``;
- explicit image/label rasters (a scene with a label raster), given as a pair, as the string
  ``IMAGE,LABEL``, or as one image whose label sits next to it as ``<stem>_mask.<ext>`` or
  ``<stem>_label.<ext>``.

Everything is read with rasterio, so PNG, JPEG and GeoTIFF work alike. A pixel is *invalid*
when the raster's dataset mask says so (GeoTIFF nodata, alpha) or, when a ``nodata`` value is
configured, when all of its bands equal that value (the white areas of Massachusetts Roads).
Invalid pixels are left out of every loss and metric.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from torch.utils.data import Dataset

from geoprn.errors import InputError
from geoprn.labels import DEFAULT_ROAD_WIDTH, VECTOR_SUFFIXES, rasterize_roads

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".vrt", ".img")
LABEL_SIBLINGS = ("_mask", "_label", "_labels", "_gt", "_roads", "_osm_roads")


@dataclass(frozen=True)
class TilePair:
    """One labelled tile: an image raster and its label raster."""

    image: Path
    label: Path

    @property
    def name(self) -> str:
        """A short identifier recorded in checkpoints (the image file name)."""
        return self.image.name


@dataclass
class LabelledTile:
    """A labelled tile held in memory.

    Attributes:
        name: the image file name.
        image: (C, H, W) raw band values, in the raster's own dtype.
        label: (H, W) uint8, 1 for road.
        valid: (H, W) bool, False where the image has no data.
        pseudo: (H, W) float32 patch-optimal pseudo-labels (PRN training only), or None.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    valid: np.ndarray
    pseudo: np.ndarray | None = None


def _rasters(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder_pairs(folder: Path) -> list[TilePair]:
    images, masks = folder / "images", folder / "masks"
    if images.is_dir() and masks.is_dir():
        labels = {p.stem: p for p in _rasters(masks)}
        pairs, missing = [], []
        for image in _rasters(images):
            if image.stem in labels:
                pairs.append(TilePair(image, labels[image.stem]))
            else:
                missing.append(image.name)
        if missing:
            log.warning("%s: %d image(s) without a mask skipped", folder, len(missing))
        return pairs
    files = _rasters(folder)
    masks_by_id = {p.stem[: -len("_mask")]: p for p in files if p.stem.endswith("_mask")}
    return [
        TilePair(p, masks_by_id[p.stem[: -len("_sat")]])
        for p in files
        if p.stem.endswith("_sat") and p.stem[: -len("_sat")] in masks_by_id
    ]


def _sibling_label(image: Path) -> Path | None:
    for tag in LABEL_SIBLINGS:
        for candidate in sorted(image.parent.glob(f"{image.stem}{tag}.*")):
            if candidate.suffix.lower() in IMAGE_SUFFIXES + VECTOR_SUFFIXES:
                return candidate
    return None


def discover_pairs(
    sources: Iterable[str | Path | tuple[str | Path, str | Path]],
) -> list[TilePair]:
    """Find labelled tiles in folders, explicit pairs or images with a sibling label.

    Args:
        sources: folders (``images/`` + ``masks/`` or ``*_sat``/``*_mask`` pairs), ``(image,
            label)`` tuples, ``"IMAGE,LABEL"`` strings, or image files with a
            ``<stem>_mask.<ext>`` (or ``_label``) raster beside them.

    Returns:
        The pairs, in the order given (folders sorted by file name), without duplicates.

    Raises:
        InputError: a source does not exist or holds no labelled pair.
    """
    pairs: list[TilePair] = []
    for source in sources:
        explicit = isinstance(source, str) and "," in source and not Path(source).exists()
        if isinstance(source, tuple) or explicit:
            image, label = source if isinstance(source, tuple) else source.split(",", 1)
            image, label = Path(image), Path(label)
            for path in (image, label):
                if not path.is_file():
                    raise InputError(f"file not found: {path}")
            pairs.append(TilePair(image, label))
            continue
        path = Path(source)
        if path.is_dir():
            found = _folder_pairs(path)
            if not found:
                raise InputError(
                    f"no labelled tiles in {path}: expected images/ + masks/ with matching "
                    "names, or <id>_sat.<ext> + <id>_mask.<ext> pairs"
                )
            pairs.extend(found)
        elif path.is_file():
            label = _sibling_label(path)
            if label is None:
                raise InputError(
                    f"no label raster for {path}: put it beside the image as "
                    f"{path.stem}_mask{path.suffix} or pass IMAGE,LABEL"
                )
            pairs.append(TilePair(path, label))
        else:
            raise InputError(f"not found: {path}")
    unique = list(dict.fromkeys(pairs))
    names = [p.name for p in unique]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"several tiles share the name {dupes[0]}; tile names must be unique")
    return unique


def _open(path: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def load_tile(
    pair: TilePair,
    bands: Sequence[int],
    nodata: float | None = None,
    road_width: float = DEFAULT_ROAD_WIDTH,
) -> LabelledTile:
    """Read one labelled tile.

    Args:
        pair: image and label: a raster, or road centreline vectors (any CRS) burnt onto the
            image's grid ``road_width`` metres wide.
        bands: 1-based band indexes of the image to read.
        nodata: if given, pixels whose bands ALL equal it are invalid (in addition to the
            raster's own dataset mask).
        road_width: full road width in metres, for vector labels.

    Raises:
        InputError: unreadable rasters, too few bands, or image and label sizes differ.
    """
    with _open(pair.image) as src:
        if max(bands) > src.count or min(bands) < 1:
            raise InputError(
                f"{pair.image} has {src.count} band(s); bands {list(bands)} were asked for"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            image = src.read(list(bands))
            valid = src.dataset_mask() > 0
        shape, transform, crs = (src.height, src.width), src.transform, src.crs
    if nodata is not None:
        valid &= ~np.all(image == np.asarray(nodata, dtype=image.dtype), axis=0)
    if pair.label.suffix.lower() in VECTOR_SUFFIXES:
        label = rasterize_roads(pair.label, shape, transform, crs, road_width)
        return LabelledTile(pair.name, image, label, valid)
    with _open(pair.label) as src:
        if (src.height, src.width) != shape:
            raise InputError(
                f"{pair.label} is {src.width}x{src.height} but its image {pair.image} is "
                f"{shape[1]}x{shape[0]}"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            raw = src.read(1)
            label_valid = src.read_masks(1) > 0
    valid &= label_valid
    threshold = 128 if raw.max() > 1 else 1
    label = (raw >= threshold).astype(np.uint8)
    return LabelledTile(pair.name, image, label, valid)


def load_tiles(
    pairs: Sequence[TilePair],
    bands: Sequence[int],
    nodata: float | None = None,
    road_width: float = DEFAULT_ROAD_WIDTH,
) -> list[LabelledTile]:
    """Read labelled tiles and check they agree with each other.

    Raises:
        InputError: as :func:`load_tile`, or the images differ in band count or data type.
    """
    signature = None
    for pair in pairs:  # headers first: a mismatch is reported before anything is read
        with _open(pair.image) as src:
            this = (src.count, src.dtypes[0])
        if signature is None:
            signature = (this, pair.image)
        elif this != signature[0]:
            raise InputError(
                f"{pair.image} has {this[0]} band(s) of {this[1]} but {signature[1]} has "
                f"{signature[0][0]} of {signature[0][1]}; all tiles must match"
            )
    return [load_tile(pair, bands, nodata, road_width) for pair in pairs]


def band_statistics(tiles: Sequence[LabelledTile]) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation over the valid pixels of ``tiles`` (raw units).

    Raises:
        InputError: no valid pixel at all.
    """
    count, total, squares = 0, None, None
    for tile in tiles:
        values = tile.image[:, tile.valid].astype(np.float64)
        count += values.shape[1]
        s, q = values.sum(axis=1), np.square(values).sum(axis=1)
        total = s if total is None else total + s
        squares = q if squares is None else squares + q
    if not count:
        raise InputError("the training tiles hold no valid pixel (all nodata?)")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    std = np.where(std > 0, std, 1.0)
    return [float(m) for m in mean], [float(s) for s in std]


def augment(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Apply one random flip/90° rotation (of the 8 symmetries of a square) to all ``arrays``.

    Every array has its spatial axes last; all get the same transform.
    """
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in arrays:
        if flip:
            a = a[..., :, ::-1]
        out.append(np.ascontiguousarray(np.rot90(a, k, axes=(-2, -1))))
    return tuple(out)


class RandomCrops(Dataset):
    """Random square crops of labelled tiles with joint flips and rotations.

    Item ``i`` of epoch ``e`` is drawn from a generator seeded with ``(seed, e, i)``, so a run
    is reproducible and a resumed run sees the crops it would have seen.

    Each item is ``(image, label, valid)``: float32 tensors of shapes (C, s, s), (1, s, s) and
    (1, s, s); the image is in raw band units (the model normalises it). Tiles with pseudo-labels
    add a fourth, ``pseudo`` (1, s, s).

    Crop origins are multiples of ``step``: PRN crops keep the pseudo-labels' patch grid.
    """

    def __init__(
        self,
        tiles: Sequence[LabelledTile],
        crop: int,
        length: int,
        seed: int = 0,
        augment: bool = True,
        min_valid: float = 0.1,
        step: int = 1,
    ):
        if not tiles:
            raise InputError("no training tiles")
        self.tiles = list(tiles)
        self.crop, self.length, self.seed = int(crop), int(length), int(seed)
        self.augment, self.min_valid, self.step = augment, min_valid, int(step)
        self.epoch = 0
        weights = np.array([t.valid.sum() for t in self.tiles], dtype=np.float64)
        if weights.sum() == 0:
            raise InputError("the training tiles hold no valid pixel (all nodata?)")
        self.weights = weights / weights.sum()

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _crop(self, tile: LabelledTile, rng: np.random.Generator) -> list[np.ndarray]:
        c, step = self.crop, self.step
        h, w = tile.label.shape
        y = step * int(rng.integers(max(h - c, 0) // step + 1))
        x = step * int(rng.integers(max(w - c, 0) // step + 1))
        arrays = [tile.image, tile.label, tile.valid]
        if tile.pseudo is not None:
            arrays.append(tile.pseudo)
        crops = [a[..., y : y + c, x : x + c] for a in arrays]
        ph, pw = c - crops[1].shape[0], c - crops[1].shape[1]
        if ph or pw:  # tile smaller than the crop: pad, padding is invalid
            crops = [np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, ph), (0, pw)]) for a in crops]
        return crops

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        for _ in range(10):  # avoid crops that are (almost) all nodata
            tile = self.tiles[int(rng.choice(len(self.tiles), p=self.weights))]
            crops = self._crop(tile, rng)
            if crops[2].mean() >= self.min_valid:
                break
        if self.augment:
            crops = augment(crops, rng)
        image, *maps = (torch.from_numpy(a.astype(np.float32)) for a in crops)
        return (image, *(m[None] for m in maps))


class BoundaryPatches(Dataset):
    """Boundary boxes of labelled tiles for BPR training, with joint flips and rotations.

    ``boxes[i]`` holds the (K, 5) boxes ``(n, y0, x0, y1, x1)`` placed along the boundary of
    ``probs[i] > 0.5`` (:func:`geoprn.models.bpr.boundary_boxes`). Item ``i`` of epoch ``e`` is
    a box drawn with a generator seeded with ``(seed, e, i)``: ``(patch, label, valid)``, of
    shapes (C + 1, s, s) (the raw image bands and the predicted mask), (1, s, s), (1, s, s).
    """

    def __init__(
        self,
        tiles: Sequence[LabelledTile],
        probs: Sequence[np.ndarray],
        boxes: Sequence[np.ndarray],
        length: int,
        seed: int = 0,
    ):
        self.tiles, self.probs = list(tiles), list(probs)
        self.index = np.array(
            [(t, *box[1:]) for t, tile_boxes in enumerate(boxes) for box in tile_boxes], np.int64
        ).reshape(-1, 5)
        if len(self.index) == 0:
            raise InputError("the predictions on the training tiles have no road boundary")
        self.length, self.seed, self.epoch = int(length), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the boxes of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        t, y0, x0, y1, x1 = self.index[int(rng.integers(len(self.index)))]
        tile, window = self.tiles[t], np.s_[..., y0:y1, x0:x1]
        mask = (self.probs[t][window] > 0.5)[None]
        patch = np.concatenate([tile.image[window].astype(np.float32), mask])
        crops = augment([patch, tile.label[window], tile.valid[window]], rng)
        patch, *maps = (torch.from_numpy(a.astype(np.float32)) for a in crops)
        return (patch, *(m[None] for m in maps))

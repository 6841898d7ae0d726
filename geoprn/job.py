"""What one ``refine`` run is: its inputs opened and checked, the models chosen (the
default-refiner rule), the grid the models run on, and the signature that tells a rerun of
the same command from another (:class:`RefineJob`, small and picklable)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from geoprn import store
from geoprn.errors import GeoprnWarning, InputError
from geoprn.gain import passes, qualifies
from geoprn.inference import autocast_dtype, resolve_device
from geoprn.models.checkpoint import (
    DEFAULT_BASE,
    DEFAULT_BPR,
    DEFAULT_PRN,
    file_sha256,
    read_header,
)
from geoprn.models.header import reads_image, recorded_cut_off, recorded_symmetries
from geoprn.models.predictor import SYMMETRIES
from geoprn.raster import (
    SceneInfo,
    WorkGrid,
    check_threshold,
    open_scene,
)
from geoprn.remote import is_remote
from geoprn.tiling import DEFAULT_BLOCK_SIZE


@dataclass(frozen=True)
class ModelRef:
    """A checkpoint as workers see it: a path on a shared file system and its hash."""

    path: str
    sha256: str
    reads_image: bool = False
    """A refiner that reads the image beside the probabilities."""

    @classmethod
    def of(cls, path: str | Path, reads_image: bool = False) -> ModelRef:
        return cls(str(Path(path).resolve()), file_sha256(path), reads_image)


@dataclass(frozen=True)
class RefineJob:
    """Everything a block task needs; small and picklable, sent once per task."""

    scene: SceneInfo
    paths: store.OutputPaths
    bands: list[int]
    base: ModelRef | None
    prn: ModelRef | None
    probs: str | None
    tile: int
    overlap: int
    batch_size: int | None
    """Windows per forward pass; None: :func:`~geoprn.inference.auto_batch_size` on each worker."""
    device: str
    grid: WorkGrid
    bpr: ModelRef | None = None
    precision: str = "auto"
    block_size: int = DEFAULT_BLOCK_SIZE
    compile: bool = False
    threads: int = 1
    """Blocks in flight on the local scheduler (a ``distributed`` worker counts its own)."""
    threshold: float = 0.5
    """Probability above which a pixel is road in the mask."""
    symmetries: int = 1
    """Window symmetries the base model's probabilities are averaged over (1: one pass)."""
    bpr_cut_off: float = 0.5
    """The cut-off BPR's input map is recentred at when no PRN runs before it: the base
    model's recorded one, as ``train bpr`` recentres it (0.5 for given probabilities)."""
    bucket: str | None = None
    """The ``s3://`` prefix the outputs are kept in, when the block tasks (on a cluster) write
    it themselves, each worker through a working copy of its own (:mod:`geoprn.bucket`)."""

    @property
    def stages(self) -> list[tuple[str, list[ModelRef]]]:
        """The model stages in order, each with the Zarr variable it fills and its models: the
        base model, then the refiners (PRN and/or BPR, run window by window)."""
        refiners = [ref for ref in (self.prn, self.bpr) if ref is not None]
        named = [("base", [self.base] if self.base else []), ("refined", refiners)]
        return [(name, refs) for name, refs in named if refs]

    @property
    def reads_image(self) -> bool:
        """Whether a refiner reads the image beside the probabilities (BPR, or a PRN that
        does), so that the image is read even from ``--probs``."""
        return self.bpr is not None or (self.prn is not None and self.prn.reads_image)

    @property
    def variables(self) -> list[str]:
        return ["base", "refined"] if self.prn or self.bpr else ["base"]


def open_inputs(
    scene: str | Path,
    outdir: str | Path,
    base: str | Path | None,
    prn: str | Path | None,
    probs: str | Path | None,
    use_prn: bool | None,
    bpr: str | Path | None,
    use_bpr: bool | None,
    bands: list[int] | None,
    device: str,
    precision: str,
    batch_size: int | str,
    block_size: int,
    overlap: int,
    resample: str,
    compile: bool = False,
    threshold: float | str = "auto",
    zarr_format: int = 2,
    vectors: bool = False,
    name: str | None = None,
    symmetries: int | str = "auto",
) -> RefineJob:
    """``refine``'s first step: open the scene and check every input and option against it
    (models, bands, settings) before anything is written; the job says what each block task
    does. ``name`` names the outputs (default: the scene's file name, :func:`scene_stem`).
    ``symmetries``: how many window symmetries the base model's probabilities are averaged
    over, or ``"auto"``: as its checkpoint records (:func:`base_symmetries`).

    Raises:
        InputError, CheckpointError: one line naming what is wrong.
    """
    info = open_scene(scene)
    if zarr_format not in (2, 3):
        raise InputError("--zarr-format must be 2 or 3")
    if vectors and info.crs is None:
        raise InputError(f"{info.path} has no CRS; road vectors need one (drop --vectors)")
    base_ref = None
    last: dict = {}  # the header of the model whose probabilities make the mask
    tile = 512
    gsd = None  # the ground sampling distance the models were trained at
    if probs is None:
        base = Path(base) if base is not None else DEFAULT_BASE
        header = last = read_header(base, "base")
        tile, gsd = header["tile_size"], header.get("gsd")
        bands = _model_bands(header, base, bands, info)
        base_ref = ModelRef.of(base)
    else:
        _check_probabilities(Path(probs), info)
    symmetries = base_symmetries(symmetries, last if base_ref else None)
    if use_prn is None or use_bpr is None:
        use_prn, use_bpr = default_refiners(prn, bpr, base_ref, symmetries)
    bpr_ref, bpr_header = None, {}
    if use_bpr:  # BPR reads the base model's bands (the image is read once)
        bpr = Path(bpr) if bpr is not None else DEFAULT_BPR
        header = bpr_header = read_header(bpr, "bpr")
        bands = _model_bands(header, bpr, bands, info)
        tile, gsd = header["tile_size"], gsd or header.get("gsd")
        bpr_ref = ModelRef.of(bpr)
    bands = bands or []
    prn_ref = None
    if use_prn:
        if prn is None and DEFAULT_PRN.is_file():
            prn = DEFAULT_PRN
        if prn is None:
            warnings.warn(
                "no PRN weights given or shipped: running the base model only",
                GeoprnWarning,
                stacklevel=2,
            )
        else:
            header = last = read_header(prn, "prn")
            tile, gsd = header["tile_size"], gsd or header.get("gsd")
            if reads_image(header):  # the base model's bands, read once for every stage
                bands = _model_bands(header, Path(prn), bands or None, info)
            prn_ref = ModelRef.of(prn, reads_image(header))
            _check_pair(header, prn_ref, base_ref)
    if not 0 <= overlap < tile // 2 or overlap % 2:
        raise InputError(f"--overlap must be even and below {tile // 2}")
    if batch_size != "auto" and (not str(batch_size).isdigit() or int(batch_size) < 1):
        raise InputError(f"--batch-size must be 'auto' or at least 1, not {batch_size!r}")
    bpr_cut_off = recorded_cut_off(last) if bpr_ref is not None and prn_ref is None else 0.5
    if bpr_ref is not None:
        last = bpr_header
    threshold = mask_threshold(threshold, last)
    if block_size <= 0 or block_size % store.CHUNK:
        raise InputError(f"--block-size must be a positive multiple of {store.CHUNK}")
    autocast_dtype(resolve_device(device), precision)  # fail early; workers resolve it again
    stem = name or scene_stem(info.path)
    return RefineJob(
        info,
        store.OutputPaths(Path(outdir), stem),
        bands,
        base_ref,
        prn_ref,
        str(Path(probs).resolve()) if probs else None,
        tile,
        overlap,
        None if batch_size == "auto" else int(batch_size),
        device,
        WorkGrid.choose(info, gsd, resample),
        bpr_ref,
        precision,
        block_size,
        compile,
        threshold=threshold,
        symmetries=symmetries,
        bpr_cut_off=bpr_cut_off,
    )


def base_symmetries(symmetries: int | str, header: dict | None) -> int:
    """The window symmetries the base model (``header``; None: given probabilities) runs
    over: ``symmetries``, or for ``"auto"`` the number its checkpoint records, else 1."""
    if symmetries == "auto":
        return recorded_symmetries(header) if header else 1
    if str(symmetries) not in {str(n) for n in SYMMETRIES}:
        raise InputError(f"--symmetries must be auto or one of 1, 4, 8, not {symmetries!r}")
    if header is None and int(symmetries) != 1:
        raise InputError("--symmetries averages a base model's passes: --probs has none")
    return int(symmetries)


def mask_threshold(threshold: float | str, header: dict) -> float:
    """The mask's road cut-off: ``threshold``, or for ``"auto"`` the one the last model's
    checkpoint records (chosen on its held-out val places), else 0.5."""
    if threshold == "auto":
        return recorded_cut_off(header)
    try:
        return check_threshold(float(threshold))
    except ValueError:
        raise InputError(f"--threshold must be 'auto' or a number, not {threshold!r}") from None


def default_refiners(
    prn: str | Path | None, bpr: str | Path | None, base: ModelRef | None, symmetries: int = 1
) -> tuple[bool, bool]:
    """Which refiners run when none is asked for by name (``--refiner auto``).

    A checkpoint given by path runs: that is asking for it. A shipped one runs only if it
    records a gain on held-out places above zero with its interval, measured after this very
    base model, averaged over the same ``symmetries`` (and, for BPR, after the PRN that runs
    or right after the base model): :func:`geoprn.gain.qualifies`. When no refiner runs,
    says once where the mask comes from.
    """
    base_sha = base.sha256 if base is not None else None
    reasons = []

    def choose(given: str | Path | None, shipped: Path, kind: str, after: str | None) -> bool:
        if given is not None:
            return True
        if not shipped.is_file():
            reasons.append(f"no {kind.upper()} is shipped")
            return False
        header = read_header(shipped, kind)
        ok, why = qualifies(header, base_sha, symmetries)
        if ok and (header["validated_gain"].get("prn_sha256") != after):
            ok, why = False, "its gain was measured after another refiner chain"
        if not ok:
            reasons.append(f"{shipped.name}: {why}")
        return ok

    use_prn = choose(prn, DEFAULT_PRN, "prn", None)
    prn_sha = ModelRef.of(prn or DEFAULT_PRN).sha256 if use_prn else None
    use_bpr = choose(bpr, DEFAULT_BPR, "bpr", prn_sha)
    if not use_prn and not use_bpr:
        source = f"base model {passes(symmetries)}" if base is not None else "given probabilities"
        warnings.warn(
            f"the mask comes from the {source}, unrefined: no shipped refiner has a validated "
            f"gain for it ({'; '.join(reasons)}); --refiner prn runs PRN anyway",
            GeoprnWarning,
            stacklevel=3,
        )
    return use_prn, use_bpr


def _model_bands(header: dict, path: Path, bands: list[int] | None, info: SceneInfo) -> list[int]:
    """The scene bands a model reads (``bands`` if given, else its checkpoint's), checked."""
    bands = bands or header["bands"]
    if len(bands) != len(header["bands"]):
        raise InputError(
            f"{path} reads {len(header['bands'])} bands, {len(bands)} are given "
            "(by --bands or the base model)"
        )
    if max(bands) > info.count or min(bands) < 1:
        raise InputError(
            f"{info.path} has {info.count} band(s); the model reads band(s) "
            f"{','.join(map(str, bands))} (choose others with --bands)"
        )
    return bands


def _check_pair(prn_header: dict, prn: ModelRef, base: ModelRef | None) -> None:
    """Warn when a PRN refines a base model other than the one it was trained for."""
    trained_for = prn_header.get("base", {}).get("sha256")
    if base is not None and trained_for is not None and trained_for != base.sha256:
        warnings.warn(
            f"{Path(prn.path).name} was trained for another base model "
            f"({prn_header['base'].get('file', trained_for[:12])}), not {Path(base.path).name}: "
            "the refined map may be worse than the base one",
            GeoprnWarning,
            stacklevel=3,
        )


def _check_probabilities(path: Path, info: SceneInfo) -> None:
    """A probability raster must be one band on exactly the scene's grid."""
    other = open_scene(path)
    if other.shape != info.shape or other.transform != info.transform or other.crs != info.crs:
        raise InputError(
            f"{path} ({other.width}x{other.height}) is not on the grid of the scene "
            f"({info.width}x{info.height}, same CRS and transform needed)"
        )
    if other.count != 1:
        raise InputError(f"{path} has {other.count} bands; a probability raster has one")


def scene_stem(path: str) -> str:
    """The name a scene's outputs take: its file name without the extension (of a URL's
    path, without its query)."""
    return PurePosixPath(urlsplit(path).path).stem if is_remote(path) else Path(path).stem


def run_signature(job: RefineJob, zarr_format: int) -> dict:
    """What makes two runs the same command: everything that changes the outputs (the
    scene's content as its size and time, or for a remote scene its ETag, say)."""
    return {
        "scene": job.scene.path,
        **job.scene.version,
        **{
            name: ref and {"path": ref.path, "sha256": ref.sha256}
            for name, ref in (("base", job.base), ("prn", job.prn), ("bpr", job.bpr))
        },
        "probs": job.probs,
        "bands": job.bands,
        "tile": job.tile,
        "overlap": job.overlap,
        "block_size": job.block_size,
        "threshold": job.threshold,
        "zarr_format": zarr_format,
        "resample_factor": job.grid.factor,
        "precision": job.precision,
        **({"symmetries": job.symmetries} if job.symmetries != 1 else {}),  # older runs: 1
        **({"bpr_cut_off": job.bpr_cut_off} if job.bpr_cut_off != 0.5 else {}),  # older: 0.5
    }

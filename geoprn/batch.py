"""``refine`` over many scenes in one run: paths, globs and folders, a list file, or a file of
STAC items; each scene keeps its own outputs and resume, and a scene that fails is reported
and skipped while the others finish.

The models load once per process (:func:`geoprn.models.checkpoint.load_cached`) and every
scene's blocks go to the same scheduler (one ``distributed`` client for the batch); on a
cluster two scenes run at once, so workers stay busy across scene borders. The report, a row
per scene, is written to ``OUTDIR/batch.json`` whenever a scene ends, so a batch stopped at
any point says where it stood; the same command resumes every scene.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoprn.bucket import is_bucket
from geoprn.cluster import connect
from geoprn.errors import GeoprnError, InputError
from geoprn.files import write_text
from geoprn.job import scene_stem
from geoprn.remote import is_remote, s3_filesystem

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

GEOTIFF_SUFFIXES = (".tif", ".tiff")
"""What a folder given as a scene contributes: its GeoTIFFs."""

GEOTIFF_MEDIA = ("image/tiff", "image/geotiff")
"""STAC asset media types of a GeoTIFF (``image/tiff; application=geotiff[; profile=...]``)."""


@dataclass(frozen=True)
class SceneSource:
    """One scene of a batch: where it is read from and the name its outputs take."""

    uri: str
    name: str
    problem: str | None = None
    """Why it cannot be run, when that is known before it runs (a STAC item without the
    asset, a glob that matches nothing)."""


@dataclass
class SceneOutcome:
    """One row of the batch report."""

    scene: str
    uri: str
    status: str = "pending"  # pending | running | done | failed | interrupted
    reason: str | None = None
    computed: int = 0
    resumed: int = 0
    skipped: int = 0
    windows: int = 0
    area_km2: float | None = None
    seconds: float = 0.0
    began: float | None = None
    """When the scene started, in seconds from the batch's start."""


@dataclass
class BatchReport:
    """The batch's rows, in the order the scenes were given."""

    scenes: list[SceneOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[SceneOutcome]:
        return [row for row in self.scenes if row.status != "done"]


def gather_scenes(
    arguments: Sequence[str],
    scenes_file: str | Path | None = None,
    stac: str | Path | None = None,
    asset: str | None = None,
) -> list[SceneSource]:
    """The scenes a batch runs, in order: each argument (a file, a URL, a folder's GeoTIFFs,
    or a glob's matches, sorted), then each line of ``scenes_file`` (one path or URL a line,
    relative to the current folder; blank lines and ``#`` comments skipped), then each item
    of the STAC file ``stac`` (:func:`stac_scenes`).

    Raises:
        InputError: ``scenes_file`` or ``stac`` cannot be read, or two scenes would write
            the same outputs.
    """
    entries = list(arguments)
    if scenes_file is not None:
        try:
            lines = Path(scenes_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the scene list {scenes_file}: {exc}") from None
        entries += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = [source for entry in entries for source in _expand(entry)]
    if stac is not None:
        sources += stac_scenes(stac, asset)
    _check_names(sources)
    return sources


def _expand(entry: str) -> list[SceneSource]:
    """The scenes one argument names: itself, a folder's GeoTIFFs, or a glob's matches
    (local, or in a bucket: ``s3://bucket/prefix/``, ``s3://bucket/*.tif``)."""
    if entry.startswith("s3://") and (entry.endswith("/") or glob.has_magic(entry)):
        return _bucket_scenes(entry)
    if is_remote(entry):
        return [SceneSource(entry, scene_stem(entry))]
    path = Path(entry)
    if path.is_dir() and path.suffix != ".zarr":
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in GEOTIFF_SUFFIXES)
        if not found:
            return [SceneSource(entry, entry, f"{entry} holds no GeoTIFF (.tif, .tiff)")]
        return [SceneSource(str(p), p.stem) for p in found]
    if not path.exists() and glob.has_magic(entry):
        matches = sorted(glob.glob(entry, recursive=True))
        if not matches:
            return [SceneSource(entry, entry, f"no file matches {entry}")]
        return [SceneSource(m, Path(m).stem) for m in matches]
    return [SceneSource(entry, path.stem)]


def _bucket_scenes(entry: str) -> list[SceneSource]:
    """The GeoTIFFs under an ``s3://`` prefix (``.../``) or matching an ``s3://`` glob."""
    fs = s3_filesystem()
    where = entry.removeprefix("s3://")
    try:
        keys = fs.glob(where) if glob.has_magic(entry) else fs.find(where)
    except Exception as exc:  # noqa: BLE001 - botocore's own (endpoint, credentials...)
        return [SceneSource(entry, entry, f"cannot list {entry}: {exc}")]
    found = sorted(k for k in keys if k.lower().endswith(GEOTIFF_SUFFIXES))
    if not found:
        return [SceneSource(entry, entry, f"no GeoTIFF (.tif, .tiff) under {entry}")]
    return [SceneSource(f"s3://{key}", scene_stem(key)) for key in found]


def stac_scenes(path: str | Path, asset: str | None = None) -> list[SceneSource]:
    """A scene per STAC Item of ``path`` (an Item, or an ItemCollection / FeatureCollection):
    its asset ``asset``, or without one its ``visual`` asset, else its first GeoTIFF asset;
    named by the item's id. An item without such an asset is a scene with its problem.

    Raises:
        InputError: the file is not a STAC Item or ItemCollection.
    """
    import pystac

    try:
        document = json.loads(Path(path).read_text())
        kind = document.get("type") if isinstance(document, dict) else None
        if kind == "Feature":
            items = [pystac.Item.from_dict(document)]
        elif kind == "FeatureCollection":
            items = list(pystac.ItemCollection.from_dict(document))
        else:
            raise ValueError(f"its type is {kind!r}, not Feature or FeatureCollection")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the STAC file {path}: {exc}") from None
    except (ValueError, KeyError, TypeError, pystac.STACError) as exc:
        raise InputError(f"{path} is not a STAC Item or ItemCollection: {exc}") from None
    base = Path(path).resolve().parent
    return [_item_scene(item, asset, base) for item in items]


def _item_scene(item: Any, key: str | None, base: Path) -> SceneSource:
    """The scene of one STAC item (relative asset hrefs are relative to the STAC file)."""
    assets = item.assets
    if key is None:
        key = (
            "visual"
            if "visual" in assets
            else next((k for k, a in assets.items() if _is_geotiff(a.media_type, a.href)), None)
        )
    if key is None or key not in assets:
        wanted = f"asset {key!r}" if key else "GeoTIFF asset"
        return SceneSource("", item.id, f"STAC item {item.id} has no {wanted}")
    href = assets[key].href
    if not is_remote(href) and not Path(href).is_absolute():
        href = str(base / href)
    return SceneSource(href, item.id)


def _is_geotiff(media_type: str | None, href: str) -> bool:
    if media_type:
        return media_type.split(";")[0].strip().lower() in GEOTIFF_MEDIA
    return href.lower().split("?")[0].endswith(GEOTIFF_SUFFIXES)


def _check_names(sources: Iterable[SceneSource]) -> None:
    """Refuse a batch in which two scenes would write the same outputs."""
    seen: dict[str, str] = {}
    for source in (s for s in sources if s.problem is None):
        if source.name in seen and seen[source.name] != source.uri:
            raise InputError(
                f"{seen[source.name]} and {source.uri} would both write outputs named "
                f"'{source.name}'; run them into different folders"
            )
        seen[source.name] = source.uri


SceneHooks = contextlib.AbstractContextManager[dict[str, Callable]]
"""A scene's ``refine`` callbacks, held while it runs (a progress bar, say)."""

SCENES_IN_FLIGHT = 2
"""Scenes run at once on a cluster: the next scene's blocks reach the workers while the last
blocks and the outputs of the one before are finished, so workers do not wait at scene
borders. On the local scheduler scenes run one after another: its threads already fill the
machine's cores."""


def refine_batch(
    sources: Sequence[SceneSource],
    outdir: str | Path,
    scheduler: str | None = None,
    callbacks: Callable[[SceneSource], SceneHooks] | None = None,
    in_flight: int | None = None,
    **options: Any,
) -> BatchReport:
    """Run :func:`geoprn.pipeline.refine` on every scene into ``outdir`` on one scheduler, in
    order, and report each (``outdir/batch.json``, rewritten whenever a scene ends).

    Args:
        sources: the scenes (:func:`gather_scenes`).
        outdir: the folder every scene's outputs go to, each under its own name.
        scheduler: a ``distributed`` scheduler's address, connected once for the batch.
        callbacks: gives, as a context held while the scene runs, a scene's ``progress`` /
            ``on_windows`` callbacks of ``refine``.
        in_flight: scenes run at once (default :data:`SCENES_IN_FLIGHT` on a cluster, 1 on
            the local scheduler); each scene's outputs are the same either way.
        options: ``refine``'s other arguments, the same for every scene.

    Raises:
        SchedulerError: the scheduler cannot be reached (no scene is run).
        KeyboardInterrupt: after recording the scenes that were running as interrupted.
    """
    from geoprn.pipeline import refine

    started = time.perf_counter()
    report = BatchReport([SceneOutcome(s.name, s.uri) for s in sources])
    report_path = str(outdir).rstrip("/") + "/batch.json"
    saving, stopping = threading.Lock(), threading.Event()

    def save() -> None:
        with saving:
            _save(report, report_path, started)

    def run(source: SceneSource, row: SceneOutcome, client: Client | None) -> None:
        if stopping.is_set():
            return  # not reached: stays pending
        if source.problem is not None:
            row.status, row.reason = "failed", source.problem
            return save()
        began = time.perf_counter()
        row.status, row.began = "running", round(began - started, 3)
        try:
            with callbacks(source) if callbacks else contextlib.nullcontext({}) as hooks:
                record = refine(
                    source.uri, outdir, name=source.name, scheduler=scheduler, client=client,
                    **options, **hooks,
                )  # fmt: skip
        except KeyboardInterrupt:
            row.status, row.seconds = "interrupted", time.perf_counter() - began
            save()
            raise
        except Exception as exc:  # noqa: BLE001 - one scene's failure stays its own
            if stopping.is_set():  # the batch's client closed under it
                row.status = "interrupted"
            elif isinstance(exc, GeoprnError):
                row.status, row.reason = "failed", str(exc)
            else:
                row.status, row.reason = "failed", f"{type(exc).__name__}: {exc}"
                log.info("%s failed:\n%s", source.uri, traceback.format_exc())
        else:
            blocks = record.blocks
            row.status, row.windows, row.area_km2 = "done", record.windows, record.area_km2
            row.computed, row.resumed = blocks["computed"], blocks["resumed"]
            row.skipped = blocks["skipped"]
        row.seconds = round(time.perf_counter() - began, 3)
        if row.status == "failed":
            log.warning("%s: failed: %s", source.name, row.reason)
        save()

    scenes = list(zip(sources, report.scenes, strict=True))
    with connect(scheduler) as client:
        lanes = in_flight or (SCENES_IN_FLIGHT if client is not None else 1)
        if lanes == 1:
            for source, row in scenes:
                run(source, row, client)
            return report
        pool = ThreadPoolExecutor(lanes, thread_name_prefix="scene")
        futures = [pool.submit(run, source, row, client) for source, row in scenes]
        try:
            for future in futures:
                future.result()
        except KeyboardInterrupt:  # only this thread hears it: the scenes stop with the client
            stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            for row in report.scenes:
                if row.status == "running":
                    row.status = "interrupted"
            save()
            raise
        pool.shutdown()
    return report


def _save(report: BatchReport, path: str, started: float) -> None:
    """Write the report as it stands (atomically; to the bucket for an ``s3://`` OUTDIR)."""
    report.seconds = round(time.perf_counter() - started, 3)
    text = json.dumps(asdict(report), indent=1)
    if is_bucket(path):
        try:
            s3_filesystem().pipe_file(path.removeprefix("s3://"), text.encode())
        except Exception as exc:  # noqa: BLE001 - the scenes' own outputs are written
            log.warning("cannot write %s: %s", path, exc)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text(Path(path), text)


def summary_table(report: BatchReport) -> str:
    """The report as a plain-text table, a row per scene and a total."""
    header = ("scene", "status", "computed", "resumed", "skipped", "windows", "km²", "seconds")
    rows = [
        (
            r.scene,
            r.status,
            str(r.computed),
            str(r.resumed),
            str(r.skipped),
            str(r.windows),
            "-" if r.area_km2 is None else f"{r.area_km2:.3f}",
            f"{r.seconds:.1f}",
        )  # fmt: skip
        for r in report.scenes
    ]
    done = [r for r in report.scenes if r.status == "done"]
    area = sum(r.area_km2 or 0.0 for r in done)
    rows.append(
        (
            f"{len(report.scenes)} scenes",
            f"{len(done)} done",
            *(str(sum(getattr(r, k) for r in done)) for k in ("computed", "resumed", "skipped")),
            str(sum(r.windows for r in done)),
            f"{area:.3f}",
            f"{report.seconds:.1f}",
        )  # fmt: skip
    )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    lines = [line(header), *(line(r) for r in rows[:-1]), line(rows[-1])]
    lines += [f"{r.scene}: {r.reason}" for r in report.scenes if r.reason]
    return "\n".join(lines)

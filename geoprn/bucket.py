"""Outputs on object storage: ``refine -o s3://bucket/prefix/``.

The bucket holds the outputs and their run state, exactly as a local folder would (same
names, :mod:`geoprn.store`), and is what a rerun trusts. A run works in a local working copy
of one scene's objects and keeps the bucket in step with it:

1. it takes the scene's **lease**, ``.<stem>.lock``, created by a conditional write (S3's
   ``If-None-Match: *``; no ``flock`` on S3) and renewed while the run lasts; a lease not
   renewed for :data:`LEASE_SECONDS` is taken over (its run died);
2. it **pulls** the scene's objects into the working copy, replacing whatever the copy held:
   signature, done markers, the blocks' pieces, the Zarr store's metadata and chunks;
3. the run goes as a local one (resume, damaged chunks recomputed...), and once its blocks
   are planned the bucket is made the copy's image (objects the copy no longer holds, such as
   a damaged block's, are deleted); then each finished **block** is uploaded, its chunks and
   pieces first and its done marker last, so a kill at any point resumes on the bucket;
4. the mask COG, the quicklook and the road vectors are uploaded once complete, the run
   record ``<stem>_run.json`` last.

On a cluster (``--scheduler``) the workers need not share this machine's disk: each block
task writes into a working copy on its own machine, the Zarr arrays' metadata fetched from
the bucket first, and uploads its chunks, pieces and done marker itself (marker last), then
drops them there; this machine fetches each finished block's marker and pieces (and chunks,
for road vectors) to assemble the mask and the quicklook, and uploads nothing the workers
wrote. Credentials and the endpoint come from the AWS environment (:mod:`geoprn.remote`), on
every machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from geoprn import store
from geoprn.errors import OutputError, WriteError
from geoprn.files import replacing
from geoprn.remote import s3_filesystem

LEASE_SECONDS = 600
"""A lease not renewed for this long belongs to a run that died; another run takes it over."""
RENEW_SECONDS = 60
"""How often a running lease is renewed."""


def is_bucket(outdir: str | os.PathLike) -> bool:
    """Whether ``outdir`` names object storage (``s3://bucket/prefix``)."""
    return str(outdir).startswith("s3://")


def working_copy(url: str) -> Path:
    """The local folder a bucket prefix's outputs are worked on in:
    ``$GEOPRN_CACHE/outputs/<hash of the URL>`` (default cache: ``~/.cache/geoprn``)."""
    cache = Path(os.environ.get("GEOPRN_CACHE", Path.home() / ".cache" / "geoprn"))
    return cache / "outputs" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


class BucketOutputs:
    """One scene's outputs under an ``s3://`` prefix and their local working copy."""

    def __init__(self, url: str, stem: str, workers_upload: bool = False, chunks: bool = False):
        """``workers_upload``: block tasks on a cluster upload their blocks themselves
        (:meth:`on_block` then fetches them, with their ``chunks`` when asked)."""
        self.workers_upload, self.chunks = workers_upload, chunks
        self.url = url.rstrip("/")
        self.fs = s3_filesystem()
        self.root = self.url.removeprefix("s3://")
        self.paths = store.OutputPaths(working_copy(url), stem)
        self.names = [p.name for p in self.paths.outputs()]

    def remote(self, local: Path) -> str:
        """The object key (``bucket/prefix/...``) of a working-copy path."""
        return f"{self.root}/{local.relative_to(self.paths.outdir).as_posix()}"

    def url_of(self, local: Path) -> str:
        return f"s3://{self.remote(local)}"

    def _objects(self) -> dict[str, int]:
        """This scene's objects in the bucket: working-copy relative name -> size."""
        found: dict[str, int] = {}
        for name in self.names:
            key = f"{self.root}/{name}"
            with _bucket_errors(self.url):
                if self.fs.isfile(key):
                    found[name] = self.fs.size(key)
                elif self.fs.isdir(key):
                    for path, info in self.fs.find(key, detail=True).items():
                        found[path.removeprefix(f"{self.root}/")] = info["size"]
        return found

    # -- the lease ------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Hold the scene's lease while a run writes its objects (see the module's text).

        Raises:
            OutputError: another live run holds it.
        """
        key = f"{self.root}/.{self.paths.stem}.lock"
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

        def body() -> bytes:
            return json.dumps({"owner": owner, "expires": time.time() + LEASE_SECONDS}).encode()

        for attempt in range(2):
            try:
                with _bucket_errors(self.url):
                    self.fs.pipe_file(key, body(), mode="create")
                break
            except FileExistsError:
                held = self._read_lease(key)
                if attempt or held.get("expires", 0) > time.time():
                    raise OutputError(
                        f"{self.url} is being written by another run ({held.get('owner', '?')}, "
                        f"lease {key}); wait for it to end"
                    ) from None
                with _bucket_errors(self.url):  # its run died: take it over
                    self.fs.rm_file(key)
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(RENEW_SECONDS):
                with contextlib.suppress(Exception):
                    self.fs.pipe_file(key, body())

        renewer = threading.Thread(target=renew, daemon=True, name="geoprn-lease")
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            with contextlib.suppress(Exception):
                self.fs.rm_file(key)

    def _read_lease(self, key: str) -> dict[str, Any]:
        try:
            held = json.loads(self.fs.cat_file(key))
        except (OSError, ValueError):
            return {}  # gone since, or not ours: expired
        return held if isinstance(held, dict) else {}

    # -- bucket -> working copy ------------------------------------------------------------

    def pull(self) -> None:
        """Make the working copy this scene's objects in the bucket, nothing else."""
        outdir = self.paths.outdir
        outdir.mkdir(parents=True, exist_ok=True)
        store.remove_outputs(self.paths)
        for name in self._objects():
            target = outdir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with _bucket_errors(self.url):
                self.fs.get_file(f"{self.root}/{name}", str(target))

    # -- working copy -> bucket ------------------------------------------------------------

    def sync(self, last: Path | None = None, delete: bool = True) -> None:
        """Make the bucket's objects of this scene the working copy's: upload what it lacks
        or what differs in size (and every small metadata file), delete what the copy no
        longer holds (unless not ``delete``: workers wrote what the copy lacks); ``last`` is
        uploaded after everything else."""
        local = {
            p.relative_to(self.paths.outdir).as_posix(): p
            for name in self.names
            for p in _files(self.paths.outdir / name)
            if not p.name.endswith((".tmp", ".part"))
        }
        remote = self._objects()
        for name in sorted(set(remote) - set(local) if delete else ()):
            with _bucket_errors(self.url):
                self.fs.rm_file(f"{self.root}/{name}")
        ordered = sorted(local.items(), key=lambda item: item[1] == last)
        for name, path in ordered:
            size = path.stat().st_size
            if remote.get(name) != size or size < 4096 or path == last:
                self._put(path)

    def _block_files(self, key: str, recorded: dict[str, Any]) -> tuple[list[Path], list[Path]]:
        """A finished block's chunk files (those it wrote) and its two pieces."""
        chunks = [self.paths.zarr / c for c, d in (recorded.get("chunks") or {}).items() if d]
        pieces = [self.paths.state / "mask" / f"{key}.tif"]
        return chunks, [*pieces, self.paths.quicklook_pieces / f"{key}.npz"]

    def push_block(self, key: str, drop: bool = False) -> None:
        """Upload a finished block: its chunks and pieces, then its done marker; with
        ``drop``, remove them from the working copy once uploaded (a worker's)."""
        marker = self.paths.done / key
        chunks, pieces = self._block_files(key, json.loads(marker.read_text()))
        uploaded = [*chunks, *(p for p in pieces if p.is_file()), marker]
        for path in uploaded:
            self._put(path)
        for path in uploaded if drop else ():
            path.unlink(missing_ok=True)

    def pull_block(self, key: str, chunks: bool = False) -> None:
        """Fetch a block a worker uploaded: its done marker and pieces (and its ``chunks``)."""
        marker = self.paths.done / key
        try:
            self._get(marker)
        except FileNotFoundError:
            raise WriteError(
                f"{self.url}: block {key} finished on a worker but its done marker is not in "
                "the bucket; run the same command again to resume"
            ) from None
        written, pieces = self._block_files(key, json.loads(marker.read_text()))
        for path in [*pieces, *(written if chunks else ())]:
            with contextlib.suppress(FileNotFoundError):  # no piece: a skipped block's
                self._get(path)

    def block_copy(self, variables: list[str]) -> None:
        """Ready this machine's working copy for block tasks (a worker's): the Zarr arrays'
        metadata fetched from the bucket, each file written whole (other tasks read it at
        once), and the folders the pieces and markers go to."""
        for variable in variables:
            for meta in (".zarray", ".zattrs", "zarr.json"):  # Zarr format 2, or 3
                with contextlib.suppress(FileNotFoundError):
                    self._get(self.paths.zarr / variable / meta)
        for folder in (self.paths.done, self.paths.state / "mask", self.paths.quicklook_pieces):
            folder.mkdir(parents=True, exist_ok=True)

    def _get(self, path: Path) -> None:
        """Fetch the object of a working-copy path, written whole (FileNotFoundError: none)."""
        with _bucket_errors(self.url, missing_ok=True):
            data = self.fs.cat_file(self.remote(path))
        with replacing(path, f".{uuid.uuid4().hex[:8]}.part") as tmp:
            tmp.write_bytes(data)

    def on_block(self, result: Any) -> None:
        """``refine``'s progress hook: the first sync once the blocks are planned (called
        with None before the first block), then each finished block: uploaded, or fetched
        where its worker uploaded it."""
        if result is None:
            self.sync()
        elif self.workers_upload:
            self.pull_block(result.key, self.chunks)
        else:
            self.push_block(result.key)

    def _put(self, path: Path) -> None:
        with _bucket_errors(self.url):
            self.fs.put_file(str(path), self.remote(path))


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []


@contextlib.contextmanager
def _bucket_errors(url: str, missing_ok: bool = False) -> Iterator[None]:
    """A bucket that cannot be reached, read or written: one line (``missing_ok``: an object
    that is not there stays FileNotFoundError)."""
    try:
        yield
    except (FileExistsError, OutputError):
        raise
    except PermissionError as exc:
        raise WriteError(f"cannot write {url}: access denied ({exc})") from None
    except FileNotFoundError as exc:
        if missing_ok:
            raise
        raise WriteError(f"cannot write {url}: no such bucket or prefix ({exc})") from None
    except Exception as exc:  # botocore's and aiohttp's own (endpoint, credentials, DNS...)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WriteError(f"cannot write {url}: {text}") from None


def refine_into_bucket(
    refine: Callable[..., Any], scene: str, url: str, name: str, **options: Any
) -> Any:
    """Run ``refine`` (:func:`geoprn.pipeline.refine`) with its outputs under ``url``: lease,
    pull, the run in the working copy with the bucket kept in step, final upload. Returns
    the run record, its outputs named by their URLs."""
    options.pop("bucket", None)
    on_cluster = options.get("scheduler") is not None or options.get("client") is not None
    outputs = BucketOutputs(url, name, on_cluster, chunks=bool(options.get("vectors")))
    user_progress = options.pop("progress", None)

    def progress(done: int, total: int, result: Any) -> None:
        outputs.on_block(result)
        if user_progress is not None:
            user_progress(done, total, result)

    with outputs.lease():
        outputs.pull()
        bucket = url if on_cluster else None  # block tasks write the bucket themselves
        record = refine(
            scene, outputs.paths.outdir, name=name, progress=progress, bucket=bucket, **options
        )
        outputs.sync(last=outputs.paths.run_json, delete=not outputs.workers_upload)
    record.outputs = {key: outputs.url_of(Path(path)) for key, path in record.outputs.items()}
    store.remove_outputs(outputs.paths)  # the bucket has it all; a rerun pulls it again
    return record

"""Output files written whole or not at all, and one line when the file system refuses a write.

Every file a run writes goes through a temporary file beside it that is moved into place only
when complete (:func:`replacing`); when the write fails (disk full, quota, read-only file
system, I/O error) the temporary file is removed, so a failed run leaves no partial file to
fill the disk, and the failure is one :class:`~geoprn.errors.WriteError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from rasterio.errors import RasterioError

try:  # GDAL's own errors, which rasterio raises from some calls unwrapped
    from rasterio._err import CPLE_BaseError
except ImportError:  # pragma: no cover - rasterio without the private module
    CPLE_BaseError = RasterioError

from geoprn.errors import GeoprnError, WriteError

NEARLY_FULL = 1 << 20
"""Free bytes below which a GDAL write error (which gives no cause) is put down to a full disk."""

WRITE_ERRORS = (OSError, RasterioError, CPLE_BaseError)
"""What a failed write raises: Python's file calls, zarr's and rasterio's (GDAL's)."""


def write_error(path: Path, exc: BaseException) -> WriteError:
    """The one-line error for a failed write of ``path``: the system's reason when the
    exception carries one, else (GDAL's errors give none) a full disk when the file system is
    nearly full, else the exception's first line."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.errno else None
    if reason is None:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        with contextlib.suppress(OSError):
            if shutil.disk_usage(_existing(path)).free < NEARLY_FULL:
                reason = os.strerror(errno.ENOSPC)
    return WriteError(f"cannot write {path}: {reason}")


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent folder."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def writing(path: Path, extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn a failed write of ``path`` into :func:`write_error`'s one line (a
    :class:`~geoprn.errors.GeoprnError` raised inside passes unchanged); ``extra``: the
    exceptions of another writer (pyogrio's) to treat alike."""
    try:
        yield
    except GeoprnError:
        raise
    except (*WRITE_ERRORS, *extra) as exc:
        raise write_error(path, exc) from None


@contextlib.contextmanager
def replacing(path: Path, suffix: str = ".part") -> Iterator[Path]:
    """Write ``path`` whole or not at all: yields the temporary file to write (``path`` plus
    ``suffix``, beside it), moved onto ``path`` once the block ends. On any failure the
    temporary file is removed; a failed write is :func:`write_error`'s one line.

    Raises:
        WriteError: the file system refused the write.
    """
    tmp = path.with_name(path.name + suffix)
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all (:func:`replacing`)."""
    with replacing(path, ".tmp") as tmp:
        tmp.write_text(text)
    return path

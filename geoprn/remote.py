"""Scenes on a web server or object storage: GDAL's settings for remote reads, and what
identifies a remote file's content (so a rerun notices a scene changed on the server).

Remote scenes are read by GDAL's virtual file systems through rasterio: ``https://`` and
``http://`` URLs through ``/vsicurl/``, ``s3://bucket/key`` through ``/vsis3/``, and any
``/vsi...`` path as given. Credentials and the endpoint come from the usual AWS environment
variables and config files (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``AWS_ENDPOINT_URL``), never from the command line.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from geoprn.errors import InputError

URL_SCHEMES = ("http://", "https://", "s3://")
"""Scene addresses geoprn reads remotely, besides GDAL's own ``/vsi...`` paths."""

REMOTE_READ_SETTINGS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no listing of the server's folder on open
    "GDAL_HTTP_MAX_RETRY": "5",  # a dropped connection or a 429/5xx is retried...
    "GDAL_HTTP_RETRY_DELAY": "1",  # ...after 1 s, doubling
    "GDAL_HTTP_TIMEOUT": "60",
    "CPL_VSIL_CURL_CACHE_SIZE": str(64 << 20),  # recently read ranges, shared by a process
    "GDAL_HTTP_MULTIPLEX": "YES",  # HTTP/2 where the server speaks it
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "VSI_CACHE": "TRUE",
}
"""GDAL's settings for reading a remote scene, each kept when the user set it. Blocks start
at multiples of 512 px and each is read with its halo in one call, which GDAL fetches as a
few ranges of whole internal tiles of a COG."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a scene GDAL reads over the network (or any ``/vsi`` file)."""
    text = str(path)
    return text.startswith(URL_SCHEMES) or text.startswith("/vsi")


def aws_endpoint_settings(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """GDAL's own settings for the S3-compatible endpoint ``AWS_ENDPOINT_URL`` names (MinIO,
    Ceph, a cloud's S3 API...): ``AWS_S3_ENDPOINT`` (host, port and path), ``AWS_HTTPS`` and
    path-style addressing; each kept where the user set it. GDAL 3.10 does not read
    ``AWS_ENDPOINT_URL`` itself."""
    url = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if not url:
        return {}
    parts = urlsplit(url if "://" in url else f"https://{url}")
    settings = {
        "AWS_S3_ENDPOINT": parts.netloc + parts.path.rstrip("/"),
        "AWS_HTTPS": "NO" if parts.scheme == "http" else "YES",
        "AWS_VIRTUAL_HOSTING": "FALSE",  # bucket in the path: what such servers serve
    }
    return {key: value for key, value in settings.items() if key not in environ}


def read_settings(path: str | os.PathLike) -> dict[str, str]:
    """The GDAL settings a read of ``path`` needs and the user did not set (none for a local
    file: ``GDAL_DISABLE_READDIR_ON_OPEN`` would hide its side-car files, .aux.xml, .ovr,
    world files)."""
    if not is_remote(path):
        return {}
    settings = {k: v for k, v in REMOTE_READ_SETTINGS.items() if k not in os.environ}
    return settings | aws_endpoint_settings()


def object_url(path: str) -> str | None:
    """The ``https://`` or ``s3://`` URL of a remote scene (``/vsicurl/`` and ``/vsis3/``
    paths translated), or None for other ``/vsi`` file systems."""
    for prefix, scheme in (("/vsicurl/", ""), ("/vsis3/", "s3://")):
        if path.startswith(prefix):
            return scheme + path[len(prefix) :]
    return path if path.startswith(URL_SCHEMES) else None


def remote_version(path: str) -> dict[str, Any]:
    """What identifies a remote file's content, as the server reports it: its size and its
    ETag, or its last-modified time where it sends no ETag. Empty for a ``/vsi`` file system
    geoprn does not stat (a change there goes unnoticed).

    Raises:
        InputError: the file is not there, or the server cannot be reached.
    """
    url = object_url(path)
    if url is None:
        return {}
    import fsspec

    try:
        if url.startswith("s3://"):
            fs, where = s3_filesystem(), url.removeprefix("s3://")
        else:
            fs, where = fsspec.core.url_to_fs(url, skip_instance_cache=True)
        info = fs.info(where)
    except FileNotFoundError as exc:
        cause = exc.__cause__  # fsspec's HTTP says "not found" for a server it cannot reach
        if cause is None or getattr(cause, "status", None) == 404:
            raise InputError(f"not found: {path}") from None
        raise InputError(f"cannot reach {path}: {_reason(cause)}") from None
    except Exception as exc:  # OSError, and botocore's and aiohttp's own (credentials, DNS...)
        raise InputError(f"cannot reach {path}: {_reason(exc)}") from None
    etag = info.get("ETag") or info.get("etag")
    version: dict[str, Any] = {"scene_bytes": info.get("size")}
    if etag:
        version["scene_etag"] = str(etag).strip('"')
    else:
        modified = info.get("LastModified") or info.get("Last-Modified")
        version["scene_last_modified"] = str(modified) if modified else None
    return version


def s3_filesystem() -> Any:
    """An ``s3fs`` file system as the AWS environment describes it: credentials and region
    through botocore, the endpoint of ``AWS_ENDPOINT_URL``, anonymous with
    ``AWS_NO_SIGN_REQUEST=YES`` (a public bucket, as GDAL reads it then)."""
    import s3fs

    options: dict[str, Any] = {"skip_instance_cache": True}  # (a cached one lists stale)
    if _endpoint():
        options["endpoint_url"] = _endpoint()
    if os.environ.get("AWS_NO_SIGN_REQUEST", "").upper() in ("YES", "TRUE", "ON", "1"):
        options["anon"] = True
    return s3fs.S3FileSystem(**options)


def _endpoint() -> str | None:
    """The S3 endpoint the user named (s3fs reads ``AWS_ENDPOINT_URL`` through botocore
    too; given explicitly, the service-specific ``AWS_ENDPOINT_URL_S3`` wins as it does there)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _reason(exc: BaseException) -> str:
    """An exception's first line, or its type's name, and what caused it when it says more."""
    while isinstance(exc.__cause__, OSError) and not str(exc).strip():
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""Real servers on 127.0.0.1 for the remote-scene tests and ``benchmarks/batch.py``: an HTTP
server with byte-range support (what GDAL's ``/vsicurl/`` reads COGs with) and moto's
standalone S3-protocol server."""

from __future__ import annotations

import contextlib
import email.utils
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves files of a folder with ``Range`` (one range a request), ``ETag`` and
    ``Last-Modified``, over HTTP/1.1 keep-alive connections."""

    protocol_version = "HTTP/1.1"
    requests: list[str]  # set per server: "METHOD range" of each request, for the tests

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = Path(self.translate_path(self.path))
        self.requests.append(f"{self.command} {self.headers.get('Range', '')}")
        if not path.is_file():
            self.send_error(404)
            return
        stat = path.stat()
        size, start, end, status = stat.st_size, 0, stat.st_size - 1, 200
        wanted = self.headers.get("Range")
        if wanted:
            match = RANGE.fullmatch(wanted.strip())
            if match is None or match.groups() == ("", ""):
                self.send_error(416)
                return
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            else:
                start = max(size - int(last), 0)
            if start > end:
                self.send_error(416)
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"')
        self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body:
            with path.open("rb") as f:
                f.seek(start)
                remaining = end - start + 1
                while remaining:
                    chunk = f.read(min(remaining, 1 << 16))
                    self.wfile.write(chunk)
                    remaining -= len(chunk)


def _range_server(folder: Path, port: int = 0) -> tuple[ThreadingHTTPServer, list[str]]:
    requests: list[str] = []
    handler = type("Handler", (RangeHandler,), {"requests": requests})

    def make(*args, **kwargs):
        return handler(*args, directory=str(folder), **kwargs)

    return ThreadingHTTPServer(("127.0.0.1", port), make), requests


@contextlib.contextmanager
def http_server(folder: Path, own_process: bool = False) -> Iterator[tuple[str, list[str]]]:
    """Serve ``folder`` on 127.0.0.1 (a free port), in a thread or (``own_process``, as a
    real server runs, not sharing this process's interpreter) a process of its own; yields
    its base URL and the log of requests it answered (empty for a process)."""
    if own_process:
        port = _free_port()
        server = subprocess.Popen([sys.executable, __file__, str(folder), str(port)])
        try:
            _wait_for(port, server, "the HTTP server")
            yield f"http://127.0.0.1:{port}", []
        finally:
            server.terminate()
            server.wait(30)
        return
    server, requests = _range_server(folder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(port: int, server: subprocess.Popen, name: str) -> None:
    """Until a server process listens on ``port``."""
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start (exit {server.poll()})")
        time.sleep(0.1)


AWS_TEST_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "geoprn-test",
    "AWS_SECRET_ACCESS_KEY": "geoprn-test-secret",
    "AWS_REGION": "us-east-1",
}


@contextlib.contextmanager
def s3_server(config_dir: Path) -> Iterator[str]:
    """moto's standalone S3-protocol server, in a process of its own on 127.0.0.1 (a free
    port), with the AWS environment a user of an S3-compatible server sets (credentials,
    region, ``AWS_ENDPOINT_URL``) and no AWS config file of this machine in the way; yields
    the endpoint URL. The environment is put back afterwards."""
    port = _free_port()  # moto's server picks none of its own
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    environment = {
        **AWS_TEST_ENVIRONMENT,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": str(config_dir / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(config_dir / "no-credentials"),
    }
    saved = {key: os.environ.get(key) for key in environment}
    try:
        _wait_for(port, server, "moto's S3 server")
        os.environ.update(environment)
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.wait(30)


def put_objects(endpoint: str, bucket: str, files: dict[str, Path]) -> None:
    """Create ``bucket`` on the S3 server and upload ``files`` (key -> local file)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    for key, path in files.items():
        client.upload_file(str(path), bucket, key)


def to_cog(source: Path, target: Path, blocksize: int = 512) -> Path:
    """``source`` as a Cloud-Optimized GeoTIFF (GDAL's COG driver through rasterio)."""
    import rasterio.shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    rasterio.shutil.copy(source, target, driver="COG", BLOCKSIZE=blocksize, COMPRESS="DEFLATE")
    return target


if __name__ == "__main__":  # python tests/servers.py FOLDER PORT: the HTTP server alone
    _range_server(Path(sys.argv[1]), int(sys.argv[2]))[0].serve_forever()

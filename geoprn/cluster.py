"""Dask ``distributed`` clients: an existing cluster by address, or worker processes here."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import dask

from geoprn.errors import SchedulerError

if TYPE_CHECKING:
    from distributed import Client


NETWORK_SCHEMES = ("tcp", "tls", "ws", "wss")
"""Address schemes of ``distributed`` whose location is HOST:PORT."""


def check_address(scheduler: str) -> None:
    """Refuse, at once, a scheduler address ``distributed`` could not connect to: an unknown
    scheme, no port, or a host name that does not resolve. (A ``Client`` given such an address
    fails only after its timeout, and leaves a half-made client whose ``__del__`` waits 10 s
    more and prints a traceback.)

    Raises:
        SchedulerError: the address is malformed or its host unknown.
    """
    from distributed.comm import parse_address, parse_host_port
    from distributed.comm.registry import backends

    def refuse(why: str) -> SchedulerError:
        return SchedulerError(
            f"--scheduler {scheduler!r} is not a Dask scheduler address like tcp://HOST:PORT "
            f"({why})"
        )

    try:
        scheme, location = parse_address(scheduler)
    except (TypeError, ValueError) as exc:
        raise refuse(str(exc)) from None
    if scheme not in backends:
        raise refuse(f"unknown scheme {scheme}://; known: {', '.join(sorted(backends))}")
    if scheme not in NETWORK_SCHEMES:
        return
    try:
        host, port = parse_host_port(location)
    except (TypeError, ValueError):
        raise refuse("no port number") from None
    if not host or not 0 < port < 65536:
        raise refuse("no host" if not host else f"port {port} is out of range")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise SchedulerError(
            f"cannot reach the Dask scheduler at {scheduler}: unknown host {host} ({why})"
        ) from None


@contextlib.contextmanager
def connect(scheduler: str | None) -> Iterator[Client | None]:
    """A client of the ``distributed`` scheduler at ``scheduler``; None for the local one.

    Not made dask's default: callers hand it their work, and runs at once in one process
    (each with its own client) would otherwise leave dask's default scheduler pointing at a
    closed client for unrelated ``dask.compute`` calls."""
    if scheduler is None:
        yield None
        return
    check_address(scheduler)
    from distributed import Client

    try:
        client = Client(scheduler, timeout="5s", set_as_default=False)  # callers pass it
    except (OSError, TimeoutError, ValueError) as exc:
        raise SchedulerError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    with client:
        yield client


@contextlib.contextmanager
def process_cluster(scheduler: str | None, workers: int) -> Iterator[Client]:
    """A client of the cluster at ``scheduler`` or, without one, of a ``LocalCluster`` of
    ``workers`` single-threaded processes. Its workers may start processes of their own (a
    ``DataLoader``'s), which Dask's default daemon workers may not."""
    if scheduler is not None:
        with connect(scheduler) as client:
            yield client
        return
    from distributed import Client, LocalCluster

    with (
        dask.config.set({"distributed.worker.daemon": False}),
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        yield client

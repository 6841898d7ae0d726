"""Dask ``distributed`` clients: an existing cluster by address, or worker processes here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import dask

from geoprn.errors import SchedulerError

if TYPE_CHECKING:
    from distributed import Client


@contextlib.contextmanager
def connect(scheduler: str | None) -> Iterator[Client | None]:
    """A client of the ``distributed`` scheduler at ``scheduler``; None for the local one.

    Not made dask's default: callers hand it their work, and runs at once in one process
    (each with its own client) would otherwise leave dask's default scheduler pointing at a
    closed client for unrelated ``dask.compute`` calls."""
    if scheduler is None:
        yield None
        return
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

"""Dask clusters for the commands that fan out: a ``LocalCluster`` here, or a scheduler address.

``scheduler="local"`` starts a ``LocalCluster`` of single-threaded worker processes (each sized
by ``threads``: the torch threads its tasks use) and closes it at the end; anything else is the
address of a running scheduler (``tcp://host:8786``, started with ``dask scheduler`` and joined
by ``dask worker ADDRESS --nthreads 1`` on each machine). Used by :mod:`pipeline.sweep` (stage
two) and :mod:`pipeline.cluster_cache` (stage one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)
LOCAL = "local"


def check_scheduler(scheduler: str, flag: str = "--scheduler") -> None:
    """``local`` or a scheduler address such as ``tcp://host:8786``."""
    if scheduler != LOCAL and "://" not in scheduler:
        raise ConfigError(
            f"{flag} {scheduler!r}: expected 'local' (a LocalCluster here) or a scheduler "
            "address such as tcp://host:8786"
        )


def worker_environ(threads: int) -> dict[str, Any]:
    """Environment of LocalCluster workers: Dask's defaults without ``MALLOC_TRIM_THRESHOLD_``,
    and ``threads`` for the BLAS/OpenMP thread pools (torch's intra-op threads).

    Dask sets ``MALLOC_TRIM_THRESHOLD_`` to 64 KiB so workers hand freed memory back to the OS at
    once; the loader frees and reallocates batch-sized arrays all the time, so with it a sweep
    unit spends its time in page faults and system calls.
    """
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        environ[name] = threads
    return environ


@contextmanager
def dask_client(scheduler: str, workers: int, threads: int) -> Iterator[Any]:
    """A ``distributed.Client`` on ``scheduler``; for ``local``, on a fresh LocalCluster of
    ``workers`` processes of ``threads`` torch threads each. Both are closed at the end."""
    import dask
    from distributed import Client, LocalCluster

    check_scheduler(scheduler)
    cluster = None
    if scheduler == LOCAL:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ(threads)}):
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                # no dashboard, but the scheduler still serves /health on HTTP: on a free port
                # rather than 8787, which another cluster on this machine may hold
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                silence_logs=logging.WARNING,
            )
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def worker_resources(client: Any) -> list[dict[str, float]]:
    """The resources each worker connected to ``client``'s scheduler declares."""
    workers = client.scheduler_info().get("workers", {})
    return [dict(w.get("resources") or {}) for w in workers.values()]

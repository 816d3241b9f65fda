"""Stage one on a Dask cluster: ``sidecache cache ... --scheduler local|ADDRESS --shards N``.

The cluster runs the ``--shard I/N`` workers of :mod:`pipeline.shards` for the user: one task
per shard index, each the same stage-one settings with ``shard="I/N"``, run by
:func:`pipeline.cache.run_cache` in a worker process (which opens and writes the store itself,
so ``--out`` must be visible to every worker). Where the cluster's workers declare a ``GPU``
resource (``dask worker ADDRESS --nthreads 1 --resources GPU=1``, one per GPU with its
``CUDA_VISIBLE_DEVICES``), each task asks for one, so a GPU runs one shard task at a time.

A task whose worker dies is run again by Dask on another worker (or the restarted one); it
resumes from the shards already on disk, and its dead predecessor's claim is stale (same host,
pid gone) and cleared. A task that fails with an unexpected error is retried ``retries`` times.
A sidecache error (bad settings, a store written with other settings, a busy store, a full
disk) is not retried: another try would fail the same way. Once every task has finished, the
store is finalised as ``--finalize`` does, and the summary is the single-process one.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from tqdm import tqdm

from pipeline.cache import CacheConfig, check_writable, run_cache, validate
from pipeline.cluster import LOCAL, check_scheduler, dask_client, worker_resources
from pipeline.config import setting
from pipeline.errors import ConfigError, SidecacheError
from pipeline.shards import parse_shard

log = logging.getLogger(__name__)
GPU = "GPU"  # the Dask worker resource a shard task asks one of, where workers declare it
WAIT_FOR_WORKERS_S = 60.0


class ClusterError(SidecacheError, RuntimeError):
    """A Dask cluster could not run stage one: no workers joined, or a shard task still failed
    after its retries. The shards already written are kept, so the same command resumes."""


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how finely stage one fans out (``--scheduler``, ``--shards``, ...)."""

    scheduler: str | None = setting(
        help="run the --shard workers as tasks on a Dask cluster: local (a LocalCluster here) or "
        "a scheduler address (tcp://host:8786); needs --shards",
        fallback=None,
    )
    shards: int | None = setting(help="shard tasks (I/N)", metavar="N", fallback=None)
    workers: int = setting(
        0, "LocalCluster worker processes (default: one per shard task, at most one per core)"
    )
    retries: int = setting(1, "retries of a task that crashed")  # an unexpected error


@dataclass(frozen=True)
class ShardOutcome:
    """What one shard task reports back: where it ran, how long, and its sidecache error."""

    shard: str
    worker: str
    wall_s: float
    error: SidecacheError | None = None


def check_options(cfg: CacheConfig, opts: ClusterOptions) -> None:
    """Refuse flag combinations a cluster run cannot honour, before anything starts."""
    if opts.scheduler is None:
        raise ConfigError(
            "--shards needs --scheduler local|tcp://HOST:PORT to run the shard tasks on; without "
            "a cluster, start the N workers yourself with --shard I/N"
        )
    check_scheduler(opts.scheduler)
    if opts.shards is None or opts.shards < 1:
        raise ConfigError(
            f"--scheduler needs --shards N with N >= 1 (how many --shard I/N tasks to cut stage "
            f"one into), found {opts.shards}"
        )
    if parse_shard(cfg.shard) is not None:
        raise ConfigError(
            f"--shard {cfg.shard} runs one worker by hand and --scheduler runs all of them: "
            "give --shards N with --scheduler, or --shard I/N without it"
        )
    if cfg.overwrite:
        raise ConfigError(
            "--overwrite cannot be combined with --scheduler (one shard task would delete the "
            "others' shards): delete the old store first, or run once without --scheduler"
        )
    if cfg.finalize:
        raise ConfigError("--finalize only finishes a written store: drop --scheduler/--shards")
    _check_sizes(opts)


def _check_sizes(opts: ClusterOptions) -> None:
    if opts.workers < 0 or opts.retries < 0:
        raise ConfigError(
            f"--workers and --retries must be 0 or more, found {opts.workers} and {opts.retries}"
        )
    if opts.workers and opts.scheduler != LOCAL:
        raise ConfigError(
            f"--workers sizes a local cluster only; the workers of {opts.scheduler} are the ones "
            "started there: drop --workers, or use --scheduler local"
        )


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def local_size(opts: ClusterOptions) -> tuple[int, int]:
    """(worker processes, torch threads each) of a local cluster: the cores shared evenly."""
    cores = usable_cores()
    workers = opts.workers or max(1, min(opts.shards or 1, cores))
    return workers, max(1, cores // workers)


def run_shard(cfg: CacheConfig) -> ShardOutcome:
    """One ``--shard I/N`` worker's stage one, on a cluster worker. A sidecache error is returned
    rather than raised, so that Dask retries only what another try can mend."""
    started = time.perf_counter()
    where = f"{socket.gethostname()}:{os.getpid()}"
    try:
        run_cache(cfg)
    except SidecacheError as exc:
        return ShardOutcome(str(cfg.shard), where, time.perf_counter() - started, exc)
    return ShardOutcome(str(cfg.shard), where, time.perf_counter() - started)


def task_resources(client: Any) -> dict[str, float] | None:
    """One GPU per task where the cluster's workers declare GPUs; no constraint otherwise."""
    if any(GPU in declared for declared in worker_resources(client)):
        return {GPU: 1}
    return None


def run_cache_on_cluster(cfg: CacheConfig, opts: ClusterOptions) -> dict[str, Any]:
    """Stage one as ``opts.shards`` shard tasks on a Dask cluster, then finalise the store;
    returns the store summary (as :func:`pipeline.cache.run_cache` does)."""
    check_options(cfg, opts)
    validate(cfg)
    check_writable(cfg.out)
    workers, threads = local_size(opts)
    with dask_client(str(opts.scheduler), workers, threads) as client:
        outcomes = _run_tasks(client, cfg, opts)
    errors = [o.error for o in outcomes if o.error is not None]
    for failed in outcomes:
        if failed.error is not None:
            log.error("shard task %s failed: %s: %s", failed.shard, type(failed.error).__name__,
                      failed.error)  # fmt: skip
    if errors:
        raise errors[0]
    return run_cache(replace(cfg, finalize=True, shard=None))


def _run_tasks(client: Any, cfg: CacheConfig, opts: ClusterOptions) -> list[ShardOutcome]:
    from distributed import as_completed

    try:
        client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
    except TimeoutError:
        raise ClusterError(
            f"no Dask worker joined {opts.scheduler} within {WAIT_FOR_WORKERS_S:.0f} s; expected "
            "at least one: start them with `dask worker ADDRESS --nthreads 1`"
        ) from None
    resources = task_resources(client)
    n, run = int(opts.shards or 1), uuid.uuid4().hex[:8]
    log.info("stage one: %d shard tasks on %s%s", n, opts.scheduler,
             " (one GPU each)" if resources else "")  # fmt: skip
    futures = {
        client.submit(
            run_shard, replace(cfg, shard=f"{i}/{n}", progress=False), pure=False,
            key=f"sidecache-cache-{run}-shard-{i}-of-{n}", retries=opts.retries,
            resources=resources, priority=-i,
        ): f"{i}/{n}"
        for i in range(n)
    }  # fmt: skip
    outcomes = []
    with tqdm(total=n, unit="shard task", desc="stage one", disable=not cfg.progress) as bar:
        for future in as_completed(futures):
            outcomes.append(_outcome(future, futures[future], opts.retries))
            bar.update(1)
    return outcomes


def _outcome(future: Any, shard: str, retries: int) -> ShardOutcome:
    if future.status != "finished":  # after its retries, or its workers kept dying
        exc = future.exception()
        error = ClusterError(
            f"shard task {shard} failed on the cluster after {retries} retries "
            f"({type(exc).__name__}: {exc}); the shards already on disk are kept: re-run the "
            "same command to resume"
        )
        return ShardOutcome(shard, "?", 0.0, error)
    outcome: ShardOutcome = future.result()
    if outcome.error is None:
        log.info("shard task %s done on %s in %.1f s", shard, outcome.worker, outcome.wall_s)
    return outcome

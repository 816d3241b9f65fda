"""``sidecache cache``: stage one (run the backbone once, write the store)."""

from __future__ import annotations

import argparse
import json
import logging

from pipeline.cache import CacheConfig, run_cache
from pipeline.cluster_cache import ClusterOptions, run_cache_on_cluster
from pipeline.config import add_flags, from_args

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecache cache",
        description="Run a frozen backbone once and store its hidden states.",
    )
    add_flags(p, CacheConfig)
    p.add_argument("--json", action="store_true", help="print the store summary as JSON")
    add_flags(p.add_argument_group("Dask cluster (pipeline.cluster_cache)"), ClusterOptions)
    return p


def cluster_options(args: argparse.Namespace) -> ClusterOptions | None:
    """``--scheduler``/``--shards``: the --shard workers as tasks on a Dask cluster, or None."""
    if args.scheduler is None and args.shards is None:
        return None
    return from_args(ClusterOptions, args)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = from_args(CacheConfig, args)
    cluster = cluster_options(args)
    summary = run_cache(cfg) if cluster is None else run_cache_on_cluster(cfg, cluster)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        from stages.inspect import format_summary

        print(format_summary(summary))
    return 0

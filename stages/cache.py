"""``sidecache cache``: stage one (run the backbone once, write the store)."""

from __future__ import annotations

import argparse
import json
import logging

from pipeline.backbone import DEFAULT_BACKBONE
from pipeline.cache import CacheConfig, run_cache
from pipeline.cluster_cache import ClusterOptions, run_cache_on_cluster
from pipeline.data import ColumnOptions
from pipeline.tokens import BATCH_COST

log = logging.getLogger(__name__)


def _batch_cost(text: str) -> int | None:
    """``--batch-cost``: a number of token slots, or ``fill`` for the budget-filling cut."""
    if text == "fill":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of token slots or 'fill'; found {text!r}"
        ) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecache cache",
        description="Run a frozen backbone once and store its hidden states.",
    )
    p.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        help="local model folder, hub id, or 'minilm' (default, shipped on PyPI)",
    )
    p.add_argument("--revision", default=None, help="hub revision of the backbone")
    p.add_argument(
        "--data",
        default="bbc",
        help="bbc | glue:DIR | hf:NAME[:CONFIG] | csv:PATH | jsonl:PATH | parquet:PATH",
    )
    p.add_argument("--split", default="train", help="train, dev, ... (default train)")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples of the split")
    p.add_argument(
        "--out",
        required=True,
        help="store to write: a folder or an fsspec URL (s3://bucket/store, memory://...); "
        "credentials come from the environment or ~/.aws, never from the URL",
    )
    p.add_argument("--layers", default="all", help="all, or comma list like 0,3,-1")
    p.add_argument("--positions", default="all", help="all | first | last | mean")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32 | int8")
    p.add_argument(
        "--codec", default="blosc-lz4:5", help="blosc-lz4 | blosc-zstd | zstd | none [:LEVEL]"
    )
    p.add_argument("--max-length", type=int, default=None, help="truncate samples to N tokens")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    p.add_argument("--text-column", default=None)
    p.add_argument("--text-pair-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument(
        "--lst-prune",
        type=int,
        default=None,
        metavar="R",
        help="also store a pruned copy of the backbone (width d/R) to initialise LST",
    )
    p.add_argument("--token-budget", type=int, default=4096, help="padded tokens per batch")
    p.add_argument("--max-batch", type=int, default=256, help="samples per batch at most")
    p.add_argument(
        "--batch-cost", type=_batch_cost, default=BATCH_COST,
        help="what one more batch costs, in padded token slots: batches are cut where padding "
        "plus this per batch is least; 'fill' fills each batch to the budget, as stores written "
        "before this flag did (to resume one of those)",
    )  # fmt: skip
    p.add_argument(
        "--window-mb",
        type=float,
        default=CacheConfig.window_mb,
        help="samples are length-sorted within windows of this many stored MB",
    )
    p.add_argument("--writer-threads", type=int, default=2, help="compression/write threads")
    p.add_argument(
        "--streams",
        type=int,
        default=CacheConfig.streams,
        help="on CPU, batches run through the backbone at once, each on its own thread with its "
        "share of torch's threads (CUDA: always 1)",
    )
    p.add_argument("--chunk-mb", type=float, default=4.0, help="target chunk size")
    p.add_argument("--shard-chunks", type=int, default=8, help="chunks per shard file")
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="write only worker I's share of N (run N of these, e.g. one per GPU); the last to "
        "finish finalises the store",
    )
    p.add_argument(
        "--finalize",
        action="store_true",
        help="only finalise a store whose shards are all written (after --shard workers)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the store summary as JSON")
    add_cluster_flags(p)
    return p


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """``--scheduler``/``--shards``: the --shard workers as tasks on a Dask cluster."""
    g = p.add_argument_group("Dask cluster (pipeline.cluster_cache)")
    g.add_argument(
        "--scheduler", default=None,
        help="run the --shard workers as tasks on a Dask cluster: local (a LocalCluster here) or "
        "a scheduler address (tcp://host:8786); needs --shards",
    )  # fmt: skip
    g.add_argument("--shards", type=int, default=None, metavar="N", help="shard tasks (I/N)")
    g.add_argument(
        "--workers", type=int, default=0,
        help="LocalCluster worker processes (default: one per shard task, at most one per core)",
    )  # fmt: skip
    g.add_argument("--retries", type=int, default=1, help="retries of a task that crashed")


def cluster_options(args: argparse.Namespace) -> ClusterOptions | None:
    if args.scheduler is None and args.shards is None:
        return None
    return ClusterOptions(args.scheduler, args.shards, args.workers, args.retries)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = CacheConfig(
        backbone=args.backbone,
        revision=args.revision,
        data=args.data,
        split=args.split,
        limit=args.limit,
        lst_prune=args.lst_prune,
        out=args.out,
        layers=args.layers,
        positions=args.positions,
        dtype=args.dtype,
        codec=args.codec,
        max_length=args.max_length,
        device=args.device,
        overwrite=args.overwrite,
        columns=ColumnOptions(args.text_column, args.text_pair_column, args.label_column),
        token_budget=args.token_budget,
        max_batch=args.max_batch,
        batch_cost=args.batch_cost,
        window_mb=args.window_mb,
        writer_threads=args.writer_threads,
        streams=args.streams,
        chunk_mb=args.chunk_mb,
        shard_chunks=args.shard_chunks,
        progress=not args.no_progress,
        shard=args.shard,
        finalize=args.finalize,
    )
    cluster = cluster_options(args)
    summary = run_cache(cfg) if cluster is None else run_cache_on_cluster(cfg, cluster)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        from stages.inspect import format_summary

        print(format_summary(summary))
    return 0

"""``sidecache sweep``: side-network specs x tasks x seeds over a Dask cluster (stage two)."""

from __future__ import annotations

import argparse
import logging

from pipeline.sweep import SweepConfig, markdown, parse_seeds, parse_task, run_sweep

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecache sweep",
        description="Train many side networks over a Dask cluster; one table of results.",
    )
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME=TRAIN,EVAL",
        help="a train/eval store pair (folders or URLs such as s3://bucket/store); repeat",
    )
    p.add_argument(
        "--sidenet",
        action="append",
        default=[],
        metavar="SPEC",
        help="KIND[:key=value,...] as for 'sidecache train'; repeat",
    )
    p.add_argument("--seeds", default="0", help="comma list, e.g. 0,1,2 (default 0)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", required=True, help="OUT/<task>/seed<S>/<name>/ (shared by workers)")
    p.add_argument(
        "--scheduler",
        default="local",
        help="local (a LocalCluster here), sequential (no Dask), or a scheduler address "
        "(tcp://host:8786)",
    )
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument(
        "--per-pass", type=int, default=0, help="side networks per pass at most (0 = auto)"
    )
    p.add_argument("--retries", type=int, default=1, help="retries of a failed unit")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (on the workers)")
    p.add_argument("--ram-budget-mb", type=int, default=4096, help="keep stores this small in RAM")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = run_sweep(SweepConfig(
        tasks=[parse_task(t) for t in args.task], specs=args.sidenet,
        seeds=parse_seeds(args.seeds), epochs=args.epochs, out=args.out,
        scheduler=args.scheduler, workers=args.workers, threads=args.threads,
        per_pass=args.per_pass, retries=args.retries, batch_size=args.batch_size,
        device=args.device, ram_budget_mb=args.ram_budget_mb,
    ))  # fmt: skip
    print(markdown(result.rows))
    print(f"\n{len(result.rows)} rows in {result.wall_s:.1f} s; table: {args.out}/sweep.csv")
    for failure in result.failures:
        log.error("failed: %s (%s): %s", failure["unit"], ", ".join(failure["names"]),
                  failure["error"])  # fmt: skip
    return 0 if result.ok else 1

"""``sidecache bench``: cached side networks vs online baselines on one task, one table."""

from __future__ import annotations

import argparse

from pipeline.bench import DEFAULT_METHODS, BenchConfig, run_bench, to_markdown


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sidecache bench",
        description="Train cached side networks and online baselines on one task; one table of "
        "quality (mean ± std over seeds), trainable parameters, peak memory, wall time, "
        "CPU-seconds, GPU energy and stage-one cost. Every run is a fresh subprocess.",
    )
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--data", help="data spec, e.g. glue:../shared/data/glue/MRPC")
    p.add_argument("--out", help="folder for stores, runs, bench.json/.csv/.md")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma list of cached:KIND[:key=value;...] (stage two side networks) and "
        "online:KIND[:key=value;...] (full, lora, meft, read, lst), keys joined by ';', e.g. "
        f"online:lora:r=8;lr=5e-4; default {','.join(DEFAULT_METHODS)}",
    )
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma list, default 0,1,2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="first N training samples")
    p.add_argument("--eval-limit", type=int, help="first N evaluation samples")
    p.add_argument("--eval-split", default="dev")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", help="store dtype (online READ/LST round to it)")
    p.add_argument(
        "--positions", default="all",
        help="the stores' positions: all, or first/last when every cached method reads only that "
        "one (a leaner store; online methods are unaffected)",
    )  # fmt: skip
    p.add_argument(
        "--chunk-mb", type=float, default=4.0,
        help="the stores' chunk size; a streaming loader decodes whole chunks of every layer",
    )  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--ram-budget-mb",
        type=int,
        default=4096,
        help="cached runs hold stores up to this size in RAM (0: stream them)",
    )
    p.add_argument(
        "--pool-mb", type=int, default=512, help="cached runs: the loader's budget for stored rows"
    )
    p.add_argument(
        "--low-memory", action="store_true", help="cached runs: sidecache train --low-memory"
    )
    p.add_argument(
        "--micro-rows", type=int, default=0, help="cached runs: sidecache train --micro-rows"
    )
    p.add_argument(
        "--threads", type=int, default=0,
        help="cached runs: torch threads, as sidecache train --threads (0: its default, half the "
        "cores)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if not args.data or not args.out:
        p.error("--data and --out are required")
    methods = [m.strip().replace(";", ",") for m in args.methods.split(",") if m.strip()]
    report = run_bench(BenchConfig(
        backbone=args.backbone, data=args.data, out=args.out, methods=methods, seeds=args.seeds,
        epochs=args.epochs, batch_size=args.batch_size, limit=args.limit,
        eval_limit=args.eval_limit, eval_split=args.eval_split, max_length=args.max_length,
        dtype=args.dtype, positions=args.positions, chunk_mb=args.chunk_mb,
        device=args.device, ram_budget_mb=args.ram_budget_mb,
        pool_mb=args.pool_mb, low_memory=args.low_memory, threads=args.threads,
        micro_rows=args.micro_rows,
    ))  # fmt: skip
    print(to_markdown(report))
    return 0

"""``sidecache train``: stage two (many side networks from cached hidden states)."""

from __future__ import annotations

import argparse
import json

from pipeline.train import TrainConfig, run_train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sidecache train", description="Train side networks on stores."
    )
    p.add_argument("--train", required=True, help="store of the training split")
    p.add_argument("--eval", required=True, help="store of the evaluation split")
    p.add_argument(
        "--sidenet",
        action="append",
        default=[],
        metavar="SPEC",
        help="KIND[:key=value,...], e.g. read:hidden=128,lr=1e-3; repeat for more",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", required=True, help="one folder per side network goes here")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--ram-budget-mb", type=int, default=4096, help="keep stores this small in RAM")
    p.add_argument(
        "--threads", type=int, default=0, help="PyTorch threads on CPU (0: half the cores)"
    )
    p.add_argument(
        "--pool-mb", type=int, default=512,
        help="the loader's budget for stored rows when streaming (default 512): the round being "
        "shuffled, the next one read ahead, cached chunk edges and leftovers together; a round "
        "holds at most half, so a smaller budget shuffles over fewer chunks at a time (different "
        "batches, in RAM too)",
    )  # fmt: skip
    p.add_argument(
        "--low-memory", action="store_true",
        help="one prefetched batch instead of 4, and (glibc) large buffers returned to the OS "
        "when freed; same batches and results, lower peak RSS, some CPU for page faults",
    )  # fmt: skip
    p.add_argument(
        "--micro-rows", type=int, default=0, metavar="N",
        help="run each batch's forward and backward in groups of whole samples of at most N "
        "stored rows, adding up the gradients: the same step up to float rounding (dropout "
        "masks drawn per group), with activation memory bounded by N rows instead of by the "
        "batch's longest samples. 0 (default): whole batches",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    results = run_train(TrainConfig(
        train=args.train, eval=args.eval, specs=args.sidenet, epochs=args.epochs, out=args.out,
        batch_size=args.batch_size, seed=args.seed, device=args.device,
        ram_budget_mb=args.ram_budget_mb, threads=args.threads, progress=not args.no_progress,
        pool_mb=args.pool_mb, low_memory=args.low_memory, micro_rows=args.micro_rows,
    ))  # fmt: skip
    table = {name: r["eval"]["best"] for name, r in results.items()}
    print(json.dumps(table, indent=2))
    return 0

"""Batch-plan benchmark: the backbone's forward time under the budget-filling cut and under
``--batch-cost`` plans (:func:`pipeline.tokens.plan_batches`).

One process: the backbone is loaded and the data tokenised once (as
:func:`benchmarks.stage_one.prepare` does), then every plan runs forward-only passes
(``make_batch`` + ``hidden_states``, :func:`benchmarks.stage_one.forward_pass`), the plans in
turn and in reverse turn on odd repeats (A B C, C B A, ...), each pass after the machine went
quiet. The table gives per plan: batches, padding share of token slots, the time to plan, the
median forward wall time and its ratio to the budget-filling cut. ``--repeats 0`` only plans
(padding and planning time, no forward passes); ``--window-mb`` sets stage one's sort windows.

Run from the repository root::

    .venv/bin/python -m benchmarks.batch_plan --limit 500 --repeats 3                  # MiniLM
    .venv/bin/python -m benchmarks.batch_plan --bert /tmp/bert768 --limit 500 --repeats 3
    .venv/bin/python -m benchmarks.batch_plan --limit 10000 --repeats 3 --costs 16,64,256
    .venv/bin/python -m benchmarks.batch_plan --limit 67349 --repeats 0 --costs 64 --window-mb 256
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.stage_one import forward_pass, prepare, wait_for_idle, warm_up
from benchmarks.stage_two import build_bert
from pipeline.cache import CacheConfig
from pipeline.tokens import padding_fraction, plan_batches

log = logging.getLogger("benchmarks.batch_plan")
GREEDY = "fill the budget"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--bert", help="instead: a 12-layer 768-wide random BERT, built in this folder "
                   "if absent (benchmarks.stage_two.build_bert)")  # fmt: skip
    p.add_argument("--data", default="glue:../shared/data/glue/SST-2")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=500, help="first N samples")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--window-mb", type=float, default=1024.0, help="stage one's sort windows")
    p.add_argument("--costs", default="16,64,256", help="--batch-cost values to compare")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--idle-wait", type=float, default=60.0, help="s to wait for a quiet machine")
    p.add_argument("--json", help="also write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.bert:
        args.backbone = str(build_bert(Path(args.bert)))
    cfg = CacheConfig(backbone=args.backbone, data=args.data, split=args.split, out="",
                      limit=args.limit, max_length=args.max_length,
                      window_mb=args.window_mb)  # fmt: skip
    prep = prepare(cfg)  # the plan stage one would use, under the default --batch-cost
    lengths = prep.tok.lengths
    costs = [int(c) for c in args.costs.split(",") if c.strip()]
    plans: dict[str, Any] = {}
    plan_s: dict[str, float] = {}
    for name, cost in [(GREEDY, None), *((f"--batch-cost {c}", c) for c in costs)]:
        settings = dataclasses.replace(prep.settings, batch_cost=cost)
        started = time.perf_counter()
        batches = plan_batches(lengths, lengths, settings)
        plan_s[name] = time.perf_counter() - started
        plans[name] = dataclasses.replace(prep, batches=batches)
    if args.repeats > 0:
        warm_up(prep, 4)
    walls: dict[str, list[float]] = {name: [] for name in plans}
    for r in range(args.repeats):
        for name in list(plans) if r % 2 == 0 else list(plans)[::-1]:
            wait_for_idle(args.idle_wait)
            done = forward_pass(plans[name], None)
            walls[name].append(done.wall_s)
            log.info("%s: %.2f s (others %.1f CPU-s)", name, done.wall_s, done.others_cpu_s)
    medians = {name: statistics.median(w) if w else float("nan") for name, w in walls.items()}
    rows = [
        {
            "plan": name,
            "batches": len(p.batches),
            "padding": padding_fraction(p.batches, lengths),
            "plan_s": plan_s[name],
            "wall_s": walls[name],
            "median_wall_s": medians[name],
            "ratio": medians[name] / medians[GREEDY],
        }
        for name, p in plans.items()
    ]
    print(f"{args.backbone} on {args.data} {args.split}, {len(lengths):,} samples, "
          f"{int(lengths.sum()):,} tokens, {args.window_mb:g} MB windows, "
          f"{torch.get_num_threads()} torch threads, {args.repeats} repeats; forward-only wall "
          "time, median")  # fmt: skip
    print("\n| plan | batches | padding | plan s | wall s (median) | ÷ budget-filling |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [
            row["plan"],
            str(row["batches"]),
            f"{100 * row['padding']:.2f}%",
            f"{row['plan_s']:.2f}",
            f"{row['median_wall_s']:.2f}",
            f"{row['ratio']:.3f}",
        ]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where stage one's host time goes on a GPU: the forward arm twice (the first pays for
warm-up), the extraction arm, then a ``cProfile`` of each, top functions by own time.

    python -m benchmarks.stage_one_profile --backbone DIR --data glue:DIR/SST-2 \
        [--limit N] [--device cuda] [--token-budget 0] [--batch-cost auto] [--top 25]

A forward pass that keeps one CPU core busy while the GPU idles is host-bound: the profile
names the Python that does it (batch building, the model's own Python, copies, syncs).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import pipeline  # noqa: F401  (sets the numerics environment before torch computes)
from benchmarks.stage_one import forward_pass, prepare
from pipeline.cache import IN_FLIGHT
from pipeline.extract import in_flight, launch_rows, make_batch
from pipeline.settings import CacheConfig, parse_batch_cost


def extract_pass(prep: object) -> None:
    p = prep  # benchmarks.stage_one.Prepared
    launch = lambda s: launch_rows(p.bb, make_batch(p.tok, s, p.bb.device), p.layers, "all",  # noqa: E731
                                   "bfloat16")  # fmt: skip
    for _ in in_flight(launch, p.batches, IN_FLIGHT):
        pass


def timed(label: str, device: str, work: object) -> float:
    started = time.perf_counter()
    work()  # type: ignore[operator]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    print(f"{label}: {wall:.2f} s")
    return wall


def profiled(label: str, device: str, work: object, top: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    timed(f"{label} (profiled)", device, work)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(out.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--token-budget", type=int, default=0)
    p.add_argument("--batch-cost", type=parse_batch_cost, default="auto")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    cfg = CacheConfig(backbone=args.backbone, data=args.data, split="train", out="/unused",
                      limit=args.limit, device=args.device, token_budget=args.token_budget,
                      batch_cost=args.batch_cost, progress=False)  # fmt: skip
    prep = prepare(cfg)
    print(f"{len(prep.batches)} batches, {prep.n_tokens} tokens, {args.device}")
    for i in range(2):
        timed(f"forward {i + 1}", args.device, lambda: forward_pass(prep, None, 1))
    timed("extract", args.device, lambda: extract_pass(prep))
    profiled("forward", args.device, lambda: forward_pass(prep, None, 1), args.top)
    profiled("extract", args.device, lambda: extract_pass(prep), args.top)


if __name__ == "__main__":
    main()

"""Sweep benchmark: throughput of ``sidecache sweep`` on a 2-worker LocalCluster / sequential.

Stores: MiniLM (``--backbone minilm``, 7 hidden states of 384, bfloat16, all tokens,
``--max-length 64``) over the first ``--limit`` SST-2 train sentences and the first ``--limit``
/ 4 dev sentences (``../shared/data/glue/SST-2``), written once with
:func:`pipeline.cache.run_cache` (a no-op when they are complete).

The sweep: the same ``--epochs`` and six side networks (``SPECS``: linear probe, MLP probe,
READ at two sizes, LST, a second linear probe) on one task and ``--seeds`` seeds, run as

* ``sequential-1t``: :func:`pipeline.sweep.run_sweep` with ``scheduler="sequential"``: every
  (task, seed) pass trains all six networks together in this process, 1 torch thread;
* ``sequential-2t``: the same with 2 torch threads (what one process can get from 2 cores);
* ``local-2w``: ``scheduler="local"``, a fresh LocalCluster of 2 single-threaded worker
  processes, groups chosen by the sweep (startup and teardown of the cluster included).

Arms are interleaved (1t, 2w, 2t, then 2w, 2t, 1t, ...) over ``--repeats`` rounds, each into a
fresh output folder; the machine is shared, so medians are reported, with the load average
before each run. Throughput is network-epochs per second of wall time; CPU-seconds are this
process's for the sequential arms and the sum of the workers' per-unit CPU time for the cluster
(cluster startup CPU not included). Run from the repository root::

    .venv/bin/python -m benchmarks.sweep --work /tmp/bench-sweep --json /tmp/bench-sweep/sweep.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.cache import CacheConfig, run_cache
from pipeline.sweep import SweepConfig, Task, run_sweep

log = logging.getLogger("benchmarks.sweep")
SPECS = [
    "linear",
    "mlp:hidden=128",
    "read:hidden=32",
    "read:hidden=64",
    "lst:r=8",
    "linear:layer=3",
]
GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2"


def make_stores(work: Path, limit: int) -> Task:
    for split, n in (("train", limit), ("dev", max(1, limit // 4))):
        run_cache(CacheConfig(backbone="minilm", data=f"glue:{GLUE}", split=split,
                              out=str(work / split), limit=n, max_length=64, device="cpu",
                              progress=False))  # fmt: skip
    return Task("sst2", str(work / "train"), str(work / "dev"))


def run_arm(arm: str, task: Task, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = work / "runs" / arm
    shutil.rmtree(out, ignore_errors=True)
    scheduler, threads = {"sequential-1t": ("sequential", 1), "sequential-2t": ("sequential", 2),
                          "local-2w": ("local", 1)}[arm]  # fmt: skip
    cfg = SweepConfig(tasks=[task], specs=SPECS, seeds=list(range(args.seeds)),
                      epochs=args.epochs, out=str(out), scheduler=scheduler, workers=2,
                      threads=threads)  # fmt: skip
    load = os.getloadavg()[0]
    before = torch.get_num_threads()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = run_sweep(cfg)
    wall, cpu_here = time.perf_counter() - wall0, time.process_time() - cpu0
    torch.set_num_threads(before)
    if not result.ok:
        raise RuntimeError(f"{arm}: {result.failures}")
    units = {(r["task"], r["seed"], r["worker"], r["unit_cpu_s"]) for r in result.rows}
    cpu = cpu_here if scheduler == "sequential" else sum(u[3] for u in units)
    net_epochs = len(result.rows) * args.epochs
    scores = {f"{r['seed']}/{r['name']}": r["score"] for r in result.rows}
    rec = {"arm": arm, "wall_s": wall, "cpu_s": cpu, "load_before": load, "units": len(units),
           "net_epochs_per_s": net_epochs / wall, "scores": scores}  # fmt: skip
    log.info("%s: %.1f s wall, %.1f CPU-s, %d units, load %.2f", arm, wall, cpu, len(units), load)
    return rec


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for arm in sorted({r["arm"] for r in records}):
        rs = [r for r in records if r["arm"] == arm]
        out[arm] = {
            "runs": len(rs),
            "wall_s_median": statistics.median(r["wall_s"] for r in rs),
            "wall_s_min": min(r["wall_s"] for r in rs),
            "cpu_s_median": statistics.median(r["cpu_s"] for r in rs),
            "net_epochs_per_s_median": statistics.median(r["net_epochs_per_s"] for r in rs),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--work", default="/tmp/bench-sweep")
    p.add_argument("--limit", type=int, default=2000, help="SST-2 train sentences")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    work = Path(args.work)
    task = make_stores(work, args.limit)
    arms = ["sequential-1t", "local-2w", "sequential-2t"]
    records = []
    for i in range(args.repeats):
        order = arms[i % 3 :] + arms[: i % 3]  # rotate, so no arm always runs first
        records += [run_arm(arm, task, work, args) for arm in order]
    summary = summarise(records)
    seq1 = summary["sequential-1t"]["wall_s_median"]
    seq2 = summary["sequential-2t"]["wall_s_median"]
    clus = summary["local-2w"]["wall_s_median"]
    same = all(r["scores"] == records[0]["scores"] for r in records if r["arm"] != "sequential-2t")
    report = {
        "specs": SPECS, "epochs": args.epochs, "seeds": args.seeds, "limit": args.limit,
        "summary": summary, "speedup_vs_sequential_1t": seq1 / clus,
        "speedup_vs_sequential_2t": seq2 / clus, "scores_equal_1t_vs_2w": same,
        "records": records,
    }  # fmt: skip
    print("| arm | runs | median wall s | min wall s | median CPU-s | net-epochs/s |")
    print("|---|---|---|---|---|---|")
    for arm, s in summary.items():
        print(f"| {arm} | {s['runs']:.0f} | {s['wall_s_median']:.1f} | {s['wall_s_min']:.1f} | "
              f"{s['cpu_s_median']:.1f} | {s['net_epochs_per_s_median']:.3f} |")  # fmt: skip
    print(f"\nspeed-up of local-2w: {seq1 / clus:.2f}x vs sequential-1t, "
          f"{seq2 / clus:.2f}x vs sequential-2t; same scores 1t vs 2w: {same}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

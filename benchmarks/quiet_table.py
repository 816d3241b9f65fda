"""One table from ``sidecache bench`` folders, costs taken from the runs of a quiet machine only.

``sidecache bench`` reports the median cost over all runs of a method; when some runs shared the
cores with other work (their ``others_cpu_s`` is recorded), that median mixes contended and quiet
runs. This script keeps every run for the quality columns and, for wall time and CPU-seconds,
only the runs during which other processes used less than ``max(5 s, 10% of the run's wall
time)`` of CPU. Several folders joined with ``+`` form one task (e.g. a re-run of a failed seed).
A folder whose bench was stopped contributes its finished runs
(:func:`benchmarks.methods.load_runs`; their machine load is not known, so they count for quality
only).

    .venv/bin/python -m benchmarks.quiet_table OUT/SST-2+OUT/SST-2-meft0 OUT/CoLA
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.methods import load_runs


def quiet(run: dict[str, Any]) -> bool:
    return bool(run["others_cpu_s"] < max(5.0, 0.1 * run["costs"]["wall_s"]))


def load(run: dict[str, Any]) -> str:
    if math.isnan(run["others_cpu_s"]):
        return "machine load unknown"
    return "quiet" if quiet(run) else "contended"


def table(folders: list[Path]) -> list[str]:
    runs: list[dict[str, Any]] = []
    for folder in folders:
        runs += load_runs(folder)[1]
    idle = min(r["costs"]["peak_rss_bytes"] for r in runs if r["kind"] == "idle")
    cache = next(r for r in runs if r["kind"] == "cache")
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r["kind"] in ("cached", "online") and r.get("returncode", 0) == 0 and "payload" in r:
            by[r["method"]].append(r)
    lines = [
        f"{' + '.join(str(f) for f in folders)}: stage one {cache['costs']['wall_s']:.1f} s wall, "
        f"{cache['costs']['cpu_s']:.1f} CPU-s ({load(cache)})",
        "",
        "| method | seeds | dev score, best epoch (×100, mean ± std) | trainable params | "
        "peak MB above idle (median) | quiet runs | wall s (quiet median) | CPU-s (quiet median) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for method, rs in by.items():
        scores = [100 * r["payload"]["eval"]["best"]["score"] for r in rs]
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        calm = [r for r in rs if quiet(r)]
        wall = statistics.median(r["costs"]["wall_s"] for r in calm) if calm else float("nan")
        cpu = statistics.median(r["costs"]["cpu_s"] for r in calm) if calm else float("nan")
        peak = statistics.median((r["costs"]["peak_rss_bytes"] - idle) / 1e6 for r in rs)
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        lines.append(
            f"| {method} | {seeds} | {statistics.mean(scores):.2f} ± {std:.2f} | "
            f"{rs[0]['payload']['trainable_params']:,} | {peak:,.0f} | {len(calm)} | {wall:.1f} | "
            f"{cpu:.1f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    for task in args:
        print("\n".join(table([Path(f) for f in task.split("+")])) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

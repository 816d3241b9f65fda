"""``sidecache bench``: cached side networks vs online baselines on one task, one table."""

from __future__ import annotations

import argparse

from pipeline.bench import BenchConfig, run_bench, to_markdown
from pipeline.config import add_flags, from_args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecache bench",
        description="Train cached side networks and online baselines on one task; one table of "
        "quality (mean ± std over seeds), trainable parameters, peak memory, wall time, "
        "CPU-seconds, GPU energy and stage-one cost. Every run is a fresh subprocess.",
    )
    add_flags(p, BenchConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    print(to_markdown(run_bench(from_args(BenchConfig, parser().parse_args(argv)))))
    return 0

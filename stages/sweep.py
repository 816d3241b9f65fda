"""``sidecache sweep``: side-network specs x tasks x seeds over a Dask cluster (stage two)."""

from __future__ import annotations

import argparse
import logging

from pipeline.config import add_flags, from_args
from pipeline.sweep import SweepConfig, markdown, run_sweep

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecache sweep",
        description="Train many side networks over a Dask cluster; one table of results.",
    )
    add_flags(p, SweepConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = from_args(SweepConfig, parser().parse_args(argv))
    result = run_sweep(cfg)
    print(markdown(result.rows))
    print(f"\n{len(result.rows)} rows in {result.wall_s:.1f} s; table: {cfg.out}/sweep.csv")
    for failure in result.failures:
        log.error("failed: %s (%s): %s", failure["unit"], ", ".join(failure["names"]),
                  failure["error"])  # fmt: skip
    return 0 if result.ok else 1

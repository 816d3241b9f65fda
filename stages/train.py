"""``sidecache train``: stage two (many side networks from cached hidden states)."""

from __future__ import annotations

import argparse
import json

from pipeline.config import add_flags, from_args
from pipeline.train import TrainConfig, run_train


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecache train", description="Train side networks on stores."
    )
    add_flags(p, TrainConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    results = run_train(from_args(TrainConfig, parser().parse_args(argv)))
    table = {name: r["eval"]["best"] for name, r in results.items()}
    print(json.dumps(table, indent=2))
    return 0

"""Pair-aware pooling on a sentence-pair task: ``pool=pair`` against each kind's own pooling.

MiniLM is a bi-encoder: trained to embed each sentence alone and compare the embeddings. With
``pool=pair`` a side network mean-pools each sentence of the pair on its own (``u``, ``v``) and
its head reads ``[u, v, |u - v|, u * v, cos(u, v)]``; the baseline mean-pools both segments
together. What it measures:

* ``--data`` (default GLUE MRPC), train and dev cached once with MiniLM (every layer and token,
  bfloat16) under ``WORK/stores`` and reused by later runs.
* ``--specs`` (default ``linear mlp read lst``), each as is and with ``pool=pair``; one
  ``sidecache train`` pass per seed (``--seeds``, default 0, 1, 2) trains them all for
  ``--epochs`` (default 10) at their default sizes and learning rates.
* Per spec: dev accuracy and F1, mean ± sample std (ddof 1) over seeds, at the best epoch on dev
  (``eval.best``: the dev set picks the epoch, so optimistic) and after the last epoch
  (``eval.final``); trainable parameters; training + evaluation seconds per epoch.

Run from the repository root (on 2 CPU cores a probe epoch takes seconds, a READ or LST epoch
over MRPC's 195k train tokens one to two minutes)::

    .venv/bin/python -m benchmarks.pair_pool --specs linear mlp --epochs 10
    .venv/bin/python -m benchmarks.pair_pool --specs read lst --epochs 2 --seeds 0

Progress goes to the log (stderr); the markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from stages.cli import main as cli
from storage import open_store

DEFAULT_DATA = "glue:../shared/data/glue/MRPC"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help=f"pair task (default {DEFAULT_DATA})")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", default="0,1,2", help="comma list (default 0,1,2)")
    p.add_argument("--specs", nargs="+", default=["linear", "mlp", "read", "lst"])
    p.add_argument("--work", default="/tmp/pair_pool", help="stores and runs go here")
    p.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: half the cores)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def cache(args: argparse.Namespace, split: str) -> str:
    out = Path(args.work) / "stores" / split
    if not _complete(out):
        argv = ["cache", "--backbone", "minilm", "--data", args.data, "--split", split, "--out",
                str(out), "--device", args.device, "--pairs", "joint", "--no-progress",
                "--overwrite"]  # fmt: skip
        if sidecache(argv) != 0:
            raise SystemExit(f"caching {split} failed")
    return str(out)


def sidecache(argv: list[str]) -> int:
    """``sidecache ARGV`` in this process, its JSON summary sent to stderr with the log."""
    with contextlib.redirect_stdout(sys.stderr):
        return cli(argv)


def _complete(path: Path) -> bool:
    try:
        return bool(open_store(str(path)).complete)
    except (OSError, ValueError):  # absent or unreadable: cache it (again)
        return False


def specs(kinds: list[str]) -> dict[str, str]:
    """``name -> spec``: every kind with its own pooling and with ``pool=pair``."""
    out = {}
    for kind in kinds:
        sep = "," if ":" in kind else ":"
        base = kind.split(":")[0]
        out[base] = f"{kind}{sep}name={base}"
        out[f"{base}-pair"] = f"{kind}{sep}pool=pair,name={base}-pair"
    return out


def train(args: argparse.Namespace, train_store: str, dev_store: str, seed: int,
          named: dict[str, str]) -> Path:  # fmt: skip
    out = Path(args.work) / "runs" / f"seed{seed}"
    argv = ["train", "--train", train_store, "--eval", dev_store, "--epochs", str(args.epochs),
            "--out", str(out), "--seed", str(seed), "--no-progress", "--threads",
            str(args.threads), "--device", args.device]  # fmt: skip
    for spec in named.values():
        argv += ["--sidenet", spec]
    if sidecache(argv) != 0:
        raise SystemExit(f"training seed {seed} failed")
    return out


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def table(runs: list[Path], named: dict[str, str], epochs: int) -> str:
    head = ["spec", "best acc", "best F1", "final acc", "final F1", "params", "s/epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in named:
        got: list[dict[str, Any]] = [
            json.loads((run / name / "metrics.json").read_text()) for run in runs
        ]
        cells = [name]
        for when in ("best", "final"):
            for metric in ("accuracy", "f1"):
                cells.append(mean_std([m["eval"][when][metric] for m in got]))
        cells.append(f"{got[0]['trainable_params']:,}")
        cells.append(f"{statistics.mean(m['wall_time_s'] for m in got) / epochs:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    train_store, dev_store = cache(args, "train"), cache(args, "dev")
    named = specs(args.specs)
    runs = [train(args, train_store, dev_store, int(s), named) for s in args.seeds.split(",")]
    print(f"dev accuracy / F1 (%), mean ± std over seeds {args.seeds}, {args.epochs} epochs, "
          f"{args.data}")  # fmt: skip
    print(table(runs, named, args.epochs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

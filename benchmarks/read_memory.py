"""Where a lean READ run's memory goes: resident memory sampled while it trains.

Two measurements, each in this process, sampling ``/proc/self/status`` on a background thread:

``step``: one float32 READ training step (forward, backward, AdamW) on a fixed batch of
``--samples`` samples of ``--tokens`` tokens each (MiniLM's shape: 7 layers of 384), 1 torch
thread, glibc's mmap threshold fixed as ``--low-memory`` fixes it, so freed buffers leave the
process at once. Reported: the most anonymous memory held above the level between steps, over 5
steps after 3 warm-up steps, next to the batch's own size; then the median time of 40 more
steps. ``--micro-rows N`` runs the step in groups of at most N rows, as ``sidecache train
--micro-rows`` does; ``--default-malloc`` leaves the threshold alone, as without ``--low-memory``.

``replay``: :func:`pipeline.train.run_train` on two stores with ``--ram-budget-mb 0 --pool-mb
POOL --low-memory`` (the bench's lean setup), for ``--epochs`` epochs. Reported per phase (the
setup before the first step, the first step, each epoch's training and evaluation): the peak of
resident memory above the start, split into anonymous and file-backed pages (the libraries'
code that the run touches).

Run from the repository root::

    .venv/bin/python -m benchmarks.read_memory step --tokens 13
    .venv/bin/python -m benchmarks.read_memory replay --train S/train --eval S/dev --epochs 3
    .venv/bin/python -m benchmarks.read_memory replay ... --micro-rows 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import pipeline.train as train_mod
from pipeline.memory import lean_malloc
from pipeline.sidenets import SideBatch, StoreInfo, parse_spec


def status() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process, in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    return out


class Sampler:
    """Samples :func:`status` every ``period`` s; keeps each phase's sample of highest VmRSS."""

    def __init__(self, period: float = 0.002):
        self.phase, self.period = "start", period
        self.peaks: dict[str, dict[str, float]] = {}
        self._run = True
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while self._run:
            now = status()
            if now["VmRSS"] > self.peaks.get(self.phase, {}).get("VmRSS", -1.0):
                self.peaks[self.phase] = now
            time.sleep(self.period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._run = False
        self._thread.join()


def step(args: argparse.Namespace) -> None:
    if not args.default_malloc:
        lean_malloc()
    torch.set_num_threads(1)
    task = {"type": "classification", "num_labels": 2}
    info = StoreInfo(hidden_size=384, layers=tuple(range(7)), positions="all", pooling="mean",
                     num_heads=12, causal=False, task=task)  # fmt: skip
    torch.manual_seed(0)
    lengths = torch.full((args.samples,), args.tokens)
    rows = int(lengths.sum())
    batch = SideBatch(torch.randn(rows, 7, 384), lengths,
                      torch.randint(0, 2, (args.samples,)), torch.arange(args.samples))  # fmt: skip
    cfg = train_mod.TrainConfig(train="", eval="", specs=[], epochs=1, out="/unused",
                                micro_rows=args.micro_rows)  # fmt: skip
    member = train_mod.make_member("m", parse_spec(args.spec), info, 100, cfg, torch.device("cpu"))

    def one() -> None:
        train_mod.train_step(member, batch, info)

    for _ in range(3):
        one()
    base = status()["RssAnon"]
    with Sampler(0.0005) as s:
        s.phase = "steps"
        for _ in range(5):
            one()
    held = s.peaks["steps"]["RssAnon"] - base
    times = []
    for _ in range(40):  # without the sampler's thread
        started = time.perf_counter()
        one()
        times.append(time.perf_counter() - started)
    mb = batch.hidden.numel() * 4 / (1 << 20)
    groups = f", --micro-rows {args.micro_rows}" if args.micro_rows else ""
    groups += ", glibc's default mmap threshold" if args.default_malloc else ""
    print(f"{args.spec}{groups}: {rows} rows ({args.samples} x {args.tokens} tokens), batch "
          f"{mb:.1f} MB; "
          f"a training step holds {held:.1f} MB above the level between steps "
          f"({held / mb:.1f}x the batch); median step {statistics.median(times) * 1e3:.1f} ms "
          "of 40")  # fmt: skip


def replay(args: argparse.Namespace) -> None:
    sampler = Sampler()
    counts = {"step": 0, "eval": 0}

    def wrap(fn: Callable[..., Any], kind: str) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            counts[kind] += 1
            if kind == "step":
                if counts["step"] <= 2:
                    sampler.phase = "first step" if counts["step"] == 1 else "epoch 1 train"
                return fn(*a, **k)
            sampler.phase = f"epoch {counts['eval']} eval"
            out = fn(*a, **k)
            sampler.phase = f"epoch {counts['eval'] + 1} train"
            return out

        return run

    train_mod.train_step = wrap(train_mod.train_step, "step")
    train_mod.evaluate = wrap(train_mod.evaluate, "eval")
    with tempfile.TemporaryDirectory() as out, sampler:
        time.sleep(0.05)
        start = status()
        sampler.phase = "setup"
        train_mod.run_train(train_mod.TrainConfig(
            train=args.train, eval=args.eval, specs=[args.spec], epochs=args.epochs, out=out,
            ram_budget_mb=0, pool_mb=args.pool_mb, low_memory=True, progress=False,
            micro_rows=args.micro_rows,
        ))  # fmt: skip
        sampler.phase = "end"
        time.sleep(0.05)
    print(
        f"{args.spec}, {args.epochs} epochs, --pool-mb {args.pool_mb} --low-memory"
        f"{f' --micro-rows {args.micro_rows}' if args.micro_rows else ''}; "
        f"start {start['VmRSS']:.0f} MB resident"
    )
    print("\n| phase | peak MB above start | anonymous | file-backed |")
    print("|---|---:|---:|---:|")
    for phase, p in sampler.peaks.items():
        if phase in ("start", "end") or phase.startswith(f"epoch {args.epochs + 1} "):
            continue
        cells = [phase, p["VmRSS"] - start["VmRSS"], p["RssAnon"] - start["RssAnon"],
                 p["RssFile"] - start["RssFile"]]  # fmt: skip
        print("| " + " | ".join([str(cells[0]), *(f"{x:.1f}" for x in cells[1:])]) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step", help="one READ training step on a fixed batch")
    s.add_argument("--samples", type=int, default=32)
    s.add_argument("--tokens", type=int, default=13, help="tokens per sample (SST-2 train: 13)")
    s.add_argument("--spec", default="read")
    s.add_argument("--micro-rows", type=int, default=0)
    s.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's mmap threshold alone (as without --low-memory)")  # fmt: skip
    r = sub.add_parser("replay", help="run_train on two stores, lean setup")
    r.add_argument("--train", required=True)
    r.add_argument("--eval", required=True)
    r.add_argument("--spec", default="read:lr=1e-3")
    r.add_argument("--epochs", type=int, default=3)
    r.add_argument("--pool-mb", type=int, default=4)
    r.add_argument("--micro-rows", type=int, default=0)
    args = p.parse_args(argv)
    step(args) if args.what == "step" else replay(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What MKL's strict mode costs and what it buys: forward passes with ``MKL_CBWR`` unset (MKL's
default) and ``AUTO,STRICT`` (what :mod:`pipeline` sets), side by side.

MKL fixes its mode at its first call, so each measurement is a child process started with the
mode in its environment; the modes alternate ABBA over ``--rounds`` rounds so that a drift in
machine speed hits both alike. Each child loads MiniLM, tokenises the first ``--limit`` SST-2
train samples, plans batches exactly as stage one does and then reports:

- the mode MKL actually runs in (:func:`pipeline.backbone.mkl_mode`);
- wall time of the forward passes over the whole plan in 2 streams of one thread each (stage
  one's default) and in 1 stream of two threads (what ``verify``, ``predict`` and online training
  run), as :func:`benchmarks.stage_one.forward_pass` does, after a warm-up;
- how many of ``--check`` batches spread over the plan give different hidden states at one
  thread and at two (any difference breaks ``verify``'s bit-exact comparison of a two-stream
  store);
- how many of 117 small seeded products ``(M x K) @ (K x K)`` (M 1-39, K 32, 64, 384: the
  shapes of the tiny test backbones and of a pooler on a few rows) differ at one thread and two.

With ``--train STORE --eval STORE`` each child also trains ``--sidenets`` (default READ and
LST) for one epoch on those stores (:func:`pipeline.train.run_train` with its default threads:
half the cores), since MKL's mode applies to stage two too.

Run from the repository root::

    .venv/bin/python -m benchmarks.mkl_strict --limit 8000 --rounds 2
    .venv/bin/python -m benchmarks.mkl_strict --limit 8000 --rounds 4 \
        --train stores/bbc-train --eval stores/bbc-dev
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

MODES = {"default": "", "strict": "AUTO,STRICT"}  # "" leaves MKL in its own default mode


def child(limit: int, check: int, train: list[str] | None, sidenets: list[str]) -> dict[str, Any]:
    import tempfile
    import time

    import numpy as np
    import torch

    from benchmarks.stage_one import SST2, forward_pass, prepare, warm_up
    from pipeline.backbone import cpu_numerics, hidden_states
    from pipeline.cache import CacheConfig
    from pipeline.extract import make_batch

    prep = prepare(CacheConfig(backbone="minilm", data=SST2, split="train", out="", limit=limit,
                               device="cpu"))  # fmt: skip
    warm_up(prep, 8)
    out: dict[str, Any] = {"numerics": cpu_numerics(), "threads": torch.get_num_threads()}
    for streams in (2, 1):
        out[f"streams{streams}_s"] = forward_pass(prep, None, streams).wall_s
    before, differing = torch.get_num_threads(), 0
    picks = np.unique(np.linspace(0, len(prep.batches) - 1, num=check).astype(int))
    for i in picks:
        batch = make_batch(prep.tok, np.sort(prep.batches[i]), prep.bb.device)
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(hidden_states(prep.bb, batch.input_ids, batch.attention_mask,
                                      batch.token_type_ids, prep.layers))  # fmt: skip
        differing += any(not torch.equal(runs[0][k], runs[1][k]) for k in prep.layers)
    out["checked"], out["differing"] = len(picks), differing
    gen, small = torch.Generator().manual_seed(0), []
    for m in range(1, 40):
        for k in (32, 64, 384):
            a, w = torch.randn(m, k, generator=gen), torch.randn(k, k, generator=gen)
            products = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                products.append(a @ w)
            small.append(not torch.equal(*products))
    torch.set_num_threads(before)
    out["small_shapes"], out["small_differing"] = len(small), sum(small)
    if train:
        from pipeline.train import TrainConfig, run_train

        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            run_train(TrainConfig(train=train[0], eval=train[1], specs=sidenets, epochs=1,
                                  out=folder, device="cpu", progress=False))  # fmt: skip
            out["train_s"] = time.perf_counter() - started
    return out


def run_child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, MKL_CBWR=MODES[mode])
    cmd = [sys.executable, "-m", "benchmarks.mkl_strict", "--child", "--limit", str(args.limit),
           "--check", str(args.check)]  # fmt: skip
    if args.train:
        cmd += ["--train", args.train, "--eval", args.eval]
        cmd += [x for name in args.sidenets for x in ("--sidenet", name)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child for mode {mode} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), mode=mode)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mkl_strict", description=__doc__)
    p.add_argument("--limit", type=int, default=8000, help="first N SST-2 train samples")
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds (2 children per round)")
    p.add_argument("--check", type=int, default=40, help="batches compared at 1 and 2 threads")
    p.add_argument("--json", default=None, help="write every child's figures here")
    p.add_argument("--train", default=None, help="also train on this store (stage two)")
    p.add_argument("--eval", default=None, help="the dev store for --train")
    p.add_argument("--sidenet", dest="sidenets", action="append", default=None,
                   help="spec for --train (repeatable; default read and lst)")  # fmt: skip
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sidenets = args.sidenets or ["read", "lst"]
    if bool(args.train) != bool(args.eval):
        p.error("--train and --eval go together")
    if args.child:
        stores = [args.train, args.eval] if args.train else None
        print(json.dumps(child(args.limit, args.check, stores, args.sidenets)))
        return 0
    results = []
    for r in range(args.rounds):
        for mode in ("default", "strict") if r % 2 == 0 else ("strict", "default"):
            results.append(run_child(mode, args))
            print(f"round {r + 1} {mode}: {json.dumps(results[-1])}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in results if x["mode"] == mode)

    print(f"MiniLM forward passes over the first {args.limit} SST-2 train samples, "
          f"{args.rounds} children per mode, ABBA\n")  # fmt: skip
    print(
        "| MKL_CBWR | MKL mode | 2 streams x 1 thread, median s | 1 stream x 2 threads, "
        "median s | batches differing at 1 vs 2 threads | small products differing |"
    )
    print("|---|---|---|---|---|---|")
    for mode, value in MODES.items():
        rows = [x for x in results if x["mode"] == mode]
        seen = sorted({str(x["numerics"]["mkl"]) for x in rows})
        diff = ", ".join(f"{x['differing']}/{x['checked']}" for x in rows)
        small = ", ".join(f"{x['small_differing']}/{x['small_shapes']}" for x in rows)
        label = value or "'' (MKL's default)"
        print(f"| {label} | {', '.join(seen)} | {med(mode, 'streams2_s'):.2f} | "
              f"{med(mode, 'streams1_s'):.2f} | {diff} | {small} |")  # fmt: skip
    keys = [("streams2_s", "2 streams"), ("streams1_s", "1 stream")]
    if args.train:
        keys.append(("train_s", f"stage two ({', '.join(args.sidenets)}, 1 epoch)"))
        print(f"\nstage two, median s: default {med('default', 'train_s'):.2f}, "
              f"strict {med('strict', 'train_s'):.2f}")  # fmt: skip
    for key, label in keys:
        print(f"\nstrict / default, {label}: {med('strict', key) / med('default', key):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where stage one's time over forward-only goes: the same batches with parts of the work removed.

Arms, interleaved in ABBA order in one process (inputs prepared once, as in
:mod:`benchmarks.stage_one`):

* ``fwd`` — forward-only (``make_batch`` + ``hidden_states``), the baseline;
* ``extract`` — plus everything stage one does on the backbone's side for every batch
  (:func:`pipeline.extract.extract_rows`: gather, row statistics, finiteness, cast, copy off the
  device), nothing written;
* ``nowrite`` — the unmodified ``run_cache`` with :meth:`storage.shardfile.ShardFile.write`
  replaced by a no-op: the writer's scatter into shard buffers, its threads and bookkeeping, no
  compression and no file;
* ``stage`` — the unmodified ``run_cache``;
* ``none`` — ``run_cache`` with ``--codec none`` (files written uncompressed);
* ``buffered`` — ``run_cache`` with shard files written through the page cache instead of with
  ``O_DIRECT`` (``storage.shardfile.DIRECT_WRITES`` off);
* ``hugepages`` — ``run_cache`` with the writer's shard buffers from ``np.empty`` (numpy asks
  for transparent huge pages) instead of :func:`storage.writer.small_pages`;
* ``shallow`` — ``run_cache`` with the streams at most one batch ahead of the writer
  (``pipeline.cache.AHEAD_SHARE`` 0) instead of an eighth of a window;
* ``halfwindow`` — ``run_cache`` with sort windows of half ``--window-mb`` (half the shard
  buffers; its own batch plan, with a little more padding than the other arms').

A stage-one pass right after a forward-only pass is ~1.5 s slower on 20k sentences than one
right after another stage pass (likely: its shard buffers come from fresh memory, as the last
stage pass's has been handed back to the VM's host meanwhile): compare stage-type arms by
passes that follow the same kind of pass, or pass ``--fwd-between``, which runs a ``fwd`` pass
before every pass of another arm. The ``buffered`` arm has shown no gain from ``O_DIRECT``
even so (20k: ``stage`` 25.01 s after ``buffered``, ``buffered`` 24.80 and 24.96 s;
``stage`` took 25.82 s after ``fwd``); each pass there deletes the last pass's store first, and
the freed page cache may make buffered writes cheap, a guess not checked.

Every arm runs the backbone in ``--streams`` streams (``pipeline.extract.in_streams``), as stage
one does.

So ``extract - fwd`` is the device-side work, ``nowrite - extract`` the writer's buffers and
threads, ``stage - nowrite`` compression and file writes.

    .venv/bin/python -m benchmarks.stage_one_ablation --limit 40000 --repeats 2
    .venv/bin/python -m benchmarks.stage_one_ablation --limit 0 --arms fwd,extract,stage
    .venv/bin/python -m benchmarks.stage_one_ablation --limit 0 --arms shallow --trace --repeats 1
    .venv/bin/python -m benchmarks.stage_one_ablation --limit 20000 --window-mb 1024 \
        --arms fwd,stage,halfwindow --repeats 4        # 1 GB against 512 MB windows

``--trace`` samples the process's CPU every 0.1 s during each pass and logs the stretches below
1.6 busy cores with their idle core-seconds: where the cores wait (start, window ends, the end).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

import pipeline.cache as cache_mod
from benchmarks.stage_one import (
    SST2,
    Pass,
    clock,
    forward_pass,
    prepare,
    process_cpu,
    stage_pass,
    wait_for_idle,
    warm_up,
)
from pipeline.cache import CacheConfig
from pipeline.extract import extract_rows, in_streams, make_batch
from storage import shardfile
from storage import writer as writer_mod
from storage.shardfile import ShardFile

log = logging.getLogger("benchmarks.stage_one_ablation")
ARMS = ("fwd", "extract", "nowrite", "stage", "none", "buffered", "hugepages", "shallow",
        "halfwindow")  # fmt: skip
KEYS = ("wall_s", "cpu_s", "sys_cpu_s", "minor_faults")


def run_arm(arm: str, cfg: CacheConfig, prep: Any, out: Path) -> dict[str, float]:
    if arm == "fwd":
        p: Pass = forward_pass(prep, None, cfg.streams)
        return {k: getattr(p, k) for k in KEYS}
    if arm == "extract":

        def rows(samples: Any) -> Any:
            batch = make_batch(prep.tok, np.sort(samples), prep.bb.device)  # as stage one
            return extract_rows(prep.bb, batch, prep.layers, "all", cfg.dtype)

        record: dict[str, float] = {}
        with clock(record):
            for _ in in_streams(rows, prep.batches, cfg.streams):
                pass
        return record
    run_cfg = replace(cfg, codec="none") if arm == "none" else cfg
    if arm == "halfwindow":
        run_cfg = replace(cfg, window_mb=cfg.window_mb / 2)
    patch: Any = contextlib.nullcontext()
    if arm == "nowrite":
        patch = mock.patch.object(ShardFile, "write", lambda *_a, **_k: None)
    if arm == "buffered":
        patch = mock.patch.object(shardfile, "DIRECT_WRITES", False)
    if arm == "hugepages":
        patch = mock.patch.object(writer_mod, "small_pages", np.empty)
    if arm == "shallow":
        patch = mock.patch.object(cache_mod, "AHEAD_SHARE", 0)
    with patch:
        p, _ = stage_pass(run_cfg, prep, out, None, [])
    return {k: getattr(p, k) for k in KEYS}


@contextlib.contextmanager
def idle_spans(spans: list[tuple[float, float, float]], busy: float = 1.6) -> Iterator[None]:
    """Sample the process's CPU time every 0.1 s during the block; then fill ``spans`` with
    ``(start s, end s, idle core-s)`` of every stretch below ``busy`` cores (``--trace``)."""
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), process_cpu()))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
    cores = os.cpu_count() or 1
    t0 = samples[0][0] if samples else 0.0
    for (ta, ca), (tb, cb) in itertools.pairwise(samples):
        if (cb - ca) / (tb - ta) >= busy:
            continue
        idle = cores * (tb - ta) - (cb - ca)
        if spans and abs(spans[-1][1] - (ta - t0)) < 1e-9:  # extends the last stretch
            spans[-1] = (spans[-1][0], tb - t0, spans[-1][2] + idle)
        else:
            spans.append((ta - t0, tb - t0, idle))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=SST2)
    ap.add_argument("--limit", type=int, default=40000, help="first N samples; 0: all")
    ap.add_argument("--streams", type=int, default=CacheConfig.streams, help="CacheConfig")
    ap.add_argument("--window-mb", type=float, default=CacheConfig.window_mb, help="CacheConfig")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    ap.add_argument(
        "--fwd-between", action="store_true", help="a fwd pass before every other arm's pass"
    )
    ap.add_argument(
        "--trace", action="store_true", help="log the stretches of each pass below 1.6 cores"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        ap.error(f"unknown arms {unknown}; expected some of {', '.join(ARMS)}")
    with tempfile.TemporaryDirectory(prefix="stage-one-ablation-") as tmp:
        out = Path(tmp) / "store"
        cfg = CacheConfig(
            backbone="minilm", data=args.data, split="train", out=str(out),
            limit=args.limit or None, streams=args.streams, window_mb=args.window_mb,
            progress=False,
        )  # fmt: skip
        prep = prepare(cfg)
        warm_up(prep, 8)
        runs: dict[str, list[dict[str, float]]] = {a: [] for a in arms}
        if args.fwd_between:
            arms = [a for a in arms if a != "fwd"]
            runs["fwd"] = runs.get("fwd", [])
        for r in range(args.repeats):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                for one in ("fwd", arm) if args.fwd_between else (arm,):
                    wait_for_idle(30)
                    shutil.rmtree(out, ignore_errors=True)  # the last pass's store, not traced
                    spans: list[tuple[float, float, float]] = []
                    with idle_spans(spans) if args.trace else contextlib.nullcontext():
                        runs[one].append(run_arm(one, cfg, prep, out))
                    log.info("%-9s %s", one, {k: round(v, 2) for k, v in runs[one][-1].items()})
                    for a, b, idle in spans if args.trace else []:
                        log.info("  below 1.6 cores %6.1f-%6.1f s: %.2f idle core-s", a, b, idle)
    base = statistics.median(x["wall_s"] for x in runs.get("fwd", [{"wall_s": float("nan")}]))
    print(f"{prep.n_tokens:,} tokens, {len(prep.batches)} batches, medians of {args.repeats}\n")
    print("| arm | wall s | ÷ forward-only | process CPU s | idle core-s | of it kernel s | "
          "minor faults |\n|---|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    cores = os.cpu_count() or 1
    for arm, xs in runs.items():
        wall, cpu, kernel, faults = (statistics.median(x[k] for x in xs) for k in KEYS)
        idle = statistics.median(cores * x["wall_s"] - x["cpu_s"] for x in xs)  # incl. others'
        print(f"| {arm} | {wall:.1f} | {wall / base:.3f} | {cpu:.1f} | {idle:.1f} | "
              f"{kernel:.1f} | {faults:,.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The writer's shard buffers: ``np.empty`` (huge pages) vs :func:`storage.writer.small_pages`.

Stage one holds one sort window of shard buffers (512 MB by default; this script's
``--window-mb`` defaults to 1 GB, the window of its table in BENCHMARKS.md) and fills them in
:meth:`storage.StoreWriter.put`: each batch's rows, in store order, assigned by index into every
shard of the window (a length-sorted window's batch has samples all over it). This script feeds
the real writer one window's worth of such batches, its buffers allocated either way, each pass
in a fresh subprocess (fresh memory, as in a real run), the arms alternating A B B A ... in one
run.

    .venv/bin/python -m benchmarks.shard_buffers [--repeats 3] [--window-mb 1024]

Reports medians of wall time, system time and minor page faults per arm, and their ratio.
This isolates the allocation; what it is worth inside stage one (where the huge pages' fault
storm stops the main thread and, soon after, the backbone's streams) is the ``hugepages`` arm of
``benchmarks.stage_one_ablation``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

import numpy as np

ARMS = ("np.empty", "small_pages")
HIDDEN, LAYERS, SAMPLE_ROWS, BATCH_SAMPLES = 384, 7, 13, 180  # MiniLM on SST-2, roughly
SHARD_ROWS = 32768  # stage one's shard for MiniLM in bfloat16 (4 MB chunks x 8)


def fill(arm: str, window_mb: float) -> dict[str, float]:
    """One pass in this process: a real store of one window, every row handed to the real
    :meth:`StoreWriter.put` in batches of random samples in store order. Shard files are not
    written (``ShardFile.write`` is a no-op), so only the buffers and the scatter are timed."""
    from storage import BatchRows, Layout, create_store
    from storage import writer as writer_mod
    from storage.shardfile import ShardFile

    shards = max(1, int(window_mb * (1 << 20)) // (SHARD_ROWS * HIDDEN * 2 * LAYERS))
    n = shards * SHARD_ROWS // SAMPLE_ROWS
    offsets = np.arange(n + 1, dtype=np.int64) * SAMPLE_ROWS
    rows = int(offsets[-1])
    layout = Layout(n, rows, rows, list(range(LAYERS)), HIDDEN, "all", "bfloat16",
                    chunk_rows=SHARD_ROWS // 8, shard_rows=SHARD_ROWS)  # fmt: skip
    arrays = {"offsets": offsets, "token_offsets": offsets,
              "token_ids": np.zeros(rows, np.int32), "labels": np.zeros(n, np.int64)}  # fmt: skip
    arrival = np.random.default_rng(0).permutation(n)  # a length-sorted window's samples
    source = np.ones((BATCH_SAMPLES * SAMPLE_ROWS, HIDDEN), np.uint16)
    stats = np.zeros((len(source), LAYERS, 4), np.float32)
    alloc = np.empty if arm == "np.empty" else writer_mod.small_pages
    with (
        tempfile.TemporaryDirectory(prefix="shard-buffers-") as tmp,
        mock.patch.object(writer_mod, "small_pages", alloc),
        mock.patch.object(ShardFile, "write", lambda *_a, **_k: None),
    ):
        writer = create_store(f"{tmp}/store", layout, {}, {}, arrays)
        assert writer is not None
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for first in range(0, n, BATCH_SAMPLES):
            samples = np.sort(
                arrival[first : first + BATCH_SAMPLES]
            )  # in store order, as stage one
            r = len(samples) * SAMPLE_ROWS
            counts = np.full(len(samples), SAMPLE_ROWS, np.int64)
            writer.put(BatchRows(samples, counts, [source[:r]] * LAYERS, None, stats[:r]))
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        writer.finish()
    return {
        "wall_s": wall,
        "sys_s": after.ru_stime - before.ru_stime,
        "faults": after.ru_minflt - before.ru_minflt,
        "mb": rows * HIDDEN * 2 * LAYERS / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="passes per arm (default 3)")
    p.add_argument("--window-mb", type=float, default=1024.0, help="window of buffers, MB")
    p.add_argument("--one", choices=ARMS, help=argparse.SUPPRESS)  # a single pass (internal)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(fill(args.one, args.window_mb)))
        return 0
    order = [ARMS[(i // 2 + i) % 2] for i in range(2 * args.repeats)]  # A B B A A B ...
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for arm in order:
        cmd = [sys.executable, "-m", "benchmarks.shard_buffers", "--one", arm,
               "--window-mb", str(args.window_mb)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[arm].append(json.loads(out))
        print(f"{arm}: {results[arm][-1]}", file=sys.stderr)
    mb = results[ARMS[0]][0]["mb"]
    print(f"one window of fresh shard buffers ({mb:,.0f} MB), filled batch by batch through "
          f"StoreWriter.put; medians of {args.repeats} fresh processes per arm\n")  # fmt: skip
    print("| buffers | wall s | system s | minor faults |")
    print("|---|---|---|---|")
    med = {}
    for arm in ARMS:
        med[arm] = {k: statistics.median(r[k] for r in results[arm]) for k in results[arm][0]}
        m = med[arm]
        print(f"| {arm} | {m['wall_s']:.2f} | {m['sys_s']:.2f} | {m['faults']:,.0f} |")
    print(f"\nnp.empty ÷ small_pages, wall: {med[ARMS[0]]['wall_s'] / med[ARMS[1]]['wall_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

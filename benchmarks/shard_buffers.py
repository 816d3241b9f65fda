"""The writer's shard buffers: ``np.empty`` (huge pages) vs :func:`storage.writer.small_pages`.

Stage one holds one sort window of shard buffers (1 GB by default) and fills them the way
:meth:`storage.StoreWriter.put` does: each batch's rows, in store order, assigned by index into
every shard of the window (a length-sorted window's batch has samples all over it). This script
times that filling for one window's worth of fresh buffers allocated either way, each pass in a
fresh subprocess (fresh memory, as in a real run), the arms alternating A B B A ... in one run.

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
import time

import numpy as np

ARMS = ("np.empty", "small_pages")
SHARD_ROWS, HIDDEN, LAYERS, BATCH_ROWS = 32768, 384, 7, 2300  # MiniLM's full-SST-2 layout


def fill(arm: str, window_mb: float) -> dict[str, float]:
    """One pass in this process: allocate a window of shard buffers, fill every row once."""
    from storage.writer import small_pages

    alloc = np.empty if arm == "np.empty" else small_pages
    shard_bytes = SHARD_ROWS * HIDDEN * 2 * LAYERS
    shards = max(1, int(window_mb * (1 << 20)) // shard_bytes)
    total = shards * SHARD_ROWS
    arrival = np.random.default_rng(0).permutation(total)  # destination rows, batch by batch
    source = np.ones((BATCH_ROWS, HIDDEN), np.uint16)
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    buffers = [[alloc((SHARD_ROWS, HIDDEN), np.uint16) for _ in range(LAYERS)]
               for _ in range(shards)]  # fmt: skip
    for first in range(0, total, BATCH_ROWS):
        dest = np.sort(arrival[first : first + BATCH_ROWS])  # (R,) in store order, as put
        shard_of = dest // SHARD_ROWS
        ids, firsts = np.unique(shard_of, return_index=True)
        bounds = [*firsts.tolist(), len(dest)]
        for k, shard in enumerate(ids.tolist()):
            pos = dest[bounds[k] : bounds[k + 1]] - shard * SHARD_ROWS
            for layer in buffers[shard]:
                layer[pos] = source[bounds[k] : bounds[k + 1]]
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall_s": wall,
        "sys_s": after.ru_stime - before.ru_stime,
        "faults": after.ru_minflt - before.ru_minflt,
        "mb": total * HIDDEN * 2 * LAYERS / 1e6,
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
    print(f"one window of fresh shard buffers ({mb:,.0f} MB), filled batch by batch as "
          f"StoreWriter.put does; medians of {args.repeats} fresh processes per arm\n")  # fmt: skip
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

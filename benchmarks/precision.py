"""Side networks in float32 vs ``precision=bfloat16``: CPU time per training step, side by side.

Both arms train the same network (same seed, same initial weights) on the same batches of a real
store: MiniLM's states of the first ``--limit`` SST-2 training sentences (bfloat16, every layer
and token, as ``sidecache cache`` writes them; created when missing), batch 32 in the training
loader's order. Each step is :func:`pipeline.train.train_step` (forward, loss, backward, stage
two's AdamW, schedule), i.e. what ``sidecache train`` runs per batch, with torch threads as
``sidecache train`` sets them on CPU (:func:`pipeline.train.cpu_threads`: 1 on 2 cores). Batches
are decoded once before timing, so only the network's own arithmetic is measured.

Per kind, the arms alternate in ABBA order over ``--repeats`` rounds of ``--steps`` steps each;
the figure is the median CPU-ms per step (``time.process_time``) and the ratio of the medians.
Whether the CPU has bfloat16 matrix units (AMX / AVX-512 BF16) is printed with the table.

``--shapes`` measures what the row padding of :mod:`pipeline.sidenets.precision` is for: READ
trained once over every batch of the epoch (each batch has its own row count) in a fresh
subprocess per arm, so oneDNN's kernel cache starts empty: float32, bfloat16 as stage two runs
it (rows padded to :func:`pipeline.sidenets.precision.bucket`), and bfloat16 with the padding
switched off. Per arm: distinct row counts the network saw, CPU-ms per step, and how much the
resident set grew over the pass (``VmRSS`` after minus before, batches already decoded).

    .venv/bin/python -m benchmarks.precision --repeats 3
    .venv/bin/python -m benchmarks.precision --shapes --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.stage_one import SST2
from benchmarks.stage_two import ensure_store
from pipeline.loader import StoreLoader
from pipeline.memory import cpu_threads
from pipeline.sidenets import SideBatch, StoreInfo, parse_spec
from pipeline.sidenets import precision as lowp
from pipeline.train import TrainConfig, make_member, train_step
from storage import open_store

log = logging.getLogger("benchmarks.precision")
KINDS = ("read", "lst", "mlp", "linear")


def arm_ms(spec: str, info: StoreInfo, batches: list, steps: int) -> float:
    """CPU-ms per step of one fresh network trained for ``steps`` batches."""
    cfg = TrainConfig(train="", eval="", specs=[], epochs=1, out="/unused")
    member = make_member("m", parse_spec(spec), info, steps, cfg, torch.device("cpu"))
    for batch in batches[:3]:  # warm-up: first-call allocations and kernel selection
        train_step(member, batch, info)
    started = time.process_time()
    for batch in itertools.islice(itertools.cycle(batches), steps):
        train_step(member, batch, info)
    return 1e3 * (time.process_time() - started) / steps


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def shapes_child(store: Path, arm: str) -> dict[str, float]:
    """One pass of READ over every batch of the store (``arm``: float32, bfloat16, unpadded)."""
    torch.set_num_threads(cpu_threads(0))
    reader = open_store(store)
    info = StoreInfo.from_meta(reader.meta)
    batches = list(StoreLoader(reader, 32, shuffle=True, seed=0, ram_budget=1 << 40).epoch(0))
    seen: set[int] = set()
    real = lowp.padded

    def padded(batch: SideBatch) -> SideBatch:
        out = batch if arm == "unpadded" else real(batch)
        seen.add(int(out.hidden.shape[0]))
        return out

    lowp.padded = padded  # Autocast.forward looks it up at call time
    spec = "read:precision=" + ("float32" if arm == "float32" else "bfloat16")
    cfg = TrainConfig(train="", eval="", specs=[], epochs=1, out="/unused")
    member = make_member("m", parse_spec(spec), info, len(batches), cfg, torch.device("cpu"))
    before, started = rss_mb(), time.process_time()
    for batch in batches:
        train_step(member, batch, info)
    ms = 1e3 * (time.process_time() - started) / len(batches)
    rows = {int(b.hidden.shape[0]) for b in batches}
    return {"ms": ms, "grew_mb": rss_mb() - before, "shapes": len(seen) if seen else len(rows)}


def shapes(store: Path, repeats: int) -> None:
    arms = ("float32", "bfloat16", "unpadded")
    got: dict[str, list[dict[str, float]]] = {a: [] for a in arms}
    for r in range(repeats):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.precision", "--child", arm, str(store)],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            got[arm].append(json.loads(out.strip().splitlines()[-1]))
            log.info("%s round %d: %s", arm, r + 1, got[arm][-1])
    print(
        "| READ, one pass over the epoch's batches | row counts seen | CPU-ms/step "
        "| RSS growth MB |"
    )
    print("|---|---:|---:|---:|")
    names = {"float32": "float32", "bfloat16": "bfloat16 (rows padded to a bucket)",
             "unpadded": "bfloat16, padding off"}  # fmt: skip
    for arm in arms:
        med = {k: statistics.median(x[k] for x in got[arm]) for k in ("ms", "grew_mb", "shapes")}
        print(f"| {names[arm]} | {med['shapes']:.0f} | {med['ms']:.2f} | {med['grew_mb']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-precision"))
    ap.add_argument("--limit", type=int, default=2000, help="SST-2 training sentences stored")
    ap.add_argument("--steps", type=int, default=60, help="training steps per arm and round")
    ap.add_argument("--repeats", type=int, default=3, help="ABBA rounds")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--shapes", action="store_true", help="padded vs unpadded bfloat16 READ")
    ap.add_argument("--child", nargs=2, metavar=("ARM", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(shapes_child(Path(args.child[1]), args.child[0])))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(cpu_threads(0))
    store = ensure_store("minilm", SST2, "train", args.work / "train", args.limit)
    if args.shapes:
        shapes(store, args.repeats)
        return 0
    reader = open_store(store)
    info = StoreInfo.from_meta(reader.meta)
    loader = StoreLoader(reader, 32, shuffle=True, seed=0, ram_budget=1 << 40)
    batches = list(loader.epoch(0))
    rows = statistics.median(int(b.lengths.sum()) for b in batches)
    print(f"store {store}: {len(batches)} batches of 32 (median {rows:.0f} rows), "
          f"{torch.get_num_threads()} torch thread(s), bfloat16 matrix units: "
          f"{lowp.native_bf16('cpu')}\n")  # fmt: skip
    print("| side network | float32 CPU-ms/step | bfloat16 CPU-ms/step | bfloat16 ÷ float32 |")
    print("|---|---:|---:|---:|")
    for kind in args.kinds.split(","):
        times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        for r in range(args.repeats):
            order = ("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32")
            for precision in order:
                times[precision].append(
                    arm_ms(f"{kind}:precision={precision}", info, batches, args.steps)
                )
            log.info("%s round %d: %s", kind, r + 1, {k: round(v[-1], 2) for k, v in times.items()})
        f32, b16 = statistics.median(times["float32"]), statistics.median(times["bfloat16"])
        print(f"| {kind} | {f32:.2f} | {b16:.2f} | {b16 / f32:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

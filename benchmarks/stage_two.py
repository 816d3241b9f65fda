"""Stage-two benchmark: streaming cost, K-per-pass cost and peak memory of training side networks.

What it measures on this machine (MiniLM over SST-2 by default; the training store is the first
``--limit`` = 10,000 samples of SST-2 train, the eval store is SST-2 dev in full, both bfloat16,
every layer and token, ``--max-length 128``):

(a) **Streaming vs in-RAM throughput.** Two :class:`pipeline.loader.StoreLoader` over the same
    training store, ``ram_budget=0`` (streaming: every epoch decompresses chunks off the Zarr
    store on the loader's background thread) and ``ram_budget`` = 1 TiB (``in_ram``: the stored
    rows are read once, kept in RAM, served in the same order). Each arm trains its own READ
    (default sizes, same seed, batch 32) with :func:`pipeline.train.train_step`, so both arms see
    identical batches and do identical arithmetic. Arms alternate per epoch (S R, R S, ...),
    ``--epochs-a`` epochs each, torch intra-op threads as ``run_train`` sets them on CPU
    (:func:`pipeline.train.cpu_threads`); the figure is median(streaming samples/s) / median(in-RAM
    samples/s). A loader-only pass (no training) per arm is also timed, to show the raw read speed.
    The store files are in the page cache (just written or read), so "streaming" measures
    decompression and decoding, not disk reads.
(b) **K side networks in one pass.** :func:`pipeline.train.run_train` (``progress=False``, the
    default 4096 MB RAM budget, fresh output folders, ``--epochs-b`` epochs, evaluation included)
    on the ``--mem-limit`` (2,000-sample) store, with K = 8 (read, lst, linear, mlp, each with
    seeds 1 and 2) vs K = 1 (``read`` seed 1), in ABBA order over ``--repeats-b`` repeats; plus
    K = 8 READ-sized networks (read, seeds 1..8) and each of the other 7 networks alone, so the sum
    of 8 separate K = 1 runs can be compared with the one K = 8 pass. Every network's own compute
    time (``wall_time_s``: its training steps and evaluation forwards) gives the breakdown:
    loading and bookkeeping = pass wall time minus the networks' own compute.
(c) **Peak memory.** Each run in a fresh subprocess: the idle baseline is ``python -c "import
    torch"`` (its peak RSS, ``VmHWM``); a training child runs :func:`pipeline.train.run_train` for 1
    epoch with ``read`` and ``linear``, batch 32, streaming (``ram_budget_mb=0``) with the default
    loader budget (``pool_mb`` 512), the same with ``low_memory``, streaming with ``pool_mb`` =
    ``--pool-small`` (64), or in RAM (budget 1 TiB), and reports its ``VmHWM`` and the most stored
    bytes its loaders held (``held_peak``, from the ``loader_memory`` run_train returns); the
    parent also polls the child's RSS with psutil as a cross-check. Each row is the median of
    ``--repeats-c`` children (the peak varies with thread timing and what the allocator keeps).
    Stores: MiniLM (6 layers, 384 wide) and a 12-layer 768-wide BERT built from
    ``transformers.BertConfig`` with random weights (saved with ``save_pretrained`` next to the
    MiniLM tokenizer), each on 2,000 and on 10,000 SST-2 train samples (``--mem-limit``,
    ``--limit``) with its own SST-2 dev store.

Before each timed part it waits (polling every 30 s, at most 15 min) until no
``benchmarks.stage_one`` process runs, logs ``ps aux --sort=-%cpu | head`` and records the load
average. Stores are created with :func:`pipeline.cache.run_cache` when missing (a no-op when a
complete identical store is there).

Run from the repository root::

    .venv/bin/python -m benchmarks.stage_two --work /tmp/bench2 --json /tmp/bench2/stage_two.json
    .venv/bin/python -m benchmarks.stage_two --parts c   # just the memory part

Progress goes to the log (stderr); the markdown tables go to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from pipeline.cache import CacheConfig, run_cache
from pipeline.errors import SidecacheError
from pipeline.loader import StoreLoader
from pipeline.memory import cpu_threads
from pipeline.sidenets import StoreInfo, parse_spec
from pipeline.train import TrainConfig, make_member, run_train, train_step
from storage import open_store

log = logging.getLogger("benchmarks.stage_two")
REPO = Path(__file__).resolve().parent.parent
GLUE = "/work/shared/data/glue"
HUGE = 1 << 40  # a RAM budget every store fits
KINDS = ("read", "lst", "linear", "mlp")

# Peak RSS is VmHWM of /proc/self/status: the high-water mark of this process image. (ru_maxrss
# is no good here: Linux carries the forked copy of the parent's peak across exec.)
HWM = """
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""

BASELINE_CHILD = (
    HWM
    + """
import json
import torch
print(json.dumps({"maxrss_kb": hwm(), "threads": torch.get_num_threads()}))
"""
)

TRAIN_CHILD = (
    HWM
    + """
import json, sys, time
import torch
imported_torch = hwm()
from pipeline.train import TrainConfig, run_train
imported_all = hwm()
started = time.perf_counter()
out = run_train(TrainConfig(**json.loads(sys.argv[1])))
print(json.dumps({
    "loaders": next(iter(out.values()))["loader_memory"],
    "maxrss_kb": hwm(),
    "after_torch_kb": imported_torch,
    "after_imports_kb": imported_all,
    "seconds": time.perf_counter() - started,
    "params": {k: v["trainable_params"] for k, v in out.items()},
    "has_transformers": "transformers" in sys.modules,
}))
"""
)


# -- environment ---------------------------------------------------------------------------------
def stage_one_pids() -> list[int]:
    """Other python processes running benchmarks.stage_one."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if (
            p.info["pid"] != os.getpid()
            and "python" in cmd
            and ("benchmarks.stage_one" in cmd or "benchmarks/stage_one.py" in cmd)
        ):
            found.append(int(p.info["pid"]))
    return found


def busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds the whole machine spent busy, CPU seconds of this process and its reaped
    children) since boot."""
    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system + own.children_user + own.children_system


class Watch:
    """What else ran during a measured part: other processes' CPU seconds and whether a
    stage-one benchmark was seen (polled every 10 s on a daemon thread)."""

    def __init__(self, env: dict[str, Any]):
        self.env, self.seen, self.stop = env, False, threading.Event()
        self.start = busy_cpu_s()
        self.t0 = time.monotonic()
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while not self.stop.wait(10.0):
            self.seen = self.seen or bool(stage_one_pids())

    def done(self) -> dict[str, Any]:
        self.stop.set()
        busy, own = busy_cpu_s()
        self.env.update(
            seconds=round(time.monotonic() - self.t0, 1),
            other_cpu_s=round((busy - self.start[0]) - (own - self.start[1]), 1),
            stage_one_seen_during=self.seen or bool(stage_one_pids()),
            loadavg_end=os.getloadavg(),
        )
        log.info(
            "%s: other processes used %.1f CPU s during %.0f s; stage_one seen: %s",
            self.env["part"],
            self.env["other_cpu_s"],
            self.env["seconds"],
            self.env["stage_one_seen_during"],
        )
        return self.env


def wait_quiet(label: str, limit: float, poll: float = 30.0) -> Watch:
    """Wait until no stage-one benchmark runs (at most ``limit`` s), say what was running, and
    start watching what else runs during the part."""
    top = subprocess.run(["ps", "aux", "--sort=-%cpu"], capture_output=True, text=True).stdout
    log.info("%s: top processes:\n%s", label, "\n".join(x[:160] for x in top.splitlines()[:8]))
    started = time.monotonic()
    while (pids := stage_one_pids()) and time.monotonic() - started < limit:
        log.info("%s: benchmarks.stage_one running (pids %s); waiting %.0f s", label, pids, poll)
        time.sleep(poll)
    pids = stage_one_pids()
    if pids:
        log.warning("%s: stage_one still running after %.0f s; measuring anyway", label, limit)
    return Watch(
        {
            "part": label,
            "waited_s": round(time.monotonic() - started, 1),
            "stage_one_running_at_start": bool(pids),
            "loadavg_start": os.getloadavg(),
        }
    )


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "mem_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


# -- stores --------------------------------------------------------------------------------------
def ensure_store(backbone: str, data: str, split: str, out: Path, limit: int | None) -> Path:
    """Reuse a complete store at ``out`` holding this data and these settings, else stage one.

    Only the settings that decide what the rows are (backbone, data, split, limit, max length,
    positions, dtype) are compared, so a store written by an older stage one (another sort
    window, say) is still reused."""
    want = {
        "identity.backbone.name": backbone,
        "identity.dataset.spec": data,
        "identity.dataset.split": split,
        "identity.dataset.limit": limit,
        "identity.tokenizer.max_length": 128,
        "layout.positions": "all",
        "layout.dtype": "bfloat16",
    }
    try:
        open_store(out, expect=want)
        log.info("store %s: reusing", out)
        return out
    except SidecacheError as exc:
        log.info("store %s: (re)building (%s)", out, exc)
    run_cache(
        CacheConfig(
            backbone=backbone,
            data=data,
            split=split,
            out=str(out),
            limit=limit,
            max_length=128,
            positions="all",
            dtype="bfloat16",
            device="cpu",
            progress=False,
        )
    )
    return out


def git_state() -> str:
    """The commit the measured code is at, plus whether pipeline/ or storage/ are modified."""
    run = subprocess.run
    head = run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = run(
        ["git", "status", "--porcelain", "pipeline", "storage"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return head.stdout.strip() + (" (pipeline/storage modified)" if dirty else "")


def build_bert(folder: Path) -> Path:
    """A 12-layer, 768-wide BERT with random (seeded) weights and the MiniLM tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.backbone import resolve_source

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    )
    BertModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_source("minilm")).save_pretrained(folder)
    return folder


def store_facts(path: Path) -> dict[str, Any]:
    s = open_store(path).summary()
    keys = ("samples", "tokens", "hidden_size", "raw_bytes", "bytes_on_disk", "compression_ratio")
    return {"layers": len(s["layers"]), **{k: s[k] for k in keys}}


# -- (a) -----------------------------------------------------------------------------------------
def part_a(
    train: Path, eval_: Path, epochs: int, batch: int, work: Path, max_wait: float
) -> dict[str, Any]:
    watch = wait_quiet("a", max_wait)
    torch.set_num_threads(cpu_threads(0))  # what run_train uses on CPU
    reader = open_store(train)
    info = StoreInfo.from_meta(reader.meta)
    started = time.perf_counter()
    loaders = {"ram": StoreLoader(reader, batch, shuffle=True, seed=0, ram_budget=HUGE)}
    ram_load_s = time.perf_counter() - started
    loaders["stream"] = StoreLoader(reader, batch, shuffle=True, seed=0, ram_budget=0)
    assert loaders["ram"].in_ram and not loaders["stream"].in_ram
    cfg = TrainConfig(str(train), str(eval_), ["read"], epochs, str(work / "a"), batch, 0, "cpu")
    spec, dev = parse_spec("read"), torch.device("cpu")
    members = {
        arm: make_member("read", spec, info, epochs * len(loaders[arm]), cfg, dev)
        for arm in loaders
    }
    n = reader.layout.n_samples
    rows: dict[str, dict[str, list[float]]] = {
        arm: {"train_sps": [], "train_cpu_s": [], "load_sps": []} for arm in loaders
    }
    for epoch in range(epochs):
        order = ["stream", "ram"] if epoch % 2 == 0 else ["ram", "stream"]
        for arm in order:
            m, t0, c0 = members[arm], time.perf_counter(), time.process_time()
            for b in loaders[arm].epoch(epoch):
                train_step(m, b, info)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rows[arm]["train_sps"].append(n / wall)
            rows[arm]["train_cpu_s"].append(cpu)
            log.info(
                "(a) epoch %d %s: %.0f samples/s (%.1f s, cpu %.1f s), loss %.4f",
                epoch,
                arm,
                n / wall,
                wall,
                cpu,
                m.loss_sum / max(1, m.loss_count),
            )
            m.loss_sum = m.loss_count = 0
    for epoch in range(epochs):  # loader only: the raw read speed of each arm
        for arm in ["stream", "ram"] if epoch % 2 == 0 else ["ram", "stream"]:
            t0 = time.perf_counter()
            count = sum(len(b.lengths) for b in loaders[arm].epoch(epoch))
            assert count == n
            rows[arm]["load_sps"].append(n / (time.perf_counter() - t0))
    med = {arm: {k: statistics.median(v) for k, v in r.items()} for arm, r in rows.items()}
    ratio = med["stream"]["train_sps"] / med["ram"]["train_sps"]
    log.info("(a) streaming / in-RAM = %.3f", ratio)
    return {
        "env": watch.done(),
        "samples": n,
        "batches_per_epoch": len(loaders["ram"]),
        "epochs_per_arm": epochs,
        "ram_load_s": ram_load_s,
        "runs": rows,
        "median": med,
        "ratio_stream_over_ram": ratio,
        "params": members["ram"].params,
    }


# -- (b) -----------------------------------------------------------------------------------------
def timed_train(
    train: Path,
    eval_: Path,
    specs: list[str],
    epochs: int,
    batch: int,
    out: Path,
) -> tuple[float, dict[str, Any]]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = run_train(
        TrainConfig(
            str(train), str(eval_), specs, epochs, str(out), batch, 0, "cpu", progress=False
        )
    )
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return wall, res


def part_b(
    train: Path,
    eval_: Path,
    epochs: int,
    repeats: int,
    batch: int,
    work: Path,
    max_wait: float,
) -> dict[str, Any]:
    watch = wait_quiet("b", max_wait)
    eight = [f"{k}:seed={s},name={k}-s{s}" for k in KINDS for s in (1, 2)]
    one = eight[0]  # read:seed=1,name=read-s1
    reads = [f"read:seed={s},name=read-s{s}" for s in range(1, 9)]  # K=8 READ-sized networks
    k1: list[float] = []
    k8: list[float] = []
    k8read: list[float] = []
    k8read_member_s: dict[str, list[float]] = {}
    singles: dict[str, list[float]] = {s: [] for s in eight[1:]}
    member_s: dict[str, list[float]] = {}
    single_member_s: dict[str, list[float]] = {}
    params: dict[str, int] = {}
    for r in range(repeats):
        for arm in ["k1", "k8"] if r % 2 == 0 else ["k8", "k1"]:
            specs = [one] if arm == "k1" else eight
            wall, res = timed_train(train, eval_, specs, epochs, batch, work / f"b-{arm}")
            (k1 if arm == "k1" else k8).append(wall)
            log.info("(b) repeat %d %s: %.1f s", r, arm, wall)
            for name, m in res.items():
                params[name] = m["trainable_params"]
                if arm == "k8":
                    member_s.setdefault(name, []).append(m["wall_time_s"])
                else:
                    single_member_s.setdefault(name, []).append(m["wall_time_s"])
        wall, res = timed_train(train, eval_, reads, epochs, batch, work / "b-k8read")
        k8read.append(wall)
        for name, m in res.items():
            k8read_member_s.setdefault(name, []).append(m["wall_time_s"])
        log.info("(b) repeat %d k8 read: %.1f s", r, wall)
        for spec in eight[1:]:
            wall, res = timed_train(train, eval_, [spec], epochs, batch, work / "b-single")
            singles[spec].append(wall)
            for name, m in res.items():
                single_member_s.setdefault(name, []).append(m["wall_time_s"])
            log.info("(b) repeat %d alone %s: %.1f s", r, spec, wall)
    sums = [k1[r] + sum(singles[s][r] for s in singles) for r in range(repeats)]
    out = {
        "env": watch.done(),
        "epochs": epochs,
        "repeats": repeats,
        "specs_k8": eight,
        "spec_k1": one,
        "k1_s": k1,
        "k8_s": k8,
        "k8read_s": k8read,
        "ratio_k8read_over_k1": statistics.median(k8read) / statistics.median(k1),
        "member_compute_s_in_k8read": {k: statistics.median(v) for k, v in k8read_member_s.items()},
        "singles_s": singles,
        "sum_of_8_separate_s": sums,
        "ratio_k8_over_k1": statistics.median(k8) / statistics.median(k1),
        "ratio_sum8_over_k8": statistics.median(sums) / statistics.median(k8),
        "member_compute_s_in_k8": {k: statistics.median(v) for k, v in member_s.items()},
        "member_compute_s_alone": {k: statistics.median(v) for k, v in single_member_s.items()},
        "single_wall_s": {s.split("name=")[1]: statistics.median(v) for s, v in singles.items()}
        | {"read-s1": statistics.median(k1)},
        "params": params,
    }
    log.info(
        "(b) K8/K1 = %.3f, sum of 8 alone / K8 = %.3f",
        out["ratio_k8_over_k1"],
        out["ratio_sum8_over_k8"],
    )
    return out


# -- (c) -----------------------------------------------------------------------------------------
def run_child(code: str, args: list[str]) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter, poll its RSS, return its JSON line plus the poll."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = [0]

    def poll() -> None:
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                peak[0] = max(peak[0], p.memory_info().rss)
                time.sleep(0.02)
        except psutil.Error:
            pass

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise RuntimeError(f"child failed ({proc.returncode}): {stderr[-2000:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    result["polled_peak_kb"] = peak[0] // 1024
    return result


def memory_run(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """One ``run_train`` child with ``cfg`` (plus a fresh output folder): its JSON line."""
    out = work / "c-run"
    shutil.rmtree(out, ignore_errors=True)
    res = run_child(TRAIN_CHILD, [json.dumps({**cfg, "out": str(out)})])
    shutil.rmtree(out, ignore_errors=True)
    return res


def part_c(
    stores: dict[str, tuple[Path, Path]],
    batch: int,
    work: Path,
    max_wait: float,
    pool_small: int,
    repeats: int,
) -> dict[str, Any]:
    watch = wait_quiet("c", max_wait)
    base = [run_child(BASELINE_CHILD, [])["maxrss_kb"] for _ in range(3)]
    baseline_kb = statistics.median(base)
    log.info("(c) idle python + torch: %.1f MB (runs %s)", baseline_kb / 1024, base)
    runs: list[dict[str, Any]] = []
    for label, (train, eval_) in stores.items():
        pool = TrainConfig.pool_mb
        modes = (("streaming", 0, False, pool), ("streaming, --low-memory", 0, True, pool),
                 (f"streaming, --pool-mb {pool_small}", 0, False, pool_small),
                 ("in RAM", HUGE >> 20, False, pool))  # fmt: skip
        for mode, budget, low, pool_mb in modes:
            cfg = {
                "train": str(train),
                "eval": str(eval_),
                "specs": ["read", "linear"],
                "epochs": 1,
                "batch_size": batch,
                "device": "cpu",
                "ram_budget_mb": budget,
                "low_memory": low,
                "pool_mb": pool_mb,
                "progress": False,
            }
            # the peak depends on thread timing and on what the allocator keeps: the median of
            # ``repeats`` children, and all of them
            reps = sorted((memory_run(cfg, work) for _ in range(repeats)),
                          key=lambda r: r["maxrss_kb"])  # fmt: skip
            res = reps[len(reps) // 2]
            res.update(
                repeat_maxrss_kb=[r["maxrss_kb"] for r in reps],
                store=label,
                mode=mode,
                train_store=store_facts(train),
                eval_store=store_facts(eval_),
                above_baseline_mb=(res["maxrss_kb"] - baseline_kb) / 1024,
            )
            log.info(
                "(c) %s %s: peak %.1f MB (runs %s), %.1f MB above baseline (polled %.1f MB); "
                "loaders %s",
                label,
                mode,
                res["maxrss_kb"] / 1024,
                [round(kb / 1024) for kb in res["repeat_maxrss_kb"]],
                res["above_baseline_mb"],
                res["polled_peak_kb"] / 1024,
                res["loaders"],
            )
            runs.append(res)
    return {"env": watch.done(), "baseline_kb": baseline_kb, "baseline_runs_kb": base,
            "repeats": repeats, "runs": runs}  # fmt: skip


# -- report --------------------------------------------------------------------------------------
def env_line(env: dict[str, Any]) -> str:
    return (
        f"_during this part ({env['seconds']:.0f} s): other processes used "
        f"{env['other_cpu_s']:.0f} CPU s; stage_one benchmark seen: "
        f"{'yes' if env['stage_one_seen_during'] else 'no'} (waited {env['waited_s']:.0f} s "
        "before it)_"
    )


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"machine: {m['nproc']} CPUs, torch {m['torch']}, torch threads {m['torch_threads']}, "
        f"{m['mem_gb']} GB RAM, python {m['python']}; code at {res['git']}",
        "",
    ]
    if "a" in res:
        a = res["a"]
        lines += [
            f"### (a) streaming vs in-RAM, READ, batch 32, {a['samples']} samples, "
            f"{a['epochs_per_arm']} epochs per arm (medians)",
            "",
            "| arm | train samples/s | train CPU s/epoch | loader-only samples/s |",
            "|---|---:|---:|---:|",
        ]
        for arm, name in (("stream", "streaming (ram_budget=0)"), ("ram", "in RAM")):
            med = a["median"][arm]
            lines.append(
                f"| {name} | {med['train_sps']:.0f} | {med['train_cpu_s']:.1f} | "
                f"{med['load_sps']:.0f} |"
            )
        lines += [
            "",
            f"**streaming / in-RAM = {a['ratio_stream_over_ram']:.3f}** (target ≥ 0.8); "
            f"one-off RAM load {a['ram_load_s']:.1f} s",
            "",
            env_line(a["env"]),
            "",
        ]
    if "b" in res:
        b = res["b"]
        lines += [
            f"### (b) K side networks per pass, {b['epochs']} epoch(s), medians of "
            f"{b['repeats']} repeats",
            "",
            "| run | wall s |",
            "|---|---:|",
            f"| K=1 (read) | {statistics.median(b['k1_s']):.1f} |",
            f"| K=8 (read, lst, linear, mlp × seeds 1, 2) | {statistics.median(b['k8_s']):.1f} |",
            f"| sum of the 8 run separately | {statistics.median(b['sum_of_8_separate_s']):.1f} |",
            "",
            f"| K=8 READ (read × seeds 1..8) | {statistics.median(b['k8read_s']):.1f} |",
            "",
            f"**K=8 / K=1 = {b['ratio_k8_over_k1']:.2f}** (target ≤ 2.5); "
            f"**sum of 8 separate / K=8 = {b['ratio_sum8_over_k8']:.2f}**; "
            f"K=8 READ / K=1 = {b['ratio_k8read_over_k1']:.2f}; loading + evaluation share of "
            f"K=1 (wall − READ's own compute) = "
            f"{statistics.median(b['k1_s']) - b['member_compute_s_alone'].get('read-s1', 0):.1f} s",
            "",
            "| network | params | alone: wall s | alone: own compute s | in K=8: own compute s |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, p in b["params"].items():
            lines.append(
                f"| {name} | {p:,} | {b['single_wall_s'].get(name, 0):.1f} | "
                f"{b['member_compute_s_alone'].get(name, 0):.1f} | "
                f"{b['member_compute_s_in_k8'].get(name, 0):.1f} |"
            )
        lines += ["", env_line(b["env"]), ""]
    if "c" in res:
        c = res["c"]
        lines += [
            f"### (c) peak RSS of stage two (read + linear, batch 32, 1 epoch) above idle "
            f"`python -c 'import torch'` = {c['baseline_kb'] / 1024:.0f} MB "
            f"(median of {c.get('repeats', 1)} children per row)",
            "",
            "| store | layers × width | train samples | train raw / on disk MB | mode | "
            "peak MB | above baseline MB (range) | polled peak MB | loader held MB (train, eval) |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in c["runs"]:
            s = r["train_store"]
            held = ", ".join(f"{x['held_peak'] / 2**20:.0f}" for x in r.get("loaders", []))
            spread = [(kb - c["baseline_kb"]) / 1024 for kb in r.get("repeat_maxrss_kb", [])]
            span = f" ({min(spread):.0f}–{max(spread):.0f})" if len(spread) > 1 else ""
            lines.append(
                f"| {r['store']} | {s['layers']} × {s['hidden_size']} | {s['samples']} | "
                f"{s['raw_bytes'] / 1e6:.0f} / {s['bytes_on_disk'] / 1e6:.0f} | {r['mode']} | "
                f"{r['maxrss_kb'] / 1024:.0f} | **{r['above_baseline_mb']:.0f}**{span} | "
                f"{r['polled_peak_kb'] / 1024:.0f} | {held or '–'} |"
            )
        lines += ["", env_line(c["env"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/bench2"), help="stores and outputs")
    p.add_argument("--limit", type=int, default=10000, help="SST-2 train samples for (a), (b)")
    p.add_argument("--mem-limit", type=int, default=2000, help="SST-2 train samples for (b), (c)")
    p.add_argument("--parts", default="abc", help="which parts to run, e.g. 'ab'")
    p.add_argument("--epochs-a", type=int, default=4, help="epochs per arm in (a)")
    p.add_argument("--epochs-b", type=int, default=1, help="epochs per run_train in (b)")
    p.add_argument("--repeats-b", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-wait", type=float, default=900.0, help="s to wait for stage_one")
    p.add_argument("--pool-small", type=int, default=64, help="(c): the small --pool-mb arm")
    p.add_argument("--repeats-c", type=int, default=1, help="(c): children per row (median)")
    p.add_argument("--json", type=Path, default=None, help="save every figure here")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stores, sst2 = args.work / "stores", f"glue:{GLUE}/SST-2"
    train = ensure_store(
        "minilm", sst2, "train", stores / f"sst2-train{args.limit // 1000}k", args.limit
    )
    dev = ensure_store("minilm", sst2, "dev", stores / "sst2-dev", None)
    res: dict[str, Any] = {
        "machine": machine(),
        "git": git_state(),
        "train_store": store_facts(train),
        "eval_store": store_facts(dev),
        "argv": sys.argv,
    }

    def save() -> None:  # after every part: a part's figures survive a later interruption
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=2, default=str))

    if "a" in args.parts:
        res["a"] = part_a(
            train, dev, args.epochs_a, args.batch_size, args.work / "out", args.max_wait
        )
        save()
    if "b" in args.parts:
        small_train = ensure_store(
            "minilm", sst2, "train", stores / f"sst2-train{args.mem_limit // 1000}k", args.mem_limit
        )
        res["b"] = part_b(
            small_train,
            dev,
            args.epochs_b,
            args.repeats_b,
            args.batch_size,
            args.work / "out",
            args.max_wait,
        )
        save()
    if "c" in args.parts:
        bert = str(build_bert(args.work / "bert768-random"))
        small, big = f"{args.mem_limit // 1000}k", f"{args.limit // 1000}k"
        mem = {
            f"MiniLM {small}": (
                ensure_store(
                    "minilm", sst2, "train", stores / f"sst2-train{small}", args.mem_limit
                ),
                dev,
            ),
            f"MiniLM {big}": (train, dev),
            f"BERT-768×12 {small}": (
                ensure_store(
                    bert, sst2, "train", stores / f"bert768-sst2-train{small}", args.mem_limit
                ),
                ensure_store(bert, sst2, "dev", stores / "bert768-sst2-dev", None),
            ),
            f"BERT-768×12 {big}": (
                ensure_store(bert, sst2, "train", stores / f"bert768-sst2-train{big}", args.limit),
                stores / "bert768-sst2-dev",
            ),
        }
        res["c"] = part_c(mem, args.batch_size, args.work / "out", args.max_wait, args.pool_small,
                          args.repeats_c)  # fmt: skip
    save()
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fault injection: SIGKILL stage one and stage two at random points, resume, compare.

Stage one: a real ``sidecache cache`` subprocess on a small real run (a config-built BERT saved
with ``save_pretrained`` next to the MiniLM tokenizer, over a CSV of synthetic sentences; or
``--backbone minilm --data bbc --limit N``) is killed with ``SIGKILL``, half of the time after a
random delay (alternately uniform over the uninterrupted run's wall time, so imports, tokenising
and store creation are hit too, and uniform over its writing phase, counted from the moment the
store's ``zarr.json`` appears) and half of the time when a random number of files has appeared in
the store (alternately ``progress`` rows, i.e. whole shards, and hidden-state shard files, i.e.
mid-shard). The same command is then run again to resume, and the resumed store must equal an
uninterrupted one: every array bit for bit (read back through the checksummed reader), the
metadata equal except timing fields, the same set of files.

Stage two: ``sidecache train`` on that store is killed after a random delay or right after the
k-th checkpoint write, rerun to resume, and its final outputs must equal an uninterrupted run:
``metrics.json`` (except wall time and memory), ``history.csv``, and every tensor of ``best.pt``
and ``last.pt`` (weights, optimiser and scheduler state, random-number state).

Run ``python -m benchmarks.faults`` (20 stage-one kills, 10 stage-two kills; a few minutes on two
cores). The fast and ``slow`` tests in ``tests/reliability/test_faults.py`` call the same
functions with fewer kills.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("time", "seconds", "started", "elapsed", "wall", "memory", "pid", "host")
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "film", "was", "great", "terrible", "not",
         "good", "bad", "movie", "plot", "acting", "very", "quite", "an", "utterly", "boring",
         "moving", "story", "with", "and", "but", "of"]  # fmt: skip


# -- workload ---------------------------------------------------------------------------------
def build_backbone(path: Path, hidden: int = 64, layers: int = 3, seed: int = 0) -> str:
    """A small BERT built from a config (never downloaded), with the MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.backbone import resolve_source

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_source("minilm")).save_pretrained(path)
    return str(path)


def write_csv(path: Path, n: int, seed: int = 0) -> str:
    """``n`` labelled synthetic sentences of 1-40 words (no commas, no quoting needed)."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 40))]
        lines.append(f"{' '.join(words)},{int('good' in words or 'great' in words)}")
    path.write_text("\n".join(lines) + "\n")
    return f"csv:{path}"


@dataclass
class Workload:
    """The stage-one and stage-two commands under test (without ``--out``)."""

    cache_args: list[str]
    dev_args: list[str]
    train_args: list[str] = field(default_factory=list)


STAGE_ONE_FLAGS = ["--device", "cpu", "--no-progress", "--token-budget", "512",
                   "--window-mb", "0.5", "--chunk-mb", "0.03", "--shard-chunks", "2"]  # fmt: skip


def make_workload(
    root: Path, samples: int = 1500, backbone: str = "tiny", model: str | None = None
) -> Workload:
    """Stage-one arguments for a train and a dev store; ``model``: an existing local backbone."""
    root.mkdir(parents=True, exist_ok=True)
    if backbone == "minilm":
        train = ["--backbone", "minilm", "--data", "bbc", "--split", "train", "--limit",
                 str(samples), "--max-length", "128"]  # fmt: skip
        dev = ["--backbone", "minilm", "--data", "bbc", "--split", "dev", "--limit", "200",
               "--max-length", "128"]  # fmt: skip
    else:
        folder = root / "backbone"
        model_path = model or (str(folder) if folder.is_dir() else build_backbone(folder))
        train = ["--backbone", model_path, "--data", write_csv(root / "train.csv", samples, 1)]
        dev = ["--backbone", model_path, "--data", write_csv(root / "dev.csv", 300, 2)]
    return Workload(train + STAGE_ONE_FLAGS, dev + STAGE_ONE_FLAGS)


def sidecache(*args: str) -> list[str]:
    return [sys.executable, "-m", "stages.cli", *args]


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SIDECACHE_LOG="WARNING")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


# -- comparing ----------------------------------------------------------------------------------
def _timing(key: str) -> bool:
    return any(word in key.lower() for word in TIMING_KEYS)


def dict_differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Differences between two JSON-like values, ignoring keys that hold timings."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if not _timing(str(key)):
                out += dict_differences(a.get(key), b.get(key), f"{where}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in dict_differences(x, y, f"{where}[{i}]")]  # fmt: skip
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{where or 'value'}: {a!r} != {b!r}"]


def store_files(path: Path) -> tuple[set[str], list[str]]:
    """Relative paths of a store's files, and the leftovers of interrupted atomic writes."""
    files = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    partial = sorted(f for f in files if f.endswith(".partial"))
    return files - set(partial), partial


def compare_stores(ref: Path, got: Path) -> list[str]:
    """Everything that differs between two complete stores (empty when identical)."""
    from storage import open_store

    a, b = open_store(ref), open_store(got)
    out = dict_differences(a.meta, b.meta, "meta")
    names_a, names_b = a.arrays(), b.arrays()
    if names_a != names_b:
        out.append(f"arrays: {sorted(names_a)} != {sorted(names_b)}")
    for name in sorted(set(names_a) & set(names_b)):
        x, y = np.asarray(a.read(name)), np.asarray(b.read(name))
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=True):
            out.append(f"array {name} differs")
    files_a, _ = store_files(ref)
    files_b, _ = store_files(got)
    if files_a != files_b:
        out.append(f"files: only in ref {sorted(files_a - files_b)[:5]}, "
                   f"only in resumed {sorted(files_b - files_a)[:5]}")  # fmt: skip
    return out


def _tensor_differences(a: Any, b: Any, where: str) -> list[str]:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))  # fmt: skip
        return [] if same else [f"{where}: tensors differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if not _timing(str(key)):
                out += _tensor_differences(a.get(key), b.get(key), f"{where}.{key}")
        return out
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _tensor_differences(x, y, f"{where}[{i}]")]  # fmt: skip
    return dict_differences(a, b, where)


def compare_runs(ref: Path, got: Path) -> list[str]:
    """Everything that differs between two finished ``sidecache train`` output folders."""
    import torch

    out = []
    nets_a = sorted(p.name for p in ref.iterdir() if p.is_dir())
    nets_b = sorted(p.name for p in got.iterdir() if p.is_dir())
    if nets_a != nets_b:
        return [f"side networks: {nets_a} != {nets_b}"]
    for net in nets_a:
        ma = json.loads((ref / net / "metrics.json").read_text())
        mb = json.loads((got / net / "metrics.json").read_text())
        out += dict_differences(ma, mb, f"{net}/metrics.json")
        if (ref / net / "history.csv").read_text() != (got / net / "history.csv").read_text():
            out.append(f"{net}/history.csv differs")
        for ckpt in ("best.pt", "last.pt"):
            sa = torch.load(ref / net / ckpt, map_location="cpu", weights_only=False)
            sb = torch.load(got / net / ckpt, map_location="cpu", weights_only=False)
            out += _tensor_differences(sa, sb, f"{net}/{ckpt}")
    return out


# -- killing ------------------------------------------------------------------------------------
def count_files(folder: Path, pattern: str) -> int:
    return sum(1 for _ in folder.glob(pattern)) if folder.is_dir() else 0


@dataclass
class Kill:
    """Where to kill: after ``delay`` seconds, or once ``pattern`` matches ``count`` files."""

    mode: str  # stage one: time, time-writing, progress, files; stage two: time, checkpoint
    delay: float = 0.0
    pattern: str = ""
    count: int = 0
    created: float | None = None  # when the store's zarr.json appeared (time-writing)

    def reached(self, out: Path, started: float) -> bool:
        if self.mode == "time":
            return time.monotonic() - started >= self.delay
        if self.mode == "time-writing":  # ``delay`` seconds after the store was created
            if self.created is None and (out / "zarr.json").is_file():
                self.created = time.monotonic()
            return self.created is not None and time.monotonic() - self.created >= self.delay
        return count_files(out, self.pattern) >= self.count


def kill_at(cmd: list[str], out: Path, kill: Kill, poll: float = 0.003) -> tuple[bool, float]:
    """Start ``cmd``, SIGKILL it at ``kill``; ``(killed, seconds)``: ``killed`` is false when
    the process ended on its own first (it must then have succeeded)."""
    env = dict(os.environ, SIDECACHE_LOG="WARNING")
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    while proc.poll() is None and not kill.reached(out, started):
        time.sleep(poll)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    if proc.returncode == -signal.SIGKILL:
        return True, time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {err[-2000:]}")
    return False, time.monotonic() - started


@dataclass
class Trial:
    stage: str
    mode: str
    point: float  # seconds or a file count
    killed_after_s: float
    complete_after_kill: bool
    shards_on_disk_after_kill: int
    leftover_partial_files: int
    resumed_exit: int
    differences: list[str]

    @property
    def survived(self) -> bool:
        """The rerun succeeded and matches. A store already marked complete when the kill
        landed (the process was past ``close()``) counts too: the rerun is then a no-op, so
        the comparison checks that "complete" was only ever set on a correct store."""
        return self.resumed_exit == 0 and not self.differences


def _store_state(out: Path) -> tuple[bool, int]:
    """(marked complete?, shards with a progress row) of a possibly torn store."""
    meta_file = out / "zarr.json"
    try:
        meta = json.loads(meta_file.read_text())["attributes"]["sidecache"]
    except (OSError, ValueError, KeyError):
        return False, 0
    return bool(meta.get("complete")), count_files(out / "progress" / "c", "*/0/0")


def stage_one_kills(work: Workload, root: Path, kills: int, seed: int,
                    log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """``kills`` SIGKILLs of stage one, each followed by a resume and a comparison."""
    rng = random.Random(seed)
    ref = root / "ref"
    watch = Kill("time-writing", delay=float("inf"))  # never fires; records the store's creation
    killed, wall = kill_at(sidecache("cache", *work.cache_args, "--out", str(ref), "--overwrite"),
                           ref, watch)  # fmt: skip
    assert not killed and watch.created is not None
    writing = max(0.1, wall - (watch.created - (time.monotonic() - wall)))
    n_shards = count_files(ref / "progress" / "c", "*/0/0")
    n_files = count_files(ref / "hidden", "*/c/*/0")
    log(f"stage one reference: {wall:.1f} s ({writing:.1f} s after the store was created), "
        f"{n_shards} shards, {n_files} hidden shard files")  # fmt: skip
    trials: list[Trial] = []
    modes = ["time", "progress", "time-writing", "files"]
    missed = 0
    while len(trials) < kills:
        mode = modes[len(trials) % len(modes)]
        if mode == "time":
            kill = Kill("time", delay=rng.uniform(0.05, 0.98) * wall)
        elif mode == "time-writing":
            kill = Kill("time-writing", delay=rng.uniform(0.0, 0.98) * writing)
        elif mode == "progress":
            kill = Kill("progress", pattern="progress/c/*/0/0", count=rng.randint(1, n_shards - 1))
        else:
            kill = Kill("files", pattern="hidden/*/c/*/0", count=rng.randint(1, n_files - 1))
        out = root / f"s{len(trials)}"
        cmd = sidecache("cache", *work.cache_args, "--out", str(out), "--overwrite")
        killed, secs = kill_at(cmd, out, kill)
        if not killed:
            missed += 1  # finished before the kill point: draw another point
            continue
        complete, on_disk = _store_state(out)
        _, partial = store_files(out) if out.is_dir() else (set(), [])
        # the resume is the same command without --overwrite (which would start again)
        resumed = run(sidecache("cache", *work.cache_args, "--out", str(out)))
        diffs = compare_stores(ref, out) if resumed.returncode == 0 else [resumed.stderr[-800:]]
        point = kill.delay if mode.startswith("time") else kill.count
        trial = Trial("one", mode, point, round(secs, 2), complete, on_disk, len(partial),
                      resumed.returncode, diffs)  # fmt: skip
        trials.append(trial)
        log(f"stage one kill {len(trials):2d}/{kills} {mode:12s} at {point:>7.2f} "
            f"({on_disk}/{n_shards} shards on disk, {len(partial)} .partial files): "
            f"{'identical' if trial.survived else diffs[:3]}")  # fmt: skip
    return {"reference_s": wall, "shards": n_shards, "missed_kill_points": missed,
            "trials": trials}  # fmt: skip


TRAIN_NETS = ["--sidenet", "read:hidden=32", "--sidenet", "linear"]


def stage_two_kills(work: Workload, root: Path, store: Path, kills: int, seed: int, epochs: int = 3,
                    log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """``kills`` SIGKILLs of stage two (on ``store``), each followed by a rerun and a comparison."""
    rng = random.Random(seed + 1)
    dev = root / "dev" if work.dev_args else store  # no dev store: evaluate on the train store
    if work.dev_args and not (dev / "zarr.json").is_file():
        made = run(sidecache("cache", *work.dev_args, "--out", str(dev), "--overwrite"))
        if made.returncode:
            raise RuntimeError(made.stderr[-2000:])
    args = ["--train", str(store), "--eval", str(dev), *TRAIN_NETS, "--epochs", str(epochs),
            "--batch-size", "64", "--device", "cpu", "--no-progress"]  # fmt: skip
    ref = root / "train-ref"
    started = time.monotonic()
    done = run(sidecache("train", *args, "--out", str(ref)))
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    wall = time.monotonic() - started
    log(f"stage two reference: {wall:.1f} s, {epochs} epochs")
    n_ckpt = epochs * (len(TRAIN_NETS) // 2)
    trials: list[Trial] = []
    missed = 0
    while len(trials) < kills:
        out = root / f"t{len(trials)}"
        if out.exists():
            shutil.rmtree(out)
        if len(trials) % 2 == 1:
            kill = Kill("time", delay=rng.uniform(0.1, 0.98) * wall)
        else:  # right after the k-th checkpoint (any network's last.pt) appears or is replaced
            kill = Kill("checkpoint", count=rng.randint(1, n_ckpt - 1))
        killed, secs = _kill_train(sidecache("train", *args, "--out", str(out)), out, kill)
        if not killed:
            missed += 1
            continue
        epochs_done = _epochs_done(out)  # checkpointed before the kill
        resumed = run(sidecache("train", *args, "--out", str(out)))
        diffs = compare_runs(ref, out) if resumed.returncode == 0 else [resumed.stderr[-800:]]
        point = kill.delay if kill.mode == "time" else kill.count
        trial = Trial("two", kill.mode, point, round(secs, 2), False, epochs_done, 0,
                      resumed.returncode, diffs)  # fmt: skip
        trials.append(trial)
        log(f"stage two kill {len(trials):2d}/{kills} {kill.mode:10s} at {point:>6.2f} "
            f"({epochs_done} network-epochs checkpointed): "
            f"{'identical' if trial.survived else diffs[:3]}")  # fmt: skip
    return {"reference_s": wall, "missed_kill_points": missed, "trials": trials}


def _epochs_done(out: Path) -> int:
    total = 0
    for metrics in out.glob("*/metrics.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            total += int(json.loads(metrics.read_text())["epochs"])
    return total


@dataclass
class CheckpointKill(Kill):
    """Kill once ``count`` checkpoint writes (a new ``last.pt`` of any network) were seen."""

    seen: set[tuple[str, int, int]] = field(default_factory=set)

    def reached(self, out: Path, started: float) -> bool:
        for path in out.glob("*/last.pt"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            self.seen.add((str(path), st.st_ino, st.st_mtime_ns))
        return len(self.seen) >= self.count


def _kill_train(cmd: list[str], out: Path, kill: Kill) -> tuple[bool, float]:
    if kill.mode == "checkpoint":
        kill = CheckpointKill("checkpoint", count=kill.count)
    return kill_at(cmd, out, kill)


# -- entry point ----------------------------------------------------------------------------------
def summary(result: dict[str, Any]) -> dict[str, Any]:
    trials: list[Trial] = result["trials"]
    return {
        "kills": len(trials),
        "survived": sum(t.survived for t in trials),
        "by_mode": {m: sum(t.mode == m for t in trials) for m in sorted({t.mode for t in trials})},
        "missed_kill_points": result["missed_kill_points"],
        "killed_after_complete": sum(t.complete_after_kill for t in trials),
        "reference_s": round(result["reference_s"], 2),
        "leftover_partial_files": sum(t.leftover_partial_files for t in trials),
        "failures": [asdict(t) for t in trials if not t.survived],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/sidecache-faults")
    p.add_argument("--kills", type=int, default=20, help="stage-one kills")
    p.add_argument("--train-kills", type=int, default=10, help="stage-two kills")
    p.add_argument("--samples", type=int, default=1500)
    p.add_argument("--backbone", default="tiny", choices=["tiny", "minilm"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    root = Path(args.workdir)
    work = make_workload(root, args.samples, args.backbone)
    one = stage_one_kills(work, root, args.kills, args.seed)
    two = stage_two_kills(work, root, root / "ref", args.train_kills, args.seed)
    report = {"stage_one": summary(one), "stage_two": summary(two)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    s1, s2 = report["stage_one"], report["stage_two"]
    print(
        f"stage one: {s1['survived']}/{s1['kills']} kills resumed to an identical store; "
        f"stage two: {s2['survived']}/{s2['kills']} kills resumed to identical outputs"
    )
    return 0 if s1["survived"] == s1["kills"] and s2["survived"] == s2["kills"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Stage one split across processes (``--shard I/N``) and writers' claims on a store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.shards import owned_shards, parse_shard
from storage import (
    ConfigError,
    StoreBusyError,
    StoreIncompleteError,
    claim,
    finalize_store,
    open_store,
    shard_slot,
)
from tests.conftest import sentences, small_cache
from tests.pipeline.test_cache import assert_same_store

ROOT = Path(__file__).parents[2]
# 3 layers x 32 x bfloat16 = 192 B a row; 256-row chunks, 512-row shards, one shard per window
SMALL = {"token_budget": 128, "window_mb": 0.1, "chunk_mb": 0.015, "shard_chunks": 2}
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]


def write_csv(path: Path, n: int, seed: int = 5) -> str:
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in sentences(n, seed=seed)))
    return f"csv:{path}"


def cli(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stages.cli",
        "cache",
        "--device",
        "cpu",
        "--no-progress",
        *args,
    ]


def env() -> dict[str, str]:
    return dict(os.environ, SIDECACHE_LOG="WARNING")  # same threads as the reference run


def shard_done(out: Path, shard: int) -> bool:
    return (out / "progress" / "c" / str(shard)).exists()


def test_parse_shard_names_the_bad_value():
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) is None
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="I/N"):
            parse_shard(bad)


@pytest.mark.slow
def test_three_shard_workers_one_killed_and_restarted_equal_one_process(model_dir, tmp_path):
    model = model_dir("bert")
    data = write_csv(tmp_path / "train.csv", 2400)
    small_cache(model, data, tmp_path / "ref", **SMALL)
    out = tmp_path / "sharded"
    args = ["--backbone", model, "--data", data, "--out", str(out), *FLAGS]
    procs = [
        subprocess.Popen(cli(*args, "--shard", f"{i}/3"), env=env(), cwd=ROOT) for i in range(3)
    ]
    # kill worker 1 as soon as one of its shards is on disk
    deadline = time.monotonic() + 300
    victim: np.ndarray | None = None
    while time.monotonic() < deadline and procs[1].poll() is None:
        if victim is None and (out / "zarr.json").exists():
            try:
                reader = open_store(out, allow_incomplete=True)
                window = int(reader.identity["extraction"]["window_rows"])
                victim = np.flatnonzero(owned_shards(reader.layout, window, (1, 3)))
            except Exception:  # metadata still being written
                victim = None
        if victim is not None and any(shard_done(out, int(s)) for s in victim):
            break
        time.sleep(0.005)
    procs[1].send_signal(signal.SIGKILL)
    assert procs[1].wait() == -signal.SIGKILL, "worker 1 finished before it could be killed"
    assert procs[0].wait(timeout=300) == 0 and procs[2].wait(timeout=300) == 0
    partial = open_store(out, allow_incomplete=True)
    assert not partial.complete, "a store with a dead worker's shards missing must stay incomplete"
    assert victim is not None and not all(shard_done(out, int(s)) for s in victim)
    # the restarted worker clears its stale claim, writes the rest and, last, finalises
    assert subprocess.run(cli(*args, "--shard", "1/3"), env=env(), cwd=ROOT).returncode == 0
    assert open_store(out).complete
    assert_same_store(tmp_path / "ref", out)
    assert not (tmp_path / "sharded.claims").exists(), "claims are removed when released"


def test_shard_claims_refuse_the_same_slot_and_another_n(model_dir, glue_dir, tmp_path):
    model = model_dir("bert")
    data = f"glue:{glue_dir}"
    small_cache(model, data, tmp_path / "ref", **SMALL)
    out = tmp_path / "s"
    with claim(out, shard_slot(0, 2)):  # a live worker 0/2 (this test process)
        with pytest.raises(StoreBusyError, match="shard-0-of-2"):
            small_cache(model, data, out, shard="0/2", **SMALL)
        with pytest.raises(StoreBusyError, match="same N"):
            small_cache(model, data, out, shard="1/3", **SMALL)
        with pytest.raises(StoreBusyError, match="another stage-one process"):
            small_cache(model, data, out, **SMALL)  # a whole-store run
        summary = small_cache(model, data, out, shard="1/2", **SMALL)  # coexists with 0/2
        assert not summary["complete"]
    with pytest.raises(StoreIncompleteError, match="not written yet"):
        small_cache(model, data, out, finalize=True)
    with pytest.raises(StoreIncompleteError):
        open_store(out)
    assert small_cache(model, data, out, shard="0/2", **SMALL)["complete"]  # last one finalises
    assert_same_store(tmp_path / "ref", out)
    assert finalize_store(str(out))["complete"]  # idempotent
    with pytest.raises(ConfigError, match="--overwrite"):
        small_cache(model, data, out, shard="0/2", overwrite=True, **SMALL)


@pytest.mark.slow
def test_a_second_writer_on_the_same_store_is_refused(model_dir, tmp_path):
    model = model_dir("bert")
    data = write_csv(tmp_path / "train.csv", 3000)
    out = tmp_path / "s"
    args = ["--backbone", model, "--data", data, "--out", str(out), *FLAGS]
    first = subprocess.Popen(cli(*args), env=env(), cwd=ROOT)
    claims = tmp_path / "s.claims" / "whole"
    deadline = time.monotonic() + 120
    while not claims.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        second = subprocess.run(cli(*args), env=env(), cwd=ROOT, capture_output=True, text=True)
        assert first.poll() is None, "the first writer ended before the second one started"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert "StoreBusyError" in second.stderr and f"pid {first.pid}" in second.stderr
    assert claims.exists(), "a killed writer leaves its claim behind"
    # the holder is dead: its claim is stale, and the next run takes over and finishes
    again = subprocess.run(cli(*args), env=env(), cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "stale claim" in again.stderr
    assert open_store(out).complete

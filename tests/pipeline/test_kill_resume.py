"""A real SIGKILL of stage one in a subprocess, then a resume: the same store as an unbroken run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from storage import open_store
from tests.conftest import sentences, small_cache
from tests.pipeline.test_cache import assert_same_store

FLAGS = [
    "--token-budget",
    "128",
    "--window-mb",
    "0.1",
    "--chunk-mb",
    "0.015",
    "--shard-chunks",
    "2",
]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stages.cli", "cache", *args]


def shards_done(out: Path) -> int:
    """Shards recorded in ``progress`` so far (0 while the store is still being created)."""
    try:
        progress = open_store(out, allow_incomplete=True).group["progress"][...]
    except Exception:  # not created yet, or caught mid-write: look again
        return 0
    return int(np.isfinite(np.asarray(progress)).all(axis=(1, 2)).sum())


def test_sigkill_mid_run_then_resume_gives_the_same_store(model_dir, tmp_path):
    csv_path = tmp_path / "train.csv"
    rows = sentences(3000, seed=5)
    csv_path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    model = model_dir("bert")
    data = f"csv:{csv_path}"
    out = tmp_path / "killed"
    args = ["--backbone", model, "--data", data, "--out", str(out), "--device", "cpu", *FLAGS]
    env = dict(os.environ, SIDECACHE_LOG="WARNING")
    proc = subprocess.Popen(cli(*args, "--no-progress"), env=env, cwd=Path(__file__).parents[2])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if shards_done(out) > 0:  # kill after the first shard is recorded, long before the last
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "stage one finished before it could be killed"
    partial = open_store(out, allow_incomplete=True)
    assert not partial.complete
    done = np.isfinite(np.asarray(partial.group["progress"][...])).all(axis=(1, 2))
    assert 0 < done.sum() < len(done)

    resumed = subprocess.run(cli(*args, "--no-progress"), env=env, cwd=Path(__file__).parents[2])
    assert resumed.returncode == 0
    small_cache(
        model,
        data,
        tmp_path / "ref",
        token_budget=128,
        window_mb=0.1,
        chunk_mb=0.015,
        shard_chunks=2,
    )
    assert_same_store(tmp_path / "ref", out)

"""A Dask worker preload for tests: the first worker to finish one of its shard task's shards
kills itself (SIGKILL), midway through the task, once per marker file.

Set ``SIDECACHE_KILL_STORE`` (the store being written) and ``SIDECACHE_KILL_MARKER`` (a file
that must not exist yet) in the environment before the cluster starts, and name this file in
Dask's ``distributed.worker.preload``. The worker that kills itself writes the marker first
(created exclusively: one kill per marker) with its pid, its shard slot, the number of its
shards then on disk and the number it owns.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

POLL_S = 0.002


def dask_setup(worker: Any) -> None:
    store, marker = os.environ.get("SIDECACHE_KILL_STORE"), os.environ.get("SIDECACHE_KILL_MARKER")
    if store and marker and not Path(marker).exists():
        threading.Thread(target=_watch, args=(Path(store), Path(marker)), daemon=True).start()


def _my_slot(claims: Path) -> tuple[int, int] | None:
    """The shard slot this process has claimed, if any."""
    for path in claims.glob("shard-*-of-*"):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if info.get("pid") == os.getpid():
            _, index, _, count = path.name.split("-")
            return int(index), int(count)
    return None


def _owned(store: Path, slot: tuple[int, int]) -> np.ndarray | None:
    from pipeline.shards import owned_shards
    from storage import open_store

    try:
        reader = open_store(store, allow_incomplete=True)
        window = int(reader.identity["extraction"]["window_rows"])
        return np.flatnonzero(owned_shards(reader.layout, window, slot))
    except Exception:  # metadata still being written
        return None


def _watch(store: Path, marker: Path) -> None:
    claims = store.with_name(store.name + ".claims")
    deadline = time.monotonic() + 600
    owned: np.ndarray | None = None
    while time.monotonic() < deadline and not marker.exists():
        slot = _my_slot(claims)
        if slot is not None and owned is None:
            owned = _owned(store, slot)
        if slot is not None and owned is not None:
            done = sum((store / "progress" / "c" / str(s)).exists() for s in owned)
            if done:
                _kill(marker, {"pid": os.getpid(), "slot": slot, "done": done, "owned": len(owned)})
                return
        time.sleep(POLL_S)


def _kill(marker: Path, record: dict[str, Any]) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # another worker was first
    os.write(fd, json.dumps(record).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)

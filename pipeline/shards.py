"""Stage one split across processes: ``sidecache cache --shard I/N``.

The batch plan sorts samples by length inside *windows* that are whole shards of the store
(:attr:`pipeline.tokens.PlanSettings.aligned`), so the plan can be split by window: worker ``I``
owns the shards of windows ``I, I + N, I + 2N, ...``. It runs every batch that holds a row of an
owned shard (its windows' batches, plus the one batch of the previous window whose last sample
runs over the boundary) and writes only its own shards, so every batch has the same samples,
shapes and padding as in a single-process run and the store is the same bit for bit.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import ConfigError
from storage import Layout


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; ``None`` for no sharding."""
    if text is None or text == "":
        return None
    index, slash, count = str(text).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not slash or n < 1 or not 0 <= i < n:
        raise ConfigError(
            f"--shard {text!r}: expected I/N with 0 <= I < N (worker I of N, e.g. 0/4 ... 3/4)"
        )
    return i, n


def window_shards(window_rows: int, shard_rows: int) -> int:
    """Whole shards in a window (at least one)."""
    return max(1, window_rows // shard_rows)


def aligned_window_rows(window_rows: int, shard_rows: int) -> int:
    """Round a window down to whole shards (at least one)."""
    return window_shards(window_rows, shard_rows) * shard_rows


def owned_shards(layout: Layout, window_rows: int, shard: tuple[int, int] | None) -> np.ndarray:
    """Boolean mask of the shards worker ``shard = (I, N)`` writes (all of them for ``None``)."""
    every = np.arange(layout.n_shards)
    if shard is None:
        return np.ones(layout.n_shards, dtype=bool)
    per_window = window_shards(window_rows, layout.shard_rows)
    index, count = shard
    return (every // per_window) % count == index


def n_windows(layout: Layout, window_rows: int) -> int:
    return max(1, -(-layout.n_rows // window_rows))

"""Per-layer statistics of stored hidden states, computed from per-row partial sums.

Stage one computes, for every stored row and layer, ``sum``, ``sum of squares``, ``min`` and
``max`` over the hidden dimension (float32, before the stored cast). Each shard folds its rows
into one float64 record; the store's statistics fold the shard records in shard order, so a
resumed store gets exactly the same numbers as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from storage.schema import Layout


def shard_stats(rows: np.ndarray) -> np.ndarray:
    """``(R, L, 4)`` per-row partials -> ``(L, 4)`` float64 record for one shard."""
    r = rows.astype(np.float64)
    return np.stack(
        [r[:, :, 0].sum(0), r[:, :, 1].sum(0), r[:, :, 2].min(0), r[:, :, 3].max(0)], axis=-1
    )


def merge_shard_stats(progress: np.ndarray, layout: Layout) -> dict[str, Any]:
    """``(n_shards, L, 4)`` shard records -> JSON statistics per layer."""
    count = float(layout.n_rows) * layout.hidden_size
    out: dict[str, Any] = {}
    for j, layer in enumerate(layout.layers):
        total, total_sq = float(progress[:, j, 0].sum()), float(progress[:, j, 1].sum())
        mean = total / count
        var = max(total_sq / count - mean * mean, 0.0)
        out[str(layer)] = {
            "mean": mean,
            "std": var**0.5,
            "min": float(progress[:, j, 2].min()),
            "max": float(progress[:, j, 3].max()),
            "rms": (total_sq / count) ** 0.5,
        }
    return out

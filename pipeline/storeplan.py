"""What stage one will write: the store's layout, the batch plan's settings, the identity the
store records, and the announcement of the planned work and its size on disk."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.backbone import Backbone, device_numerics
from pipeline.data import TextData, describe
from pipeline.settings import AUTO_BATCH_COST
from pipeline.shards import aligned_window_rows
from pipeline.tokens import BATCH_COST, PlanSettings, Tokenized, padding_fraction
from storage import Layout, itemsize, parse_codec

if TYPE_CHECKING:
    from pipeline.cache import CacheConfig

log = logging.getLogger(__name__)
EXPECTED_RATIO = {"float32": 1.1, "float16": 1.1, "bfloat16": 1.35, "int8": 1.2}


def chunk_rows_for(row_bytes: int, chunk_mb: float) -> int:
    """Largest power of two of rows that fits ``chunk_mb`` (at least 256 rows)."""
    rows = max(256, int(chunk_mb * (1 << 20)) // max(1, row_bytes))
    return 1 << (rows.bit_length() - 1)


def build_layout(
    cfg: CacheConfig, tok: Tokenized, bb: Backbone, layers: list[int], labels: np.ndarray
) -> Layout:
    rows_per = tok.lengths if cfg.positions == "all" else np.ones(len(tok.lengths), np.int64)
    chunk = chunk_rows_for(bb.hidden_size * itemsize(cfg.dtype), cfg.chunk_mb)
    return Layout(
        n_samples=len(tok.lengths),
        n_tokens=int(tok.offsets[-1]),
        n_rows=int(rows_per.sum()),
        layers=layers,
        hidden_size=bb.hidden_size,
        positions=cfg.positions,
        dtype=cfg.dtype,
        codec=parse_codec(cfg.codec),
        chunk_rows=chunk,
        shard_rows=chunk * cfg.shard_chunks,
        has_token_type_ids=tok.type_ids is not None,
        label_dtype="float32" if labels.dtype.kind == "f" else "int64",
    )


@dataclass(frozen=True)
class PlanDefaults:
    """What stage one plans with where ``--token-budget``, ``--max-batch``, ``--window-mb`` are
    left at 0 and ``--batch-cost`` at ``auto``."""

    token_budget: int
    max_batch: int
    batch_cost: int | None
    window_mb: float


# By device type. A CPU keeps its caches warm with small batches, and its measured cost of one
# more batch is BATCH_COST slots. On a GPU a forward pass has a fixed host cost of thousands of
# token slots (benchmarks.stage_one_profile), so batches are big, cut where padding plus 4096
# slots per batch is least, inside larger sort windows (less padding, more shards to compress at
# once; a GPU host has the memory).
PLAN_DEFAULTS = {
    "cpu": PlanDefaults(token_budget=4096, max_batch=256, batch_cost=BATCH_COST, window_mb=512.0),
    "cuda": PlanDefaults(token_budget=65536, max_batch=4096, batch_cost=4096, window_mb=2048.0),
}


def plan_defaults(cfg: CacheConfig, device: torch.device) -> PlanDefaults:
    """``cfg``'s planning settings on ``device``, the device's defaults where left unset."""
    auto = PLAN_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    return PlanDefaults(
        token_budget=cfg.token_budget or auto.token_budget,
        max_batch=cfg.max_batch or auto.max_batch,
        batch_cost=auto.batch_cost if cfg.batch_cost == AUTO_BATCH_COST else cfg.batch_cost,
        window_mb=cfg.window_mb or auto.window_mb,
    )


def plan_settings(
    cfg: CacheConfig, bb: Backbone, n_layers: int, shard_rows: int | None = None
) -> PlanSettings:
    """Windows of ``--window-mb``; given ``shard_rows``, rounded down to whole shards and
    aligned to them (what stage one uses, so ``--shard I/N`` workers can split the plan)."""
    plan = plan_defaults(cfg, bb.device)
    row_bytes = bb.hidden_size * itemsize(cfg.dtype) * n_layers
    window_rows = max(1, int(plan.window_mb * (1 << 20)) // row_bytes)
    limits = (plan.token_budget, plan.max_batch)
    if shard_rows is None:
        return PlanSettings(*limits, int(window_rows), batch_cost=plan.batch_cost)
    rows = aligned_window_rows(int(window_rows), shard_rows)
    return PlanSettings(*limits, rows, aligned=True, batch_cost=plan.batch_cost)


def identity(
    cfg: CacheConfig, bb: Backbone, data: TextData, plan: PlanSettings, max_length: int
) -> dict[str, Any]:
    return {
        "backbone": bb.identity,
        "tokenizer": dict(bb.tokenizer_identity, max_length=max_length),
        "dataset": describe(data),
        "extraction": {
            "token_budget": plan.token_budget,
            "max_batch": plan.max_batch,
            "batch_cost": plan.batch_cost,
            "window_rows": plan.window_rows,
            "windows": "aligned" if plan.aligned else "chained",
            "device": bb.device.type,
            "autocast": "bfloat16" if bb.device.type == "cuda" else None,
            "torch": torch.__version__.split("+")[0],
            "numerics": device_numerics(bb.device),
            "lst_prune": cfg.lst_prune,
            # only where not the default, so joint stores keep the identity they always had
            **({"pairs": cfg.pairs} if cfg.pairs != "joint" else {}),
        },
    }


def row_offsets(tok: Tokenized, positions: str) -> np.ndarray:
    if positions == "all":
        return tok.offsets
    return np.arange(len(tok.lengths) + 1, dtype=np.int64)


def announce(cfg: CacheConfig, layout: Layout, tok: Tokenized, batches: list[np.ndarray]) -> None:
    raw = layout.n_rows * row_bytes(layout)
    est = raw / EXPECTED_RATIO[layout.dtype]
    log.info(
        "planned: %d samples, %d tokens, %d batches (%.1f%% padding), layers %s, positions %s, "
        "dtype %s -> %d rows x %d; raw %.1f MB, about %.1f MB on disk at %s",
        layout.n_samples,
        layout.n_tokens,
        len(batches),
        100 * padding_fraction(batches, tok.lengths),
        layout.layers,
        layout.positions,
        layout.dtype,
        layout.n_rows,
        layout.hidden_size,
        raw / 1e6,
        est / 1e6,
        cfg.out,
    )


def row_bytes(layout: Layout) -> int:
    """Raw bytes of one stored row across every stored layer (what ``--window-mb`` counts)."""
    return layout.hidden_size * itemsize(layout.dtype) * len(layout.layers)


def shard_bytes_estimate(layout: Layout) -> float:
    """Expected bytes on disk of one full shard of every stored layer."""
    return layout.shard_rows * row_bytes(layout) / EXPECTED_RATIO[layout.dtype]

"""Stage one: run the frozen backbone once over a split and stream its hidden states to a store.

text -> :func:`pipeline.data.load_data` -> :func:`pipeline.tokens.tokenize` ->
:func:`pipeline.tokens.plan_batches` -> :func:`pipeline.extract.extract_rows` (backbone on the
device, gather, cast) -> :class:`storage.StoreWriter` (compress and write on worker threads).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Generator
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.backbone import Backbone, cpu_numerics, load_backbone, parse_layers, thread_invariant
from pipeline.cache_errors import check_writable, free_bytes, resume_hint, write_failure
from pipeline.data import head, load_data
from pipeline.errors import ConfigError
from pipeline.extract import (
    PendingRows,
    extract_rows,
    in_flight,
    in_streams,
    launch_rows,
    make_batch,
)
from pipeline.pairs import SEPARATE, check_pair_data, check_pairs, pieces, tokenize_separate
from pipeline.pairs import resolve as resolve_pairs
from pipeline.prune import lst_prune
from pipeline.settings import AUTO_BATCH_COST, CacheConfig
from pipeline.shards import n_windows, owned_shards, parse_shard, window_shards
from pipeline.storeplan import (
    announce,
    build_layout,
    identity,
    plan_defaults,
    plan_settings,
    row_offsets,
    shard_bytes_estimate,
)
from pipeline.tokens import Tokenized, plan_batches, tokenize
from storage import (
    WHOLE,
    BatchRows,
    Layout,
    SidecacheError,
    StoreExistsError,
    claim,
    create_store,
    finalize_store,
    meta_lock,
    open_store,
    parse_codec,
    parse_dtype,
    parse_positions,
    shard_slot,
)

log = logging.getLogger(__name__)
# finished batches the streams may hold ahead of the writer, as a share of a sort window's rows.
# A window's shards all fill with its last batch, so the writer then compresses a whole window
# at once and the main thread waits for its buffers; with work queued the streams keep both
# cores busy meanwhile (MiniLM on SST-2 in 1 GB windows, `stage_one_ablation --trace`: 0-0.23
# idle core-s in stretches below 1.6 cores at each window end, against 0.36-0.52 with one batch
# ahead). The extra memory is at most this share of the window's (512 MB: 64 MB).
AHEAD_SHARE = 1 / 8
# CUDA: batches launched on the device ahead of the one whose rows are being written
IN_FLIGHT = 3


def validate(cfg: CacheConfig) -> None:
    """Fail on malformed flags before anything slow is loaded."""
    parse_dtype(cfg.dtype)
    check_pairs(cfg.pairs, parse_positions(cfg.positions))
    parse_codec(cfg.codec)
    if cfg.max_length is not None and cfg.max_length < 2:
        raise ConfigError(f"--max-length must be at least 2, found {cfg.max_length}")
    if cfg.token_budget < 0 or cfg.max_batch < 0:
        raise ConfigError(
            "--token-budget and --max-batch must be positive (or 0: the device's default); "
            f"found {cfg.token_budget} and {cfg.max_batch}"
        )
    if cfg.streams < 1 or cfg.writer_threads < 0:
        raise ConfigError(
            f"--streams must be 1 or more and --writer-threads 0 (auto) or more, found "
            f"{cfg.streams} and {cfg.writer_threads}"
        )
    if cfg.batch_cost is not None and cfg.batch_cost < 0 and cfg.batch_cost != AUTO_BATCH_COST:
        raise ConfigError(f"--batch-cost must be 0 or more token slots, found {cfg.batch_cost}")
    if parse_shard(cfg.shard) is not None and cfg.overwrite:
        raise ConfigError(
            "--overwrite cannot be combined with --shard (one worker would delete the others' "
            "shards): delete the old store first, or run once without --shard"
        )


def run_cache(cfg: CacheConfig) -> dict[str, Any]:
    """Stage one end to end; returns the store summary. Resumes an interrupted store.

    Holds a claim on ``cfg.out`` for the whole run (:mod:`storage.claims`): a second process on
    the same store, or on the same ``--shard``, stops with :class:`StoreBusyError`.
    """
    validate(cfg)
    check_writable(cfg.out)
    shard = parse_shard(cfg.shard)
    slot = WHOLE if shard is None else shard_slot(*shard)
    with claim(cfg.out, slot):
        if cfg.finalize:
            with meta_lock(cfg.out):
                finalize_store(cfg.out)
            return open_store(cfg.out).summary()
        return _run_cache(cfg, shard)


def _run_cache(cfg: CacheConfig, shard: tuple[int, int] | None) -> dict[str, Any]:
    cfg.dtype, cfg.positions = parse_dtype(cfg.dtype), parse_positions(cfg.positions)
    validate(cfg)
    data = head(load_data(cfg.data, cfg.split, cfg.columns), cfg.limit)
    bb = load_backbone(cfg.backbone, cfg.device, cfg.revision)
    cfg.pairs = resolve_pairs(cfg.pairs, data, str(bb.identity["pooling"]), cfg.positions)
    if cfg.pairs == SEPARATE:
        check_pair_data(data)
    layers = parse_layers(cfg.layers, bb.n_layers)
    if bb.device.type == "cpu" and not thread_invariant(numerics := cpu_numerics()):
        log.warning(
            "MKL computes in mode %s, not strict: the stored values depend on the thread count "
            "and `sidecache verify` will compare them with a tolerance. MKL fixes its mode at "
            "its first call: import pipeline before running torch, or set MKL_CBWR=AUTO,STRICT",
            numerics["mkl"],
        )
    max_length = min(cfg.max_length or bb.max_length, bb.max_length)
    if cfg.max_length and cfg.max_length > bb.max_length:
        log.warning(
            "--max-length %d exceeds the backbone's limit; using %d", cfg.max_length, max_length
        )
    # the store's samples; and the sequences the backbone runs, which are the samples, or with
    # --pairs separate each sentence of a pair (pipeline.pairs: batches are then of sentences)
    if cfg.pairs == SEPARATE:
        tok = tokenize_separate(bb.tokenizer, data, max_length)
        seqs = pieces(tok, bb.takes_token_type_ids)
    else:
        tok = seqs = tokenize(bb.tokenizer, data, max_length, bb.takes_token_type_ids)
    layout = build_layout(cfg, tok, bb, layers, data.labels)
    plan = plan_settings(cfg, bb, len(layers), layout.shard_rows)
    batches = plan_batches(seqs.lengths, np.diff(row_offsets(seqs, cfg.positions)), plan)
    announce(cfg, layout, seqs, batches)
    owned = owned_shards(layout, plan.window_rows, shard)
    if shard is not None:
        windows = n_windows(layout, plan.window_rows)
        log.info("shard worker %d/%d: %d of %d shards (%d windows in all)", shard[0], shard[1],
                 int(owned.sum()), layout.n_shards, windows)  # fmt: skip
        if windows < shard[1]:
            log.warning("only %d windows for %d workers: some have nothing to do; lower "
                        "--window-mb to split the work finer", windows, shard[1])  # fmt: skip
    arrays = {
        "offsets": row_offsets(tok, cfg.positions),
        "token_offsets": tok.offsets,
        "token_ids": tok.ids,
        "labels": data.labels,
    }
    if tok.type_ids is not None:
        arrays["token_type_ids"] = tok.type_ids
    if cfg.lst_prune:
        arrays.update(lst_prune(bb, cfg.lst_prune))
    ident = identity(cfg, bb, data, plan, max_length)
    try:
        per_window = window_shards(plan.window_rows, layout.shard_rows)
        units = None if seqs is tok else row_offsets(seqs, cfg.positions)
        return _write(cfg, layout, seqs, bb, layers, batches, ident, data.task, arrays, owned,
                      per_window, units)  # fmt: skip
    except OSError as exc:
        if isinstance(exc, SidecacheError):
            raise
        raise write_failure(exc, cfg.out, layout) from exc


def _write(
    cfg: CacheConfig,
    layout: Layout,
    tok: Tokenized,
    bb: Backbone,
    layers: list[int],
    batches: list[np.ndarray],
    ident: dict[str, Any],
    task: dict[str, Any],
    arrays: dict[str, np.ndarray],
    owned: np.ndarray,
    window_shards: int,
    units: np.ndarray | None = None,
) -> dict[str, Any]:
    """Create or resume the store and stream every needed batch into it. The writer keeps at
    most one sort window's shard buffers while shards are being written (``buffers``).

    ``tok`` and ``batches`` are the sequences the backbone runs: the store's samples, or with
    ``units`` (their row offsets) other consecutive row ranges, the sentences of
    ``--pairs separate``."""
    with meta_lock(cfg.out):  # shard workers starting together: one creates, the rest resume
        try:
            writer = create_store(cfg.out, layout, ident, task, arrays, overwrite=cfg.overwrite,
                                  threads=writer_threads(cfg.writer_threads, bb.device),
                                  buffers=window_shards)  # fmt: skip
        except StoreExistsError as exc:
            raise resume_hint(exc, layout) from None
    if writer is None:
        log.info("%s is already complete for these settings; nothing to do", cfg.out)
        return open_store(cfg.out).summary()
    started = time.perf_counter()
    if units is not None:
        writer.by_units(units)
    writer.own(owned)
    needed = writer.needed_samples()
    _check_space(cfg.out, layout, int(writer.done.sum()))
    todo = [s for s in batches if needed[s].any()]  # the rest are in shards already on disk

    def rows_of(samples: np.ndarray) -> BatchRows:
        # in store order, so each shard's rows are one slice of the batch for the writer (a
        # batch's results do not depend on the order of its samples)
        batch = make_batch(tok, np.sort(samples), bb.device)
        return extract_rows(bb, batch, layers, cfg.positions, cfg.dtype)

    def launch(samples: np.ndarray) -> PendingRows:
        batch = make_batch(tok, np.sort(samples), bb.device)
        return launch_rows(bb, batch, layers, cfg.positions, cfg.dtype)

    limits = plan_defaults(cfg, bb.device)
    batch_rows = limits.token_budget if cfg.positions == "all" else limits.max_batch  # at most
    ahead = int(AHEAD_SHARE * window_shards * layout.shard_rows) // batch_rows  # at least 1
    # CUDA: batches queued on the device while the host writes; CPU: batches on threads
    stream: Generator[BatchRows, None, None] = (
        in_flight(launch, todo, IN_FLIGHT) if bb.device.type == "cuda"
        else in_streams(rows_of, todo, cfg.streams, ahead)
    )  # fmt: skip
    bar = tqdm(total=int(tok.lengths[needed].sum()), unit="tok", unit_scale=True,
               desc="stage one", disable=not cfg.progress)  # fmt: skip
    try:
        with contextlib.closing(stream) as results:
            for rows in results:
                writer.put(rows)
                bar.update(int(tok.lengths[rows.samples].sum()))
        everything = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    log.info("stage one finished in %.1f s", time.perf_counter() - started)
    return _finish(cfg.out, everything, int((~writer.done).sum()))


def writer_threads(wanted: int, device: torch.device) -> int:
    """``--writer-threads``, or by default: 2 on CPU, where the backbone's streams need the
    cores, and every usable core but two on CUDA, where compression is the host's only work."""
    if wanted > 0:
        return wanted
    if device.type != "cuda":
        return 2
    return max(2, len(os.sched_getaffinity(0)) - 2)


def _check_space(out: str, layout: Layout, done_before: int) -> None:
    """Say what is resumed, and warn when the rest will not fit on the disk."""
    if done_before:
        log.info("resuming: %d of %d shards already on disk", done_before, layout.n_shards)
    need = (layout.n_shards - done_before) * shard_bytes_estimate(layout)
    free = free_bytes(out)
    if free is not None and need > free:
        log.warning(
            "about %.1f MB is still to be written to %s but only %.1f MB is free there; stage one "
            "stops with DiskFullError if the disk fills (free space, then re-run to resume)",
            need / 1e6, out, free / 1e6,
        )  # fmt: skip


def _finish(out: str, everything: bool, others: int) -> dict[str, Any]:
    """The last shard worker to finish (or a whole run) finalises the store."""
    if everything:
        with meta_lock(out):
            finalize_store(out)
    else:
        log.info("this worker's shards are on disk; %d shards still belong to other workers (the "
                 "last one to finish finalises the store)", others)  # fmt: skip
    return open_store(out, allow_incomplete=True).summary()

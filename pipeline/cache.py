"""Stage one: run the frozen backbone once over a split and stream its hidden states to a store.

text -> :func:`pipeline.data.load_data` -> :func:`pipeline.tokens.tokenize` ->
:func:`pipeline.tokens.plan_batches` -> :func:`pipeline.extract.extract_rows` (backbone on the
device, gather, cast) -> :class:`storage.StoreWriter` (compress and write on worker threads).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.backbone import (
    Backbone,
    cpu_numerics,
    load_backbone,
    parse_layers,
    thread_invariant,
)
from pipeline.data import ColumnOptions, TextData, describe, head, load_data
from pipeline.errors import ConfigError
from pipeline.extract import extract_rows, in_streams, make_batch
from pipeline.prune import lst_prune
from pipeline.shards import (
    aligned_window_rows,
    n_windows,
    owned_shards,
    parse_shard,
    window_shards,
)
from pipeline.tokens import (
    BATCH_COST,
    PlanSettings,
    Tokenized,
    padding_fraction,
    plan_batches,
    tokenize,
)
from storage import (
    WHOLE,
    BatchRows,
    DiskFullError,
    Layout,
    SidecacheError,
    StoreExistsError,
    StoreWriteError,
    claim,
    create_store,
    finalize_store,
    itemsize,
    locate,
    meta_lock,
    open_store,
    parse_codec,
    parse_dtype,
    parse_positions,
    shard_slot,
)

log = logging.getLogger(__name__)
EXPECTED_RATIO = {"float32": 1.1, "float16": 1.1, "bfloat16": 1.35, "int8": 1.2}
# finished batches the streams may hold ahead of the writer, as a share of a sort window's rows.
# A window's shards all fill with its last batch, so the writer then compresses a whole window
# at once and the main thread waits for its buffers; with work queued the streams keep both
# cores busy meanwhile (MiniLM on SST-2 in 1 GB windows, `stage_one_ablation --trace`: 0-0.23
# idle core-s in stretches below 1.6 cores at each window end, against 0.36-0.52 with one batch
# ahead). The extra memory is at most this share of the window's (512 MB: 64 MB).
AHEAD_SHARE = 1 / 8


@dataclass
class CacheConfig:
    """Everything ``sidecache cache`` takes; sizes have working defaults."""

    backbone: str
    data: str
    split: str
    out: str
    layers: str = "all"
    positions: str = "all"
    dtype: str = "bfloat16"
    codec: str = "blosc-lz4:5"
    max_length: int | None = None
    device: str = "auto"
    overwrite: bool = False
    revision: str | None = None
    limit: int | None = None
    lst_prune: int | None = None  # also store LST's pruned-backbone initialisation for d/r
    columns: ColumnOptions = field(default_factory=ColumnOptions)
    token_budget: int = 4096
    max_batch: int = 256
    # what one more batch costs the backbone, in padded token slots: batches are cut where slots
    # plus this per batch are least (pipeline.tokens.PlanSettings.batch_cost); None: fill each
    # batch to the budget, as stores written before this setting (to resume one of those)
    batch_cost: int | None = BATCH_COST
    # samples are length-sorted within windows of this many stored MB, which stage one holds
    # in RAM until written. MiniLM on SST-2: 0.57% padding (1 GB: 0.31%, 256 MB: 1.7%); half of
    # 1 GB's fresh memory, which costs more than the padding saved (`stage_one_ablation
    # --window-mb 1024 --arms stage,halfwindow`), and less to compress after the last batch
    window_mb: float = 512.0
    chunk_mb: float = 4.0
    shard_chunks: int = 8
    writer_threads: int = 2
    # batches run through the backbone at once on CPU, each on its own thread with its share of
    # torch's threads (pipeline.extract.in_streams); always 1 on CUDA
    streams: int = 2
    progress: bool = True
    shard: str | None = None  # "I/N": write only worker I's shards of N (pipeline.shards)
    finalize: bool = False  # only finalise a store whose shards are all written


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


def plan_settings(
    cfg: CacheConfig, bb: Backbone, n_layers: int, shard_rows: int | None = None
) -> PlanSettings:
    """Windows of ``--window-mb``; given ``shard_rows``, rounded down to whole shards and
    aligned to them (what stage one uses, so ``--shard I/N`` workers can split the plan)."""
    row_bytes = bb.hidden_size * itemsize(cfg.dtype) * n_layers
    window_rows = max(1, int(cfg.window_mb * (1 << 20)) // row_bytes)
    if shard_rows is None:
        return PlanSettings(cfg.token_budget, cfg.max_batch, int(window_rows),
                            batch_cost=cfg.batch_cost)  # fmt: skip
    rows = aligned_window_rows(int(window_rows), shard_rows)
    return PlanSettings(cfg.token_budget, cfg.max_batch, rows, aligned=True,
                        batch_cost=cfg.batch_cost)  # fmt: skip


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
            "numerics": cpu_numerics() if bb.device.type == "cpu" else None,
            "lst_prune": cfg.lst_prune,
        },
    }


def validate(cfg: CacheConfig) -> None:
    """Fail on malformed flags before anything slow is loaded."""
    parse_dtype(cfg.dtype)
    parse_positions(cfg.positions)
    parse_codec(cfg.codec)
    if cfg.max_length is not None and cfg.max_length < 2:
        raise ConfigError(f"--max-length must be at least 2, found {cfg.max_length}")
    if cfg.token_budget < 1 or cfg.max_batch < 1:
        raise ConfigError("--token-budget and --max-batch must be positive")
    if cfg.streams < 1 or cfg.writer_threads < 1:
        raise ConfigError(
            f"--streams and --writer-threads must be 1 or more, found {cfg.streams} and "
            f"{cfg.writer_threads}"
        )
    if cfg.batch_cost is not None and cfg.batch_cost < 0:
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
    tok = tokenize(bb.tokenizer, data, max_length, bb.takes_token_type_ids)
    layout = build_layout(cfg, tok, bb, layers, data.labels)
    plan = plan_settings(cfg, bb, len(layers), layout.shard_rows)
    batches = plan_batches(tok.lengths, np.diff(_row_offsets(tok, cfg.positions)), plan)
    _announce(cfg, layout, tok, batches)
    owned = owned_shards(layout, plan.window_rows, shard)
    if shard is not None:
        windows = n_windows(layout, plan.window_rows)
        log.info("shard worker %d/%d: %d of %d shards (%d windows in all)", shard[0], shard[1],
                 int(owned.sum()), layout.n_shards, windows)  # fmt: skip
        if windows < shard[1]:
            log.warning("only %d windows for %d workers: some have nothing to do; lower "
                        "--window-mb to split the work finer", windows, shard[1])  # fmt: skip
    arrays = {
        "offsets": _row_offsets(tok, cfg.positions),
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
        return _write(
            cfg, layout, tok, bb, layers, batches, ident, data.task, arrays, owned, per_window
        )
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
) -> dict[str, Any]:
    """Create or resume the store and stream every needed batch into it. The writer keeps at
    most one sort window's shard buffers while shards are being written (``buffers``)."""
    with meta_lock(cfg.out):  # shard workers starting together: one creates, the rest resume
        try:
            writer = create_store(
                cfg.out,
                layout,
                ident,
                task,
                arrays,
                overwrite=cfg.overwrite,
                threads=cfg.writer_threads,
                buffers=window_shards,
            )
        except StoreExistsError as exc:
            raise resume_hint(exc, layout) from None
    if writer is None:
        log.info("%s is already complete for these settings; nothing to do", cfg.out)
        return open_store(cfg.out).summary()
    started = time.perf_counter()
    writer.own(owned)
    needed = writer.needed_samples()
    done_before = int(writer.done.sum())
    if done_before:
        log.info("resuming: %d of %d shards already on disk", done_before, layout.n_shards)
    need = (layout.n_shards - done_before) * shard_bytes_estimate(layout)
    free = _free_bytes(cfg.out)
    if free is not None and need > free:
        log.warning(
            "about %.1f MB is still to be written to %s but only %.1f MB is free there; stage one "
            "stops with DiskFullError if the disk fills (free space, then re-run to resume)",
            need / 1e6, cfg.out, free / 1e6,
        )  # fmt: skip
    bar = tqdm(
        total=int(tok.lengths[needed].sum()),
        unit="tok",
        unit_scale=True,
        desc="stage one",
        disable=not cfg.progress,
    )
    todo = [s for s in batches if needed[s].any()]  # the rest are in shards already on disk

    def rows_of(samples: np.ndarray) -> BatchRows:
        # in store order, so each shard's rows are one slice of the batch for the writer (a
        # batch's results do not depend on the order of its samples)
        batch = make_batch(tok, np.sort(samples), bb.device)
        return extract_rows(bb, batch, layers, cfg.positions, cfg.dtype)

    streams = cfg.streams if bb.device.type == "cpu" else 1
    batch_rows = cfg.token_budget if cfg.positions == "all" else cfg.max_batch  # at most
    ahead = int(AHEAD_SHARE * window_shards * layout.shard_rows) // batch_rows  # at least 1
    try:
        with contextlib.closing(in_streams(rows_of, todo, streams, ahead)) as results:
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
    if everything:  # the last shard worker to finish (or a whole run) finalises the store
        with meta_lock(cfg.out):
            finalize_store(cfg.out)
    else:
        log.info("this worker's shards are on disk; %d shards still belong to other workers (the "
                 "last one to finish finalises the store)", int((~writer.done).sum()))  # fmt: skip
    return open_store(cfg.out, allow_incomplete=True).summary()


# the flags that fix the batch plan, by the key a store records each under (identity.extraction)
PLAN_FLAGS = {
    "token_budget": "--token-budget",
    "max_batch": "--max-batch",
    "batch_cost": "--batch-cost",
    "window_rows": "--window-mb",
}


# a store's recorded CPU numerics, and the variables that reproduce them (torch's vector
# instructions can be lowered, never raised, on a given CPU; MKL's mode is read at its first call)
NUMERICS_ENV = {"cpu_capability": "ATEN_CPU_CAPABILITY", "mkl": "MKL_CBWR"}


def resume_hint(exc: StoreExistsError, layout: Layout) -> StoreExistsError:
    """``exc`` plus what resumes the existing store, when it differs from this run only in how
    the batches are planned (as after a default changed between versions: the flags) or in the
    CPU numerics it was begun with (another machine, another MKL mode: the environment)."""
    plan = {f"identity.extraction.{name}" for name in PLAN_FLAGS}
    numerics = {f"identity.extraction.numerics.{name}" for name in NUMERICS_ENV}
    if not exc.differences or any(
        key not in plan | numerics or (key in numerics and was is None)  # no MKL: no variable
        for key, was, _ in exc.differences
    ):
        return exc
    flags, env = [], []
    for key, was, _ in exc.differences:
        name = key.rpartition(".")[2]
        if key in numerics:  # torch's variable takes lower case (avx2); MKL's default is unset
            value = str(was).lower() if name == "cpu_capability" else was
            value = "" if value == "OFF" else value
            env.append(f"{NUMERICS_ENV[name]}={shlex.quote(str(value))}")
        elif name == "window_rows":  # exactly this many rows again (whole shards already)
            flags.append(f"--window-mb {int(was) * row_bytes(layout) / (1 << 20)!r}")
        else:
            flags.append(f"{PLAN_FLAGS[name]} {'fill' if was is None else was}")
    how = []
    if flags:
        how.append(f"run the same command with {' '.join(flags)} (the settings it was written "
                   "with)")  # fmt: skip
    if env:
        how.append(f"run it with {' '.join(env)} in the environment (the numerics it was begun "
                   "with), on a CPU that has them")  # fmt: skip
    return StoreExistsError(f"{exc}. To resume or reuse it instead, {'; and '.join(how)}",
                            exc.differences)  # fmt: skip


def row_bytes(layout: Layout) -> int:
    """Raw bytes of one stored row across every stored layer (what ``--window-mb`` counts)."""
    return layout.hidden_size * itemsize(layout.dtype) * len(layout.layers)


def shard_bytes_estimate(layout: Layout) -> float:
    """Expected bytes on disk of one full shard of every stored layer."""
    return layout.shard_rows * row_bytes(layout) / EXPECTED_RATIO[layout.dtype]


def _shards_on_disk(path: str, layout: Layout) -> int:
    try:
        arr: Any = open_store(path, allow_incomplete=True).group["progress"]
        progress = np.asarray(arr[...])
    except Exception:  # the store may not even have its metadata yet
        return 0
    return int(np.isfinite(progress).all(axis=(1, 2)).sum())


def _free_bytes(path: str) -> int | None:
    if locate(path).is_remote:
        return None
    for folder in (Path(path), *Path(path).absolute().parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def check_writable(path: str) -> None:
    """Refuse a local ``--out`` whose nearest existing folder cannot be written (read-only file
    system, no permission) before anything is claimed or computed."""
    if "://" in path:
        return
    folder = next((f for f in (Path(path), *Path(path).absolute().parents) if f.exists()), None)
    if folder is None or os.access(folder, os.W_OK):
        return
    code = errno.EROFS if os.statvfs(folder).f_flag & os.ST_RDONLY else errno.EACCES
    raise StoreWriteError(
        f"cannot write the store at {path}: {folder} is not writable ({os.strerror(code)}); "
        "expected a writable folder: choose another --out or fix its permissions"
    )


def _size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def write_failure(exc: OSError, path: str, layout: Layout) -> StoreWriteError:
    """Turn an ``OSError`` raised while writing the store into a named, actionable error."""
    done = _shards_on_disk(path, layout)
    todo = layout.n_shards - done
    free = _free_bytes(path)
    free_text = "unknown" if free is None else _size(free)
    kept = f"the {done} of {layout.n_shards} shards already on disk are kept and the store stays "
    kept += "incomplete; re-run the same command to resume"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        need = todo * shard_bytes_estimate(layout)
        return DiskFullError(
            f"the disk holding {path} is full ({exc.strerror}, writing {exc.filename or path}): "
            f"about {_size(need)} was still to be written ({todo} shards) and {free_text} "
            f"is free. Free at least that much space (or choose another --out); {kept}"
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreWriteError(
            f"cannot write the store at {path}: {exc.strerror} ({exc.filename or path}); expected "
            f"a writable folder: choose another --out or fix its permissions; {kept}"
        )
    return StoreWriteError(f"writing the store at {path} failed: {exc}; {kept}")


def _row_offsets(tok: Tokenized, positions: str) -> np.ndarray:
    if positions == "all":
        return tok.offsets
    return np.arange(len(tok.lengths) + 1, dtype=np.int64)


def _announce(cfg: CacheConfig, layout: Layout, tok: Tokenized, batches: list[np.ndarray]) -> None:
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

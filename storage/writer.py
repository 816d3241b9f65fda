"""Create a store and stream rows into it, whole shards at a time, on background threads.

The writer receives batches of rows in any sample order (stage one batches by length) and
scatters them into per-shard buffers at their final row positions. When a shard's last row
arrives, the shard is compressed and written on a worker thread; once every layer's part of the
shard is on disk its ``progress`` row is written. A resumed run skips every shard that has its
progress row, so the store ends up identical to an uninterrupted run as long as the caller feeds
the same batches.

Every chunk of every array is written as a file, all-zero ones too (``write_empty_chunks``), so
a reader can tell a deleted chunk file from a chunk equal to the fill value; finalisation records
a sha256 of every array's ``zarr.json`` (:mod:`storage.schema`, ``integrity``). A resumed run
first removes the temporary files a killed writer left behind (zarr's ``*.partial``, sidecache's
``.*.tmp``) unless another live writer holds a claim on the store and may be writing them.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.array_spec import ArrayConfigParams

from storage.claims import others_alive
from storage.codecs import STORED_DTYPES, compressors_for
from storage.errors import StoreExistsError, StoreIncompleteError, StoreSchemaError
from storage.location import Location, locate
from storage.schema import (
    INTEGRITY,
    STAT_FIELDS,
    Layout,
    canonical_sha256,
    check_metadata,
    make_metadata,
)
from storage.shardfile import ShardFile
from storage.stats import merge_shard_stats, shard_stats

log = logging.getLogger(__name__)
SMALL_CHUNK = 1 << 20  # elements per chunk of the small 1-D arrays
# every chunk becomes a file, all-zero ones too: a missing file is then always damage
EVERY_CHUNK: ArrayConfigParams = {"write_empty_chunks": True}


@dataclass
class BatchRows:
    """One batch of stage-one output, already cast to the stored dtype.

    ``samples[i]`` owns the next ``rows_per_sample[i]`` rows of every array, in order.
    """

    samples: np.ndarray  # (B,) int64 sample indices
    rows_per_sample: np.ndarray  # (B,) int64
    layers: list[np.ndarray]  # per stored layer: (R, d) stored dtype
    scales: list[np.ndarray] | None  # per stored layer: (R,) float32, int8 only
    stats: np.ndarray  # (R, n_layers, 4) float32: per-row sum, sumsq, min, max


def _open_group(where: str | Location, mode: str) -> zarr.Group:
    loc = locate(where)
    store = loc.zarr_store(read_only=mode == "r")
    return zarr.open_group(store, mode=mode, zarr_format=3)  # type: ignore[arg-type]


def array(group: zarr.Group, name: str) -> Any:
    """The array ``name`` of ``group`` (typed ``Any``: zarr's getitem returns Array | Group)."""
    return group[name]


def _existing_meta(loc: Location) -> dict[str, Any] | None:
    if not loc.exists():
        return None
    try:
        group = _open_group(loc, "r")
    except (FileNotFoundError, ValueError, zarr.errors.NodeTypeValidationError):
        return None
    meta = group.attrs.get("sidecache")
    return meta if isinstance(meta, dict) else None


def _differences(
    a: dict[str, Any], b: dict[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` for every leaf where ``a`` and ``b`` differ."""
    keys = sorted(set(a) | set(b))
    out: list[tuple[str, Any, Any]] = []
    for key in keys:
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, name + ".")
        elif va != vb:
            out.append((name, va, vb))
    return out


def create_store(
    path: str,
    layout: Layout,
    identity: dict[str, Any],
    task: dict[str, Any],
    arrays: dict[str, np.ndarray],
    *,
    overwrite: bool = False,
    threads: int = 2,
    buffers: int | None = None,
) -> StoreWriter | None:
    """Create (or resume) the store at ``path``; ``None`` when an identical store is complete.

    ``arrays`` holds the small per-sample arrays: ``offsets``, ``token_offsets``,
    ``token_ids``, ``labels`` and, when the layout says so, ``token_type_ids``; any other entry
    is stored as is (e.g. ``lst_init/...``). A resumed store keeps the arrays it has.
    ``buffers``: see :class:`StoreWriter`.
    """
    target = locate(path)
    meta = make_metadata(layout, identity, task)
    existing = _existing_meta(target)
    if existing is not None and not overwrite:
        check_metadata(existing, path)
        diffs = []
        for key in ("layout", "identity", "task"):
            diffs += _differences(existing[key], meta[key], key + ".")
        if diffs:
            shown = "; ".join(f"{k}: existing {was!r}, new {now!r}" for k, was, now in diffs[:5])
            raise StoreExistsError(
                f"{path} already holds a store written with different settings ({shown}); "
                "pass --overwrite to replace it, or choose another --out",
                diffs,
            )
        if existing.get("complete"):
            return None
        if existing.get("initialized"):
            log.info("resuming the incomplete store at %s", path)
            remove_stale_files(target)
            return StoreWriter(path, layout, threads=threads, buffers=buffers)
        log.info("%s was interrupted while being created; starting it again", path)
        overwrite = True
    elif not overwrite and not target.is_empty():
        raise StoreExistsError(
            f"{path} exists and is not a sidecache store; refusing to write into it. "
            "Pass --overwrite to replace it, or choose another --out"
        )
    if overwrite:
        target.remove()
    _initialise(path, layout, meta, arrays)
    return StoreWriter(path, layout, threads=threads, buffers=buffers)


def _initialise(path: str, layout: Layout, meta: dict[str, Any], arrays: dict[str, Any]) -> None:
    group = _open_group(path, "w")
    group.attrs["sidecache"] = meta  # "initialized" stays false until every array exists
    zdtype = STORED_DTYPES[layout.dtype]
    for layer in layout.layers:
        group.create_array(
            f"hidden/{layer}",
            shape=(layout.n_rows, layout.hidden_size),
            dtype=zdtype,
            chunks=(layout.chunk_rows, layout.hidden_size),
            shards=(layout.shard_rows, layout.hidden_size),
            compressors=compressors_for(layout.codec, zdtype),
            fill_value=0,
            dimension_names=["row", "channel"],
            config=EVERY_CHUNK,
        )
        if layout.dtype == "int8":
            group.create_array(
                f"scales/{layer}",
                shape=(layout.n_rows,),
                dtype="float32",
                chunks=(layout.chunk_rows,),
                shards=(layout.shard_rows,),
                compressors=compressors_for(layout.codec, "float32"),
                fill_value=0,
                dimension_names=["row"],
                config=EVERY_CHUNK,
            )
    group.create_array(
        "progress",
        shape=(layout.n_shards, len(layout.layers), len(STAT_FIELDS)),
        dtype="float64",
        chunks=(1, len(layout.layers), len(STAT_FIELDS)),
        compressors=compressors_for(layout.codec, "float64"),
        fill_value=float("nan"),
        dimension_names=["shard", "layer", "stat"],
        config=EVERY_CHUNK,
    )
    required = ["offsets", "token_offsets", "token_ids", "labels"]
    if layout.has_token_type_ids:
        required.append("token_type_ids")
    missing = [name for name in required if name not in arrays]
    if missing:
        raise StoreSchemaError(f"cannot create {path}: arrays {missing} were not given")
    for name, value in arrays.items():  # the required ones plus any extras (e.g. lst_init/...)
        data = np.ascontiguousarray(value)
        chunks = (max(1, min(SMALL_CHUNK, data.shape[0])),) if data.ndim == 1 else data.shape
        small = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            compressors=compressors_for(layout.codec, str(data.dtype)),
            fill_value=0,
            config=EVERY_CHUNK,  # an all-zero chunk of labels or segment ids is a file too
        )
        small[...] = data
    meta = dict(meta, initialized=True)
    meta[INTEGRITY] = {"all_chunks_written": True}
    group.attrs["sidecache"] = meta


def small_pages(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array on its own anonymous mapping, in small (4 kB) pages.

    ``np.empty`` asks the kernel for transparent huge pages for any array of 4 MB or more
    (numpy's ``madvise_hugepage``, on by default). A shard buffer is first touched a few rows at
    a time all over (a length-sorted window's batch lands in every shard of the window), so
    with huge pages the first batch or two fault in, zero and (with ``defrag=madvise``, the
    usual setting) compact the first window's whole memory at once while the main thread, and
    soon the backbone's streams waiting on it, stand still: filling 1 GB of fresh buffers
    through ``put`` takes 2.0 s against 0.8 s in small pages (``benchmarks/shard_buffers.py``),
    and stage one on 20k SST-2 sentences 0.7-0.9 s less wall time for the same CPU time (its
    ablation's ``hugepages`` arm). The mapping goes back to the system when the array is freed.
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size == 0:
        return np.empty(shape, dtype)
    area = mmap.mmap(-1, size)
    advice = getattr(mmap, "MADV_NOHUGEPAGE", None)  # Linux; elsewhere the default pages
    if advice is not None:
        with contextlib.suppress(OSError):  # EINVAL on a kernel built without huge pages
            area.madvise(advice)
    return np.frombuffer(area, dtype=dtype).reshape(shape)


class _Shard:
    """Rows of one shard being filled, in the stored dtype, until every row has arrived."""

    def __init__(self, rows: int, layout: Layout):
        zdtype = STORED_DTYPES[layout.dtype]
        n = len(layout.layers)
        self.layers = [small_pages((rows, layout.hidden_size), zdtype) for _ in range(n)]
        self.scales = (
            [small_pages((rows,), np.float32) for _ in range(n)] if layout.dtype == "int8" else None
        )
        self.stats = small_pages((rows, n, len(STAT_FIELDS)), np.float32)
        self.rows, self.filled = rows, 0


class _Countdown:
    """The parts of one shard still being written; thread-safe."""

    def __init__(self, n: int):
        self._left, self.all_ok, self._lock = n, True, threading.Lock()

    def done(self, ok: bool) -> bool:
        """Count one part as ended (``ok``: written); True for the last one."""
        with self._lock:
            self._left -= 1
            self.all_ok = self.all_ok and ok
            return self._left == 0


class StoreWriter:
    """Streams :class:`BatchRows` into the shards of an initialised, incomplete store.

    Rows are scattered straight into per-shard buffers at their final positions (one vectorised
    assignment per layer, shard and batch; a batch whose samples come in store order hands each
    shard a slice of its rows, with no copy); a shard goes to a writer thread the moment its
    last row arrives, and rows of shards already on disk are dropped.

    ``buffers`` caps the shard buffers in existence while shards are still being written: a new
    shard then waits for a written one's buffer instead of taking fresh memory. Stage one passes
    the shards of one sort window, which all fill at once and finish together: without the cap
    the next window would take as much fresh memory again, whose first touch (page faults,
    zeroing, on a VM the host backing it) costs more than waiting for the writer threads, which
    keep the cores busy meanwhile. ``None``: no cap.
    """

    def __init__(
        self,
        path: str,
        layout: Layout,
        *,
        threads: int = 2,
        max_pending: int = 2,
        buffers: int | None = None,
    ):
        self.path = str(path)
        self.layout = layout
        self.group = _open_group(path, "r+")
        meta = check_metadata(self.group.attrs.get("sidecache"), path)
        if Layout.from_json(meta["layout"]) != layout:
            raise StoreSchemaError(f"{path}: layout on disk differs from the writer's layout")
        self.offsets = np.asarray(array(self.group, "offsets")[...], dtype=np.int64)
        self._arrays = [_every_chunk(self.group, f"hidden/{layer}") for layer in layout.layers]
        self._scales = (
            [_every_chunk(self.group, f"scales/{layer}") for layer in layout.layers]
            if layout.dtype == "int8"
            else None
        )
        self._progress = _every_chunk(self.group, "progress")
        local = locate(path).local
        # whole shards of the big arrays go straight to their files (see storage.shardfile);
        # zarr's own path for remote stores and any layout shardfile does not write
        self._files: list[ShardFile | None] = [
            None if local is None else ShardFile.of(a, local / a.path)
            for a in [*self._arrays, *(self._scales or [])]
        ]
        # written shards' buffers, reused for later shards: fresh memory costs page faults (and
        # zeroing) on first touch, which competes with the backbone for the CPU
        self._spare: list[_Shard] = []
        self._spare_lock = threading.Condition()  # notified when a write ends
        self._buffers, self._cap, self._writing = 0, buffers, 0
        self.done = self._read_done()
        self.owned = np.ones(layout.n_shards, dtype=bool)  # shards this process writes
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sidecache-write")
        self._slots_total = max_pending + threads
        self._slots = threading.BoundedSemaphore(self._slots_total)
        self._futures: list[Future[None]] = []
        self._open: dict[int, _Shard] = {}
        self._seen = np.zeros(layout.n_samples, dtype=bool)

    # -- what still has to be computed ------------------------------------------------------
    def _read_done(self) -> np.ndarray:
        done = np.zeros(self.layout.n_shards, dtype=bool)
        for shard in range(self.layout.n_shards):
            try:
                row = np.asarray(self._progress[shard])
            except Exception:  # a torn progress chunk counts as not done
                continue
            done[shard] = bool(np.isfinite(row).all())
        return done

    def own(self, shards: np.ndarray) -> None:
        """Write only these shards (a boolean mask): ``sidecache cache --shard I/N``. Rows of
        other shards that arrive in a batch are dropped, as for shards already on disk."""
        self.owned = np.asarray(shards, dtype=bool).copy()

    def by_units(self, offsets: np.ndarray) -> None:
        """Take batches of other units than the store's samples: ``offsets`` ``(n + 1,)`` cuts
        the rows into ``n`` consecutive ranges (the two sentences of each sample, say), and the
        ``samples`` of every :class:`BatchRows` and of :meth:`needed_samples` are then units."""
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets[0] != 0 or offsets[-1] != self.layout.n_rows or (np.diff(offsets) < 0).any():
            raise ValueError(f"unit offsets must rise from 0 to {self.layout.n_rows} rows")
        self.offsets, self._seen = offsets, np.zeros(len(offsets) - 1, dtype=bool)

    def needed_samples(self) -> np.ndarray:
        """Boolean mask of the samples whose rows touch an owned shard not on disk yet."""
        starts, stops = self.offsets[:-1], self.offsets[1:]
        first = starts // self.layout.shard_rows
        last = np.maximum(stops - 1, starts) // self.layout.shard_rows
        todo = self.owned & ~self.done
        cum = np.concatenate([[0], np.cumsum(todo)])
        return (cum[last + 1] - cum[first]) > 0

    # -- streaming -------------------------------------------------------------------------
    def put(self, batch: BatchRows) -> None:
        """Hand over one batch; blocks only while too many shards wait for the disk."""
        self._raise_failures()
        samples = np.asarray(batch.samples, dtype=np.int64)
        counts = np.asarray(batch.rows_per_sample, dtype=np.int64)
        expected = self.offsets[samples + 1] - self.offsets[samples]
        if not np.array_equal(counts, expected) or self._seen[samples].any():
            raise ValueError("batch rows do not match the store layout (or a sample came twice)")
        self._seen[samples] = True
        total = int(counts.sum())
        # destination row of every batch row: (R,)
        first_of_sample = np.repeat(self.offsets[samples] - (np.cumsum(counts) - counts), counts)
        dest = first_of_sample + np.arange(total)
        shard_of = dest // self.layout.shard_rows
        shards, firsts = np.unique(shard_of, return_index=True)
        in_order = bool((shard_of[1:] >= shard_of[:-1]).all())
        bounds = [*firsts.tolist(), total]
        for k, shard in enumerate(shards.tolist()):
            if self.done[shard] or not self.owned[shard]:
                continue  # on disk already (a resumed run) or another worker's: not needed
            # samples in store order (as stage one sends them): each shard's rows are a slice
            # of the batch, a view; otherwise pick them out
            sel = slice(bounds[k], bounds[k + 1]) if in_order else np.flatnonzero(shard_of == shard)
            self._fill(shard, dest[sel], batch, sel)

    def _fill(
        self, shard: int, dest: np.ndarray, batch: BatchRows, sel: slice | np.ndarray
    ) -> None:
        start, stop = self.layout.shard_range(shard)
        buf = self._open.get(shard)
        if buf is None:
            buf = self._open[shard] = self._new_shard(stop - start)
        pos = dest - start
        for j, rows in enumerate(batch.layers):
            buf.layers[j][pos] = rows[sel]
            if buf.scales is not None and batch.scales is not None:
                buf.scales[j][pos] = batch.scales[j][sel]
        buf.stats[pos] = batch.stats[sel]
        buf.filled += len(pos)
        if buf.filled == buf.rows:
            del self._open[shard]
            self._slots.acquire()
            with self._spare_lock:
                self._writing += 1
            # one task per array (each layer's part of a shard is a file of its own), so a
            # shard's layers compress at once; the last part to finish records the shard
            parts = [*buf.layers, *(buf.scales or [])]
            left = _Countdown(len(parts))
            self._futures += [
                self._pool.submit(self._write_part, shard, buf, k, left) for k in range(len(parts))
            ]

    def _new_shard(self, rows: int) -> _Shard:
        with self._spare_lock:
            while True:
                for k, spare in enumerate(self._spare):
                    if spare.rows == rows:
                        buf = self._spare.pop(k)
                        buf.filled = 0
                        return buf
                if self._cap is None or self._buffers < self._cap or not self._writing:
                    break  # under the cap, or no write in flight that could free a buffer
                self._spare_lock.wait()
            self._buffers += 1
        return _Shard(rows, self.layout)

    def _write_part(self, shard: int, buf: _Shard, k: int, left: _Countdown) -> None:
        """Array ``k``'s part of ``shard`` (a layer's rows, or an int8 layer's scales); the last
        part written records the shard's ``progress`` row and frees its buffer. A part that
        fails leaves the shard unrecorded (a resumed run writes it again)."""
        ok = False
        try:
            arr, file = [*self._arrays, *(self._scales or [])][k], self._files[k]
            rows = [*buf.layers, *(buf.scales or [])][k]
            if file is not None:
                file.write(shard, rows)
            else:
                start, stop = self.layout.shard_range(shard)
                arr[start:stop] = rows
            ok = True
        finally:
            if left.done(ok):
                self._end_shard(shard, buf, left.all_ok)

    def _end_shard(self, shard: int, buf: _Shard, ok: bool) -> None:
        try:
            if ok:
                self._progress[shard] = shard_stats(buf.stats)
                with self._spare_lock:  # never more buffers than were once in use at once
                    self._spare.append(buf)
        finally:
            with self._spare_lock:
                self._writing -= 1
                self._spare_lock.notify_all()
            self._slots.release()

    def _raise_failures(self) -> None:
        for fut in self._futures:
            if fut.done() and fut.exception() is not None:
                self.abort()
                raise fut.exception()  # type: ignore[misc]
        self._futures = [f for f in self._futures if not f.done()]

    # -- ending ----------------------------------------------------------------------------
    def abort(self) -> None:
        """Stop without finalising: shards already handed over are still written (they are
        correct and complete), so a resumed run has less to redo."""
        self._pool.shutdown(wait=True)

    def finish(self) -> bool:
        """Wait until every owned shard is on disk; ``True`` when the whole store is (so it can
        be finalised: by this process, or by the last shard worker to finish)."""
        missing = np.flatnonzero(self.needed_samples() & ~self._seen)
        if len(missing) or self._open:
            self.abort()
            raise RuntimeError(
                f"stage one ended with {len(missing)} samples and {len(self._open)} shards "
                "unwritten; the store stays incomplete"
            )
        self._pool.shutdown(wait=True)
        self._spare.clear()  # nothing more to fill: give the buffers back
        self._raise_failures()
        self.done = self._read_done()  # other shard workers may have written theirs meanwhile
        return bool(self.done.all())

    def close(self) -> dict[str, Any]:
        """Wait for the disk, check every shard is recorded, then mark the store complete."""
        self.finish()
        return finalize_store(self.path)


def finalize_store(path: str | Location) -> dict[str, Any]:
    """Fold the per-shard records into the store's statistics and mark it complete.

    Idempotent; raises :class:`StoreIncompleteError` naming the shards still missing.
    """
    group = _open_group(path, "r+")
    meta: dict[str, Any] = dict(check_metadata(group.attrs.get("sidecache"), str(path)))
    layout = Layout.from_json(meta["layout"])
    rows = []
    for shard in range(layout.n_shards):
        try:
            rows.append(np.asarray(array(group, "progress")[shard]))
        except Exception:  # a torn progress chunk counts as not done
            rows.append(np.full((len(layout.layers), len(STAT_FIELDS)), np.nan))
    progress = np.stack(rows)
    missing = np.flatnonzero(~np.isfinite(progress).all(axis=(1, 2)))
    if len(missing):
        raise StoreIncompleteError(
            f"{path}: {len(missing)} of {layout.n_shards} shards are not written yet (shards "
            f"{missing[:10].tolist()}{' ...' if len(missing) > 10 else ''}); run the missing "
            "'sidecache cache --shard I/N' workers, or the command without --shard, to write them"
        )
    if meta.get("complete"):
        return meta
    # every shard is on disk, so no writer is still writing into the store: whatever temporary
    # file is left belongs to a killed one, whoever holds a claim
    remove_stale_files(path, force=True)
    hashes = array_metadata_hashes(group, locate(path))
    meta[INTEGRITY] = dict(meta.get(INTEGRITY) or {}, metadata_sha256=hashes)
    meta.update(stats=merge_shard_stats(progress, layout), complete=True)
    group.attrs["sidecache"] = meta
    return meta


def _every_chunk(group: zarr.Group, name: str) -> Any:
    """Array ``name`` writing every chunk, all-zero ones too (zarr's runtime config is not
    stored with the array, so a reopened array needs it again)."""
    return array(group, name).with_config(EVERY_CHUNK)


def array_metadata_hashes(group: zarr.Group, loc: Location) -> dict[str, str]:
    """``name -> sha256`` of every array's canonical ``zarr.json`` (:func:`canonical_sha256`)."""
    out = {}
    for name, node in group.members(max_depth=None):
        if not isinstance(node, zarr.Array):
            continue
        raw = loc.read_file(f"{name}/zarr.json")
        if raw is None:
            raise StoreSchemaError(f"{loc}: array {name!r} has no zarr.json")
        out[name] = canonical_sha256(raw)
    return dict(sorted(out.items()))


def is_stale_name(name: str) -> bool:
    """A temporary file of an atomic write: zarr's ``NAME.HEX.partial``, sidecache's
    ``.NAME.PID.THREAD.tmp`` (:mod:`storage.atomic`)."""
    return name.endswith(".partial") or (name.startswith(".") and name.endswith(".tmp"))


def stale_files(folder: Path) -> list[Path]:
    """Temporary files of atomic writes anywhere under a local store's folder."""
    found = []
    for top, _, names in os.walk(folder):
        found += [Path(top) / name for name in names if is_stale_name(name)]
    return sorted(found)


def remove_stale_files(path: str | Location, *, force: bool = False) -> list[str]:
    """Delete the temporary files a killed writer left in a local store (paths relative to it).

    A temporary file may also be one another live writer is filling right now, so unless
    ``force`` they are removed only when no other process holds a claim on the store that may
    still be alive (:func:`storage.claims.others_alive`); otherwise they are kept and logged.
    """
    loc = locate(path)
    if loc.local is None or not loc.local.is_dir():
        return []  # object stores write whole objects: no temporary files
    found = stale_files(loc.local)
    if not found:
        return []
    names = [p.relative_to(loc.local).as_posix() for p in found]
    busy = [] if force else others_alive(loc)
    if busy:
        log.info("keeping %d temporary files in %s: other writers hold claims %s and may be "
                 "writing them", len(names), loc, busy)  # fmt: skip
        return []
    for stale in found:
        stale.unlink(missing_ok=True)
    log.info("removed %d temporary files left by an interrupted writer in %s: %s", len(names),
             loc, ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))  # fmt: skip
    return names

"""Stage two's data loader: whole chunks off the store, shuffled by blocks, prefetched.

Samples are grouped into *blocks* of consecutive samples covering about one stored chunk of rows.
Each epoch visits the blocks in a permutation seeded by ``(seed, epoch)``, a *round* of
``shuffle_blocks`` blocks at a time: the samples of a round (plus the few left over from the
previous round) are shuffled and cut into batches; a sample's rows always stay together.

Rows stay in the stored dtype (bfloat16 bits as uint16, int8 with its scales ...) until a batch is
collated; only the batch is decoded to float32, so memory follows the stored bytes. Two background
threads do the work: a *reader* fetches the next round while the current one is consumed (the
blocks of a round are read in store order, consecutive blocks as one range, so a chunk shared by
two neighbouring blocks is decompressed once), and a *batcher* shuffles, gathers and decodes
batches. When the stored rows fit ``ram_budget`` bytes they are read once and kept in memory and
the same rounds are served from RAM, so both modes give the same batches in the same order.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from pipeline.sidenets.base import SideBatch
from storage import StoreReader, decode_rows
from storage.codecs import STORED_DTYPES, itemsize

log = logging.getLogger(__name__)
Rows = tuple[np.ndarray, np.ndarray | None]  # stored rows (n, L, D), int8 scales (n, L) or None
_END = object()  # end of the stream in a queue


class StoreLoader:
    def __init__(
        self,
        reader: StoreReader,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        ram_budget: int = 4 << 30,
        shuffle_blocks: int = 16,
        pool_bytes: int = 256 << 20,
        prefetch: int = 4,
    ):
        self.reader, self.batch_size, self.shuffle, self.seed = reader, batch_size, shuffle, seed
        lay = reader.layout
        self.layers = list(reader.layout.layers)
        self.offsets = reader.offsets
        self.labels = reader.labels
        self.prefetch = prefetch
        # blocks follow the token axis (= the row axis of an ``all`` store), so a single-position
        # store of the same data gets the same blocks and hence the same batches
        starts = reader.token_offsets[:-1] // lay.chunk_rows
        cuts = np.flatnonzero(np.diff(starts)) + 1
        self.blocks = np.split(np.arange(lay.n_samples), cuts)  # consecutive samples
        row_bytes = len(self.layers) * (lay.hidden_size * itemsize(lay.dtype) + 4 * self._int8)
        # the shuffle pool holds at most ``shuffle_blocks`` blocks and about ``pool_bytes`` of
        # stored rows (a token-axis block of a wider or deeper backbone counts for more)
        block_bytes = lay.chunk_rows * row_bytes
        self.shuffle_blocks = max(1, min(shuffle_blocks, pool_bytes // max(1, block_bytes)))
        self.pool_bytes, self._n_rows = pool_bytes, lay.n_rows
        stored = lay.n_rows * row_bytes
        self.in_ram = stored <= ram_budget
        self._ram: Rows | None = None
        if self.in_ram:
            self._ram = self._read_span(0, lay.n_rows)
        log.info(
            "loader: %d samples in %d blocks, %d blocks per shuffle round, %s (%.1f MB stored)",
            lay.n_samples, len(self.blocks), self.shuffle_blocks,
            "in RAM" if self.in_ram else "streaming", stored / 1e6,
        )  # fmt: skip

    def __len__(self) -> int:
        return -(-self.reader.layout.n_samples // self.batch_size)

    @property
    def _int8(self) -> bool:
        return self.reader.layout.dtype == "int8"

    # -- reading ---------------------------------------------------------------------------------
    def _read_span(self, a: int, b: int) -> Rows:
        """Stored rows ``[a, b)`` of every layer: ``(b - a, L, D)`` in the stored dtype."""
        if self._ram is not None:
            rows, scales = self._ram
            return rows[a:b], None if scales is None else scales[a:b]
        lay = self.reader.layout
        rows = np.empty((b - a, len(self.layers), lay.hidden_size), STORED_DTYPES[lay.dtype])
        scales = np.empty((b - a, len(self.layers)), np.float32) if self._int8 else None
        for j, layer in enumerate(self.layers):
            self.reader.raw_rows(layer, a, b, out=rows[:, j])
            if scales is not None:
                self.reader.raw_scales(layer, a, b, out=scales[:, j])
        return rows, scales

    def _read_round(self, ids: list[int], cache: _EdgeCache) -> Iterator[tuple[int, Rows]]:
        """The blocks of one round, each as ``(block id, its stored rows)``.

        Blocks with consecutive ids are read as one range. A range that starts or ends inside a
        chunk is read out to the chunk's edges (the chunk is decoded whole anyway); the extra rows
        belong to the neighbouring block and wait in ``cache`` until it is read, so each chunk is
        decoded about once per epoch instead of about twice."""
        ids = sorted(ids)
        cut = [0, *(k for k in range(1, len(ids)) if ids[k] != ids[k - 1] + 1), len(ids)]
        for lo, hi in itertools.pairwise(cut):
            run = ids[lo:hi]
            base = int(self.offsets[self.blocks[run[0]][0]])
            stop = int(self.offsets[self.blocks[run[-1]][-1] + 1])
            rows, scales = self._read_run(base, stop, run[0], run[-1], cache)
            for i in run:
                a = int(self.offsets[self.blocks[i][0]]) - base
                b = int(self.offsets[self.blocks[i][-1] + 1]) - base
                yield i, (rows[a:b], None if scales is None else scales[a:b])

    def _read_run(self, a: int, b: int, first: int, last: int, cache: _EdgeCache) -> Rows:
        """Stored rows ``[a, b)`` of blocks ``first..last``, using and refilling the cache."""
        cache.done.update(range(first, last + 1))
        if self._ram is not None:
            return self._read_span(a, b)
        head, tail = cache.heads.pop(first, None), cache.tails.pop(last, None)
        start = a + (0 if head is None else len(head[0]))
        stop = b - (0 if tail is None else len(tail[0]))
        chunk = self.reader.layout.chunk_rows
        lo = start if head is not None or first - 1 in cache.done else start // chunk * chunk
        hi = stop if tail is not None or last + 1 in cache.done else -(-stop // chunk) * chunk
        hi = min(hi, self._n_rows)
        rows, scales = self._read_span(lo, hi) if hi > lo else self._read_span(start, start)
        if lo < start:  # the end of the previous block
            cache.put(cache.tails, first - 1, rows, scales, 0, start - lo)
        if hi > stop:  # the start of the next block
            cache.put(cache.heads, last + 1, rows, scales, stop - lo, hi - lo)
        parts = [
            x for x in (head, _cut(rows, scales, start - lo, stop - lo), tail) if x is not None
        ]
        if len(parts) == 1:
            return parts[0]
        rows = np.concatenate([x[0] for x in parts])
        if parts[0][1] is None:
            return rows, None
        return rows, np.concatenate([x[1] for x in parts if x[1] is not None])

    # -- one epoch -------------------------------------------------------------------------------
    def epoch(self, epoch: int) -> Iterator[SideBatch]:
        """Batches of one epoch; deterministic in ``(seed, epoch)``."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.blocks)
        order = rng.permutation(n).tolist() if self.shuffle else list(range(n))
        rounds = [order[k : k + self.shuffle_blocks] for k in range(0, n, self.shuffle_blocks)]
        blocks: queue.Queue[Any] = queue.Queue(maxsize=self.shuffle_blocks)  # one round ahead
        batches: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        workers = [
            threading.Thread(target=self._reader, args=(rounds, blocks, stop), daemon=True),
            threading.Thread(target=self._batcher, args=(rounds, rng, blocks, batches, stop),
                             daemon=True),
        ]  # fmt: skip
        for w in workers:
            w.start()
        try:
            while (item := batches.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            for w in workers:  # they stop within one queue timeout
                w.join()

    def _reader(self, rounds: list[list[int]], out: queue.Queue[Any], stop: threading.Event,
                ) -> None:  # fmt: skip
        def work() -> None:
            cache = _EdgeCache(self.pool_bytes)
            for ids in rounds:
                for item in self._read_round(ids, cache):
                    if not _put(out, item, stop):
                        return
            _put(out, _END, stop)

        _guard(work, out, stop)

    def _batcher(self, rounds: list[list[int]], rng: np.random.Generator, blocks: queue.Queue[Any],
                 out: queue.Queue[Any], stop: threading.Event) -> None:  # fmt: skip
        def work() -> None:
            pool: list[tuple[int, np.ndarray, np.ndarray | None]] = []  # (sample, rows, scales)
            for r, ids in enumerate(rounds):
                got: dict[int, Rows] = {}
                while len(got) < len(ids):
                    item = _get(blocks, stop)
                    if item is None:
                        return
                    got[item[0]] = item[1]
                for i in ids:  # in the permutation's order, whatever order they were read in
                    rows, scales = got.pop(i)
                    first, last = int(self.blocks[i][0]), int(self.blocks[i][-1])
                    offs = self.offsets[first : last + 2] - self.offsets[first]
                    pool += [
                        (int(s), rows[offs[k] : offs[k + 1]],
                         None if scales is None else scales[offs[k] : offs[k + 1]])
                        for k, s in enumerate(self.blocks[i])
                    ]  # fmt: skip
                if self.shuffle:
                    pool = [pool[k] for k in rng.permutation(len(pool))]
                last = r == len(rounds) - 1
                while len(pool) >= self.batch_size or (last and pool):
                    if not _put(out, self._collate(pool[: self.batch_size]), stop):
                        return
                    pool = pool[self.batch_size :]
                # leftovers: copy them, so they do not keep this round's blocks alive
                pool = [(s, x.copy(), None if c is None else c.copy()) for s, x, c in pool]
            _put(out, _END, stop)

        _guard(work, out, stop)

    def _collate(self, items: list[tuple[int, np.ndarray, np.ndarray | None]]) -> SideBatch:
        samples = np.array([s for s, _, _ in items], dtype=np.int64)
        raw = np.concatenate([x for _, x, _ in items])  # (R, L, D) stored dtype
        scales = None
        if items[0][2] is not None:
            scales = np.concatenate([c for _, _, c in items if c is not None])  # (R, L)
        r, n_layers, d = raw.shape
        hidden = decode_rows(
            raw.reshape(r * n_layers, d),
            self.reader.layout.dtype,
            None if scales is None else scales.reshape(r * n_layers),
        ).reshape(r, n_layers, d)
        return SideBatch(
            hidden=torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32)),
            lengths=torch.tensor([len(x) for _, x, _ in items], dtype=torch.int64),
            labels=torch.from_numpy(self.labels[samples]),
            samples=torch.from_numpy(samples),
        )


def _cut(rows: np.ndarray, scales: np.ndarray | None, a: int, b: int) -> Rows:
    return rows[a:b], None if scales is None else scales[a:b]


class _EdgeCache:
    """Rows of a block decoded while reading its neighbour (the part of a shared chunk), kept
    until the block is read; at most ``limit`` bytes, the oldest dropped first."""

    def __init__(self, limit: int):
        self.limit = limit
        self.heads: dict[int, Rows] = {}  # block -> its first rows
        self.tails: dict[int, Rows] = {}  # block -> its last rows
        self.done: set[int] = set()  # blocks already read this epoch

    def put(self, where: dict[int, Rows], block: int, rows: np.ndarray,
            scales: np.ndarray | None, a: int, b: int) -> None:  # fmt: skip
        x, c = _cut(rows, scales, a, b)
        where[block] = (x.copy(), None if c is None else c.copy())  # not a view of the whole run
        while self.heads or self.tails:
            if sum(v[0].nbytes for d in (self.heads, self.tails) for v in d.values()) <= self.limit:
                return
            oldest = self.heads if self.heads else self.tails
            oldest.pop(next(iter(oldest)))


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer went away; False when it did."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue[Any], stop: threading.Event) -> Any:
    """Next item, or None when the consumer went away or the producer ended or failed."""
    while not stop.is_set():
        try:
            item = q.get(timeout=0.05)
        except queue.Empty:
            continue
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item
    return None


def _guard(work: Callable[[], None], out: queue.Queue[Any], stop: threading.Event) -> None:
    """Run a worker; hand any failure down the stream to the consumer."""
    try:
        work()
    except BaseException as exc:
        _put(out, exc, stop)

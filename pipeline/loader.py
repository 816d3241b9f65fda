"""Stage two's data loader: whole chunks off the store, shuffled by blocks, prefetched.

Samples are grouped into *blocks* of consecutive samples covering about one stored chunk of rows.
Each epoch reads the blocks in a permutation seeded by ``(seed, epoch)`` on a background thread
(zarr decompression releases the GIL), pools ``shuffle_blocks`` blocks at a time, shuffles their
samples and cuts batches; a sample's rows always stay together. When the stored rows fit
``ram_budget`` bytes they are read once and kept in memory (in the stored dtype) and the same
blocks are served from RAM, so both modes give the same batches in the same order.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline.sidenets.base import SideBatch
from storage import StoreReader, decode_rows
from storage.codecs import itemsize

log = logging.getLogger(__name__)


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
        prefetch: int = 4,
    ):
        self.reader, self.batch_size, self.shuffle, self.seed = reader, batch_size, shuffle, seed
        self.layers = list(reader.layout.layers)
        self.offsets = reader.offsets
        self.labels = reader.labels
        self.shuffle_blocks, self.prefetch = shuffle_blocks, prefetch
        lay = reader.layout
        # blocks follow the token axis (= the row axis of an ``all`` store), so a single-position
        # store of the same data gets the same blocks and hence the same batches
        starts = reader.token_offsets[:-1] // lay.chunk_rows
        cuts = np.flatnonzero(np.diff(starts)) + 1
        self.blocks = np.split(np.arange(lay.n_samples), cuts)  # consecutive samples
        stored = lay.n_rows * len(self.layers) * lay.hidden_size * itemsize(lay.dtype)
        self.in_ram = stored <= ram_budget
        self._ram: list[tuple[np.ndarray, np.ndarray | None]] | None = None
        if self.in_ram:
            self._ram = [self._read_raw(layer, 0, lay.n_rows) for layer in self.layers]
        log.info(
            "loader: %d samples in %d blocks, %s (%.1f MB stored)",
            lay.n_samples, len(self.blocks), "in RAM" if self.in_ram else "streaming", stored / 1e6,
        )  # fmt: skip

    def __len__(self) -> int:
        return -(-self.reader.layout.n_samples // self.batch_size)

    def _read_raw(self, layer: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        scales = self.reader.raw_scales(layer, a, b) if self.reader.layout.dtype == "int8" else None
        return self.reader.raw_rows(layer, a, b), scales

    def _block(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decoded rows of a block of consecutive samples: ``(rows, L, D)`` and its row offsets."""
        a, b = int(self.offsets[samples[0]]), int(self.offsets[samples[-1] + 1])
        out = np.empty((b - a, len(self.layers), self.reader.layout.hidden_size), np.float32)
        for j, layer in enumerate(self.layers):
            if self._ram is not None:
                raw, scales = self._ram[j]
                raw, scales = raw[a:b], None if scales is None else scales[a:b]
            else:
                raw, scales = self._read_raw(layer, a, b)
            out[:, j] = decode_rows(raw, self.reader.layout.dtype, scales)
        return out, self.offsets[samples[0] : samples[-1] + 2] - a

    def _produce(self, order: list[int], q: queue.Queue[Any], stop: threading.Event) -> None:
        try:
            for i in order:
                if stop.is_set():
                    return
                q.put((self.blocks[i], *self._block(self.blocks[i])))
            q.put(None)
        except BaseException as exc:  # hand the failure to the consumer
            q.put(exc)

    def epoch(self, epoch: int) -> Iterator[SideBatch]:
        """Batches of one epoch; deterministic in ``(seed, epoch)``."""
        rng = np.random.default_rng([self.seed, epoch])
        order = (
            rng.permutation(len(self.blocks)).tolist()
            if self.shuffle
            else list(range(len(self.blocks)))
        )
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(order, q, stop), daemon=True)
        worker.start()
        pool: list[tuple[int, np.ndarray]] = []  # (sample, its rows)
        seen = 0
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                if item is not None:
                    samples, rows, offs = item
                    pool += [(int(s), rows[offs[k] : offs[k + 1]]) for k, s in enumerate(samples)]
                    seen += 1
                if item is None or seen % self.shuffle_blocks == 0:
                    if self.shuffle:
                        pool = [pool[k] for k in rng.permutation(len(pool))]
                    while len(pool) >= self.batch_size or (item is None and pool):
                        yield self._collate(pool[: self.batch_size])
                        pool = pool[self.batch_size :]
                if item is None:
                    return
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(0.01)

    def _collate(self, items: list[tuple[int, np.ndarray]]) -> SideBatch:
        samples = np.array([s for s, _ in items], dtype=np.int64)
        return SideBatch(
            hidden=torch.from_numpy(np.concatenate([r for _, r in items])),
            lengths=torch.tensor([len(r) for _, r in items], dtype=torch.int64),
            labels=torch.from_numpy(self.labels[samples]),
            samples=torch.from_numpy(samples),
        )

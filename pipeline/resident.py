"""A store held in GPU memory: the batches of :class:`pipeline.loader.StoreLoader`, cut on the
device with no decode, copy or host sync per batch.

The stored rows are copied to the device once, in their stored dtype (bfloat16 and float16 as
such, int8 with its float32 scales), so a store takes as many bytes there as its raw rows. Each
epoch follows the host loader's :meth:`~pipeline.loader.StoreLoader.plan` (the same batches in
the same order, whatever the values): the epoch's row indices, lengths, labels and sample ids
go to the device in one copy each, and a batch is a slice of those plus one ``index_select``
of the rows, decoded to float32 where they lie (exactly what the host decode gives).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.loader import StoreLoader
from pipeline.sidenets.base import SideBatch

log = logging.getLogger(__name__)
TORCH_STORED = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.int16,
                "int8": torch.int8}  # fmt: skip
# numpy views of the stored rows that torch.from_numpy takes (bfloat16 bits as int16)
HOST_VIEW = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "int8": np.int8}
SPAN_BYTES = 64 << 20  # stored bytes copied to the device at a time when the store is loaded


def resident_bytes(loader: StoreLoader) -> int:
    """Device bytes a :class:`ResidentLoader` over ``loader``'s store takes for the rows."""
    return loader.reader.layout.n_rows * loader.row_bytes


class ResidentLoader:
    """``loader``'s batches from a copy of its store on ``device``."""

    rows: torch.Tensor  # (n_rows, L, D) stored dtype
    scales: torch.Tensor | None  # (n_rows, L) of an int8 store
    offsets: np.ndarray
    labels: torch.Tensor
    segments: torch.Tensor | None

    def __init__(self, loader: StoreLoader, device: torch.device,
                 share: ResidentLoader | None = None):  # fmt: skip
        """``share``: a resident loader of the same store (another subset of its samples),
        whose device copy this one uses instead of making its own."""
        self.host, self.device = loader, device
        lay = loader.reader.layout
        self.dtype = lay.dtype
        self.in_ram, self.held_peak, self.pool_bytes, self.held_bound = True, 0, 0, 0
        if share is not None:
            self.rows, self.scales, self.offsets = share.rows, share.scales, share.offsets
            self.labels, self.segments = share.labels, share.segments
            return
        n, n_layers, d = lay.n_rows, len(loader.layers), lay.hidden_size
        self.rows = torch.empty((n, n_layers, d), dtype=TORCH_STORED[lay.dtype], device=device)
        self.scales = (
            torch.empty((n, n_layers), dtype=torch.float32, device=device)
            if lay.dtype == "int8"
            else None
        )
        step = max(1, SPAN_BYTES * n_layers // loader.row_bytes)  # rows of one layer per copy
        for j, layer in enumerate(loader.layers):
            for a in range(0, n, step):
                b = min(n, a + step)
                part = loader.reader.raw_rows(layer, a, b)
                self.rows[a:b, j].copy_(torch.from_numpy(part.view(HOST_VIEW[lay.dtype])))
                if self.scales is not None:
                    scales = loader.reader.raw_scales(layer, a, b)
                    self.scales[a:b, j].copy_(torch.from_numpy(scales))
        self.offsets = np.asarray(loader.offsets, dtype=np.int64)
        self.labels = torch.from_numpy(np.asarray(loader.labels)).to(device)
        self.segments = None if loader.segments is None else torch.from_numpy(
            loader.segments).to(device)  # fmt: skip
        log.info("loader: %d samples resident on %s (%.1f MB stored)", lay.n_samples, device,
                 resident_bytes(loader) / 1e6)  # fmt: skip

    def __len__(self) -> int:
        return len(self.host)

    def epoch(self, epoch: int) -> Iterator[SideBatch]:
        """The host loader's batches of ``epoch`` (:meth:`StoreLoader.plan`), on the device."""
        batches = [cut for _, cuts in self.host.plan(epoch) for cut in cuts]
        if not batches:
            return
        samples = np.concatenate(batches)  # (N,) every sample of the epoch, in batch order
        starts, lengths = self.offsets[samples], np.diff(self.offsets)[samples]
        first_row = np.concatenate([[0], np.cumsum(lengths)])  # of each sample, in the epoch
        rows = np.repeat(starts - first_row[:-1], lengths) + np.arange(first_row[-1])
        cut = np.concatenate([[0], np.cumsum([len(b) for b in batches])])  # sample bounds
        on = self.device
        samples_d, lengths_d = torch.from_numpy(samples).to(on), torch.from_numpy(lengths).to(on)
        rows_d, labels_d = torch.from_numpy(rows).to(on), self.labels[samples_d]
        for k in range(len(batches)):
            a, b = int(cut[k]), int(cut[k + 1])
            idx = rows_d[int(first_row[a]) : int(first_row[b])]
            segments = None if self.segments is None else self.segments.index_select(0, idx)
            yield SideBatch(self._decode(idx), lengths_d[a:b], labels_d[a:b], samples_d[a:b],
                            longest=int(lengths[a:b].max()), segments=segments)  # fmt: skip

    def _decode(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` as float32 ``(R, L, D)``: the same values as ``storage.decode_rows``."""
        raw = self.rows.index_select(0, idx)
        if self.dtype == "bfloat16":  # the stored bits are a bfloat16's: widening is exact
            return raw.view(torch.bfloat16).float()
        if self.scales is not None:
            return raw.float() * self.scales.index_select(0, idx)[..., None]
        return raw.float()

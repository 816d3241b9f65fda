"""From token ids to stored rows: build a padded batch, run the backbone, gather the stored
positions on the device, check finiteness, compute per-row statistics and cast to the stored
dtype. Stage one, ``verify`` and later ``predict`` share this path so they agree bit for bit."""

from __future__ import annotations

import contextlib
import functools
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from pipeline.backbone import Backbone, hidden_states
from pipeline.errors import NonFiniteError
from pipeline.tokens import Tokenized
from storage import BatchRows

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class DeviceBatch:
    samples: np.ndarray  # (B,)
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    token_type_ids: torch.Tensor | None  # (B, T)
    lengths: torch.Tensor  # (B,)
    # the same slots as :attr:`real_slots`, found on the host when the batch was built there
    # (``make_batch``), so a CUDA batch needs no device sync to know them
    host_real_slots: np.ndarray | None = None
    host_padded: bool = True
    host_lengths: np.ndarray | None = None  # (B,) the lengths, where the batch was built

    @functools.cached_property
    def real_slots(self) -> torch.Tensor | None:
        """Flat indices into ``(B * T)`` of the non-pad token slots, in order; ``None`` when the
        batch has no padding (most batches of a length-bucketed plan), so gathering is a view."""
        if self.host_real_slots is not None:
            return _upload(self.host_real_slots, self.attention_mask.device)
        if not self.host_padded:
            return None
        if bool(self.attention_mask.all()):
            return None
        return self.attention_mask.reshape(-1).nonzero().squeeze(1)


def _upload(x: Any, device: torch.device) -> torch.Tensor:
    """A host array on ``device``; from pageable memory, the copy is staged and returns without
    waiting for the device."""
    return torch.from_numpy(x).to(device, non_blocking=True)


def make_batch(tok: Tokenized, samples: np.ndarray, device: torch.device) -> DeviceBatch:
    """Right-padded batch of the given samples (pad id 0; padding is masked everywhere)."""
    samples = np.asarray(samples, dtype=np.int64)
    lengths = tok.lengths[samples]
    width = int(lengths.max())
    real = np.arange(width)[None, :] < lengths[:, None]  # (B, T)
    # every slot's index into the packed tokens (a pad slot reads a sample's first token)
    where = np.where(real, tok.offsets[samples][:, None] + np.arange(width)[None, :], 0)
    if len(tok.ids):
        where = np.minimum(where, len(tok.ids) - 1)
    ids = np.where(real, tok.ids[where], 0).astype(np.int64)
    mask = real.astype(np.int64)
    types = None
    if tok.type_ids is not None:
        types = np.where(real, tok.type_ids[where], 0).astype(np.int64)
    padded = bool((lengths < width).any())
    return DeviceBatch(
        samples=np.asarray(samples, dtype=np.int64),
        input_ids=_upload(ids, device),
        attention_mask=_upload(mask, device),
        token_type_ids=None if types is None else _upload(types, device),
        lengths=_upload(lengths.astype(np.int64), device),
        host_real_slots=np.flatnonzero(mask.reshape(-1)) if padded else None,
        host_padded=padded,
        host_lengths=lengths.astype(np.int64),
    )


def gather(h: torch.Tensor, batch: DeviceBatch, positions: str) -> torch.Tensor:
    """``(B, T, D)`` hidden states -> ``(R, D)`` stored rows, samples in batch order."""
    if positions == "all":
        flat = h.reshape(-1, h.shape[-1])  # (B*T, D), a view
        real = batch.real_slots
        return flat if real is None else flat.index_select(0, real)
    if positions == "first":
        return h[:, 0]
    if positions == "last":
        return h[torch.arange(h.shape[0], device=h.device), batch.lengths - 1]
    mask = batch.attention_mask.to(h.dtype).unsqueeze(-1)  # mean over real tokens
    return (h * mask).sum(1) / batch.lengths.to(h.dtype).unsqueeze(-1)


def encode(x: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Cast float32 rows ``(R, D)`` to the stored dtype on the device, then copy to the host."""
    data, scale = _encode_on_device(x, dtype)
    host = data.cpu().numpy()
    if dtype == "bfloat16":
        host = host.view(np.uint16)
    return host, None if scale is None else scale.cpu().numpy()


def row_stats(x: torch.Tensor) -> torch.Tensor:
    """``(R, D)`` -> ``(R, 4)``: sum, sum of squares, min, max per row. The sum of squares is
    the squared 2-norm: one pass, no ``(R, D)`` temporary (a third of ``(x * x).sum(1)``'s
    time), equal to it up to float32 rounding."""
    sumsq = torch.linalg.vector_norm(x, dim=1).square()
    return torch.stack([x.sum(1), sumsq, x.amin(1), x.amax(1)], dim=1)


def check_finite(stats: torch.Tensor, layer: int, batch: DeviceBatch, positions: str) -> None:
    """``stats`` = :func:`row_stats` of a layer: a row holds NaN or inf iff its min or max is
    not finite (``amin``/``amax`` propagate NaN), so checking ``(R, 2)`` numbers is enough."""
    bad = ~torch.isfinite(stats[:, 2:]).all(dim=1)
    if not bool(bad.any()):
        return
    row = int(torch.nonzero(bad)[0])
    lengths = batch.lengths.cpu()  # the search runs on the host, whatever the device
    rows_per = lengths if positions == "all" else torch.ones_like(lengths)
    owner = int(torch.searchsorted(torch.cumsum(rows_per, 0), torch.tensor(row + 1)))
    raise NonFiniteError(
        f"the backbone produced NaN/inf at layer {layer} for sample {int(batch.samples[owner])}; "
        "nothing was stored for it. Check the backbone's weights and dtype (try --device cpu)"
    )


def forward_rows_and_stats(
    bb: Backbone, batch: DeviceBatch, layers: list[int], positions: str, check: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run one batch through the backbone: per layer, float32 rows ``(R, D)`` checked finite
    (unless ``check`` is False: the caller checks the statistics later, on the host), and their
    :func:`row_stats` ``(R, 4)``."""
    states = hidden_states(bb, batch.input_ids, batch.attention_mask, batch.token_type_ids, layers)
    out = []
    for layer in layers:
        rows = gather(states[layer], batch, positions)  # (R, D)
        out.append((rows, row_stats(rows)))  # (R, D), (R, 4)
    if not check:
        return out
    extremes = torch.cat([stats[:, 2:] for _, stats in out], dim=1)  # (R, 2 L): one check
    if not bool(torch.isfinite(extremes).all()):
        for layer, (_, stats) in zip(layers, out, strict=True):
            check_finite(stats, layer, batch, positions)  # raises, naming layer and sample
    return out


def forward_rows(
    bb: Backbone, batch: DeviceBatch, layers: list[int], positions: str
) -> list[torch.Tensor]:
    """Run one batch through the backbone; float32 rows ``(R, D)`` per layer, checked finite."""
    return [rows for rows, _ in forward_rows_and_stats(bb, batch, layers, positions)]


def extract_rows(
    bb: Backbone, batch: DeviceBatch, layers: list[int], positions: str, dtype: str
) -> BatchRows:
    """Run one batch through the backbone and return its stored rows for every layer."""
    stored, scales, stats = [], [], []
    for layer, (rows, row_stat) in zip(
        layers, forward_rows_and_stats(bb, batch, layers, positions), strict=True
    ):
        stats.append(row_stat)
        data, scale = encode(rows, dtype)
        if dtype == "float16" and not np.isfinite(data).all():
            raise NonFiniteError(
                f"layer {layer} has values beyond the float16 range (±65504); store it as "
                "--dtype bfloat16 or float32"
            )
        stored.append(data)
        if scale is not None:
            scales.append(scale)
    lengths = batch.lengths.cpu().numpy()
    per_sample = lengths if positions == "all" else np.ones_like(lengths)
    return BatchRows(
        samples=batch.samples,
        rows_per_sample=per_sample.astype(np.int64),
        layers=stored,
        scales=scales if dtype == "int8" else None,
        stats=torch.stack(stats, dim=1).cpu().numpy(),  # (R, L, 4)
    )


@dataclass
class PendingRows:
    """A batch whose stored rows are on their way to the host: launched by :func:`launch_rows`,
    ready once :meth:`result` returns."""

    batch: DeviceBatch
    layers: list[int]
    positions: str
    dtype: str
    ready: torch.cuda.Event | None  # None: computed on the CPU, ready now
    stored: torch.Tensor  # (R, L, D) stored dtype (bfloat16 bits as int16), pinned host memory
    stats: torch.Tensor  # (R, L, 4) float32, pinned
    scales: torch.Tensor | None  # (R, L) float32, pinned; int8 only

    def result(self) -> BatchRows:
        """Wait for the copy, check finiteness from the copied statistics, hand over the rows."""
        if self.ready is not None:
            self.ready.synchronize()
        stats = self.stats.numpy()
        if not np.isfinite(stats[:, :, 2:]).all():
            for j, layer in enumerate(self.layers):
                check_finite(self.stats[:, j], layer, self.batch, self.positions)
        stored = self.stored.numpy()
        if self.dtype == "bfloat16":
            stored = stored.view(np.uint16)
        if self.dtype == "float16" and not np.isfinite(stored).all():
            layer = self.layers[int(np.flatnonzero(~np.isfinite(stored).all(axis=(0, 2)))[0])]
            raise NonFiniteError(
                f"layer {layer} has values beyond the float16 range (±65504); store it as "
                "--dtype bfloat16 or float32"
            )
        lengths = self.batch.host_lengths
        if lengths is None:  # a batch not built by make_batch
            lengths = self.batch.lengths.cpu().numpy()
        per_sample = lengths if self.positions == "all" else np.ones_like(lengths)
        n = len(self.layers)
        return BatchRows(
            samples=self.batch.samples,
            rows_per_sample=per_sample.astype(np.int64),
            layers=[stored[:, j] for j in range(n)],
            scales=None if self.scales is None else [self.scales[:, j].numpy() for j in range(n)],
            stats=stats,
        )


def launch_rows(
    bb: Backbone, batch: DeviceBatch, layers: list[int], positions: str, dtype: str
) -> PendingRows:
    """:func:`extract_rows` for a CUDA batch, without waiting for it: the forward pass, gather,
    statistics and cast are queued on the device, then one copy per array into page-locked host
    memory and an event; the caller goes on (building and launching the next batch) meanwhile.
    The rows are the same values :func:`extract_rows` gives (on a CPU batch too, where nothing
    waits)."""
    pairs = forward_rows_and_stats(bb, batch, layers, positions, check=False)
    encoded = [_encode_on_device(rows, dtype) for rows, _ in pairs]
    device_arrays = {
        "stored": torch.stack([e for e, _ in encoded], 1),  # (R, L, D)
        "stats": torch.stack([st for _, st in pairs], 1),  # (R, L, 4)
    }
    if dtype == "int8":
        device_arrays["scales"] = torch.stack([sc for _, sc in encoded if sc is not None], 1)
    cuda, host = batch.input_ids.is_cuda, dict(device_arrays)  # on the CPU: already there
    if cuda:  # page-locked buffers come from torch's caching host allocator
        for k, v in device_arrays.items():
            host[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            host[k].copy_(v, non_blocking=True)
    ready = torch.cuda.Event() if cuda else None
    if ready is not None:
        ready.record()
    return PendingRows(batch, layers, positions, dtype, ready, host["stored"], host["stats"],
                       host.get("scales"))  # fmt: skip


def _encode_on_device(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`encode` without the copy: the stored dtype's values on the device."""
    if dtype == "float32":
        return x, None
    if dtype == "float16":
        return x.half(), None
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16), None
    scale = x.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / safe.unsqueeze(1)).clamp_(-127, 127).to(torch.int8), scale


def in_flight(
    launch: Callable[[T], PendingRows], items: Iterable[T], depth: int = 2
) -> Generator[BatchRows, None, None]:
    """``launch`` over ``items``, results in order, with up to ``depth`` batches queued on the
    device: while one batch's rows are copied off and handed to the writer, the next ones
    compute."""
    pending: deque[PendingRows] = deque()
    for item in items:
        pending.append(launch(item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@contextlib.contextmanager
def _threads_per_stream(streams: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // streams))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_streams(
    fn: Callable[[T], R], items: Iterable[T], streams: int, ahead: int = 1
) -> Generator[R, None, None]:
    """``fn`` over ``items``, results in order. With ``streams`` > 1, that many items run at
    once, each on its own thread, and torch's intra-op threads are divided among them (restored
    at the end). On a CPU this lets work outside the backbone (the writer's compression, say)
    take a core from one stream without the other stream spinning at an OpenMP barrier for it.
    At most ``streams`` + ``ahead`` (at least 1) items are taken ahead of the result being
    consumed, so the streams go on while the consumer is held up for a while. There are never
    more streams than torch has threads."""
    streams = min(streams, torch.get_num_threads())
    if streams <= 1:
        yield from map(fn, items)
        return
    with (
        _threads_per_stream(streams),
        ThreadPoolExecutor(streams, thread_name_prefix="sidecache-stream") as pool,
    ):
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= streams + max(1, ahead):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()

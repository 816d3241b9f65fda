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
from typing import TypeVar

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

    @functools.cached_property
    def real_slots(self) -> torch.Tensor | None:
        """Flat indices into ``(B * T)`` of the non-pad token slots, in order; ``None`` when the
        batch has no padding (most batches of a length-bucketed plan), so gathering is a view."""
        if bool(self.attention_mask.all()):
            return None
        return self.attention_mask.reshape(-1).nonzero().squeeze(1)


def make_batch(tok: Tokenized, samples: np.ndarray, device: torch.device) -> DeviceBatch:
    """Right-padded batch of the given samples (pad id 0; padding is masked everywhere)."""
    lengths = tok.lengths[samples]
    width = int(lengths.max())
    ids = np.zeros((len(samples), width), dtype=np.int64)
    mask = np.zeros((len(samples), width), dtype=np.int64)
    types = np.zeros((len(samples), width), dtype=np.int64) if tok.type_ids is not None else None
    for row, s in enumerate(samples):
        seq, seg = tok.sample(int(s))
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        if types is not None and seg is not None:
            types[row, : len(seq)] = seg
    return DeviceBatch(
        samples=np.asarray(samples, dtype=np.int64),
        input_ids=torch.from_numpy(ids).to(device),
        attention_mask=torch.from_numpy(mask).to(device),
        token_type_ids=None if types is None else torch.from_numpy(types).to(device),
        lengths=torch.from_numpy(lengths.astype(np.int64)).to(device),
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
    if dtype == "float32":
        return x.cpu().numpy(), None
    if dtype == "float16":
        return x.half().cpu().numpy(), None
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16), None
    scale = x.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q.cpu().numpy(), scale.cpu().numpy()


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
    bb: Backbone, batch: DeviceBatch, layers: list[int], positions: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run one batch through the backbone: per layer, float32 rows ``(R, D)`` checked finite,
    and their :func:`row_stats` ``(R, 4)``."""
    states = hidden_states(bb, batch.input_ids, batch.attention_mask, batch.token_type_ids, layers)
    out = []
    for layer in layers:
        rows = gather(states[layer], batch, positions)  # (R, D)
        out.append((rows, row_stats(rows)))  # (R, D), (R, 4)
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

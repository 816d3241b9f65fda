"""What every side network sees: a batch of stored rows, and a description of the store.

Side networks import nothing from ``transformers``: they only ever see cached tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from storage import StoreMismatchError


@dataclass(frozen=True)
class StoreInfo:
    """The facts about a store that shape a side network: what ``build`` passes to every side
    network's constructor (``MyHead(info, **kwargs)`` for one of your own).

    * ``hidden_size``: ``D``, the width of every stored row.
    * ``layers``: the stored hidden-state indices, ascending; ``0`` is the embedding output and
      ``i`` the output of block ``i``. ``SideBatch.hidden[:, j]`` holds layer ``layers[j]``
      (:func:`layer_index` maps a layer, negative from the end, to ``j``).
    * ``positions``: which rows a sample has. ``all``: one per real (non-pad) token, in token
      order, first token first; ``first`` / ``last``: one, the first / last real token's;
      ``mean``: one, the mean over the real tokens.
    * ``pooling``: the backbone's own pooling (``first`` for BERT-style encoders, ``last`` for
      decoders, ``mean`` for MiniLM), the usual default of a head's ``pool``.
    * ``num_heads``: the backbone's attention heads; ``causal``: whether it is a decoder.
    * ``task``: ``{"name", "type": "classification" | "regression", "num_labels",
      "label_names"}``; :attr:`num_outputs` is the width ``C`` a network's output must have.
    * ``dtype``: the stored dtype; rows arrive as float32 with its rounding already applied.
    * ``lst_prune``: the ``r`` of the pruned-backbone copy stored (``--lst-prune``), or None.
    * ``pairs``: the samples are sentence pairs whose rows carry their sentence
      (``SideBatch.segments``): every token stored, segment ids known. The built-in networks
      then pool each sentence on its own by default (:attr:`default_pool` is ``pair``).
    """

    hidden_size: int
    layers: tuple[int, ...]  # stored hidden-state indices, ascending
    positions: str  # all | first | last | mean
    pooling: str  # the backbone's own pooling: first | last | mean
    num_heads: int
    causal: bool
    task: dict[str, Any]
    dtype: str = "float32"  # stored dtype (rounding applied to the rows)
    lst_prune: int | None = None  # r of the pruned-backbone initialisation stored, if any
    pairs: bool = False  # sentence pairs with each row's segment known

    @property
    def default_pool(self) -> str:
        """A head's ``pool`` when its spec sets none: ``pair`` on sentence pairs (each sentence
        pooled on its own: on MRPC every kind scored higher so, ``benchmarks.pair_pool``),
        else the backbone's own pooling."""
        return "pair" if self.pairs else self.pooling

    @property
    def num_outputs(self) -> int:
        return 1 if self.task["type"] == "regression" else int(self.task["num_labels"])

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> StoreInfo:
        backbone = meta["identity"]["backbone"]
        return cls(
            hidden_size=int(meta["layout"]["hidden_size"]),
            layers=tuple(int(x) for x in meta["layout"]["layers"]),
            positions=str(meta["layout"]["positions"]),
            pooling=str(backbone.get("pooling") or "first"),
            num_heads=int(backbone.get("num_attention_heads") or 1),
            causal=str(backbone.get("pooling")) == "last",
            task=dict(meta["task"]),
            dtype=str(meta["layout"]["dtype"]),
            lst_prune=meta["identity"].get("extraction", {}).get("lst_prune"),
            pairs=bool(meta["identity"].get("dataset", {}).get("pairs", False))
            and meta["layout"]["positions"] == "all"
            and bool(meta["layout"].get("has_token_type_ids", False)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "layers": list(self.layers),
            "positions": self.positions,
            "pooling": self.pooling,
            "num_heads": self.num_heads,
            "causal": self.causal,
            "task": self.task,
            "lst_prune": self.lst_prune,
            "dtype": self.dtype,
            "pairs": self.pairs,
        }


@dataclass
class SideBatch:
    """``B`` samples' rows back to back: sample ``i`` owns ``lengths[i]`` consecutive rows.

    What a side network's ``forward(batch)`` gets; it returns ``(B, C)``, one row per sample
    in batch order (``C = info.num_outputs``). All tensors are on the training device.

    * ``hidden``: ``(R, L, D)`` float32, ``R = lengths.sum()``, ``L = len(info.layers)``,
      ``D = info.hidden_size``. Sample ``i``'s rows are
      ``hidden[starts[i] : starts[i] + lengths[i]]`` (:attr:`starts`), in token order when the
      store holds every position; :meth:`padded` gives ``(B, T, L, D)`` plus a ``(B, T)`` mask.
    * ``lengths``: ``(B,)`` int64, rows per sample: its real tokens for ``positions=all``,
      otherwise all ones.
    * ``labels``: ``(B,)`` int64 class ids, or float32 targets for regression (zeros in
      ``sidecache predict``, where they are unknown).
    * ``samples``: ``(B,)`` int64, each sample's index in the store (its dataset order).
    * ``longest``: ``max(lengths)`` when the loader knew it (0: not known; :attr:`max_length`).
    * ``segments``: ``(R,)`` int8, each row's segment (``token_type_ids``: 0 for the first
      sentence of a pair, 1 for the second), or None: the store holds no segment ids, its
      dataset is not a sentence-pair task, or it holds other than ``--positions all``.

    Training batches are shuffled (:mod:`pipeline.loader`); evaluation and prediction pass
    consecutive samples in store order. With ``precision=bfloat16`` a batch may end in
    zero-filled pseudo-samples whose outputs are dropped, so a network must compute each
    sample's output from that sample's rows alone (no statistics across the batch).
    """

    hidden: torch.Tensor  # (R, L, D) float32, L = the store's layers in order
    lengths: torch.Tensor  # (B,) int64 rows per sample (all ones for single-position stores)
    labels: torch.Tensor  # (B,) int64 or float32
    samples: torch.Tensor  # (B,) int64 sample indices in the store
    # max(lengths) where the batch was cut on the host (the loaders), so a GPU batch needs no
    # sync to learn it; 0 = not known (read from ``lengths`` when needed)
    longest: int = 0
    # (R,) int8 segment of each row (a sentence pair's first: 0, second: 1); None when unknown
    segments: torch.Tensor | None = None

    @property
    def max_length(self) -> int:
        return self.longest or int(self.lengths.max())

    def to(self, device: torch.device) -> SideBatch:
        """On ``device``; the copies run asynchronously when this batch is :meth:`pinned`."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pinned(self) -> SideBatch:
        """A copy in page-locked host memory (what makes :meth:`to` a GPU asynchronous)."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SideBatch:
        hidden, lengths, labels, samples = (
            fn(t) for t in (self.hidden, self.lengths, self.labels, self.samples)
        )
        segments = None if self.segments is None else fn(self.segments)
        return SideBatch(hidden, lengths, labels, samples, self.longest, segments)

    @property
    def starts(self) -> torch.Tensor:  # (B,) first row of each sample
        return torch.cumsum(self.lengths, 0) - self.lengths

    def split(self, max_rows: int) -> list[SideBatch]:
        """Consecutive groups of whole samples of at most ``max_rows`` rows each (a longer sample
        is a group of its own); ``[self]`` when the batch fits or ``max_rows`` is 0. The groups'
        rows are views of this batch's rows."""
        if max_rows <= 0 or self.hidden.shape[0] <= max_rows:
            return [self]
        cuts, row = [(0, 0)], 0  # (first sample, first row) of each group, then the end
        sizes = self.lengths.tolist()
        for i, n in enumerate(sizes):
            if row > cuts[-1][1] and row + n - cuts[-1][1] > max_rows:
                cuts.append((i, row))
            row += n
        cuts.append((len(self.lengths), row))
        return [
            SideBatch(
                self.hidden[r:q],
                self.lengths[a:b],
                self.labels[a:b],
                self.samples[a:b],
                longest=max(sizes[a:b]),
                segments=None if self.segments is None else self.segments[r:q],
            )
            for (a, r), (b, q) in itertools.pairwise(cuts)
        ]

    def padded(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, ...)`` -> ``(B, T, ...)`` zero-padded, plus the ``(B, T)`` mask of real rows.
        Rows are placed by computed indices, not by the mask (a boolean index syncs a GPU)."""
        b, t = len(self.lengths), self.max_length
        lengths = self.lengths.to(rows.device)
        mask = torch.arange(t, device=rows.device)[None, :] < lengths[:, None]
        out = rows.new_zeros((b * t, *rows.shape[1:]))
        out[self._slots(rows.shape[0], rows.device)] = rows
        out = out.view(b, t, *rows.shape[1:])
        return out, mask

    def packed(self, padded: torch.Tensor) -> torch.Tensor:
        """``(B, T, ...)`` -> ``(R, ...)``: the real rows of a :meth:`padded` tensor, back to
        back (the inverse of :meth:`padded`; a gather by computed indices, no sync)."""
        b, t = padded.shape[:2]
        rows = int(self.hidden.shape[0])
        return padded.reshape(b * t, *padded.shape[2:])[self._slots(rows, padded.device)]

    def _slots(self, r: int, device: torch.device) -> torch.Tensor:
        """``(R,)``: each row's slot ``sample * T + position`` in a ``(B, T)`` padded layout."""
        b, t = len(self.lengths), self.max_length
        lengths = self.lengths.to(device)
        owner = torch.repeat_interleave(torch.arange(b, device=device), lengths, output_size=r)
        within = torch.arange(r, device=device) - (torch.cumsum(lengths, 0) - lengths)[owner]
        return owner * t + within


def select_rows(batch: SideBatch, rows: torch.Tensor, pool: str, info: StoreInfo) -> torch.Tensor:
    """The rows a single-position head reads (``first``/``last``), before any computation, so a
    ``--positions first`` store and an ``all`` store feed identical inputs. ``mean`` keeps all."""
    check_pool(pool, info)
    if info.positions != "all" or pool in ("mean", "pair"):
        return rows
    idx = batch.starts if pool == "first" else batch.starts + batch.lengths - 1
    return rows[idx]


def pool_rows(batch: SideBatch, rows: torch.Tensor, pool: str, info: StoreInfo) -> torch.Tensor:
    """``(R, D)`` -> ``(B, D)``: rows already selected by :func:`select_rows` or a masked mean;
    ``(B, 4D + 1)`` for ``pool=pair`` (:func:`pair_pool`)."""
    if pool == "pair":
        return pair_pool(batch, rows)
    if info.positions != "all" or pool != "mean":
        return rows
    # a segmented sum: deterministic on CUDA (``index_add_`` is not), and on CPU bit for bit the
    # row-by-row sum in float32 (in 16-bit dtypes it accumulates in float32, then rounds once)
    out = torch.segment_reduce(rows, "sum", lengths=batch.lengths, axis=0)  # (B, D)
    return out / batch.lengths.to(rows.dtype)[:, None]


def pooled_width(pool: str, width: int) -> int:
    """Width of a pooled sample: ``width``, or ``4 * width + 1`` for ``pool=pair``."""
    return 4 * width + 1 if pool == "pair" else width


def pair_pool(batch: SideBatch, rows: torch.Tensor) -> torch.Tensor:
    """``(R, D)`` -> ``(B, 4D + 1)``: each sentence of a pair mean-pooled on its own, ``u`` over
    the rows of segment 0 and ``v`` over those of segment 1, then ``[u, v, |u - v|, u * v,
    cos(u, v)]`` (how a bi-encoder such as MiniLM compares two sentences). A sample without
    rows of one segment pools zeros there. Segmented sums over masked rows: deterministic on
    CUDA and free of host syncs; on CPU each mean is bit for bit the row-by-row sum of that
    segment's rows divided by their count."""
    second = require_segments(batch).to(rows.device) > 0  # (R,)
    zero = rows.new_zeros(())
    wide = second.reshape(-1, *([1] * (rows.dim() - 1)))
    lengths = batch.lengths.to(rows.device)
    sum_u = torch.segment_reduce(torch.where(wide, zero, rows), "sum", lengths=lengths, axis=0)
    sum_v = torch.segment_reduce(torch.where(wide, rows, zero), "sum", lengths=lengths, axis=0)
    n_v = torch.segment_reduce(second.float(), "sum", lengths=lengths, axis=0)  # (B,) exact
    n_u = lengths.float() - n_v
    u = sum_u / n_u.clamp(min=1)[:, None]
    v = sum_v / n_v.clamp(min=1)[:, None]
    cos = torch.nn.functional.cosine_similarity(u, v, dim=-1)[:, None]
    return torch.cat([u, v, (u - v).abs(), u * v, cos.to(u.dtype)], dim=-1)


def require_segments(batch: SideBatch) -> torch.Tensor:
    """The batch's row segments; refused when the loader had none to give."""
    if batch.segments is None:
        raise StoreMismatchError(
            "pool=pair pools the two sentences of a pair separately, but the batch has no "
            "segment ids: its store holds single sentences, or comes from a backbone without "
            "token_type_ids, or was not cached with --positions all. Expected a sentence-pair "
            "task cached with --positions all; otherwise use pool=mean, first or last"
        )
    return batch.segments


def check_pool(pool: str, info: StoreInfo) -> None:
    if pool not in ("first", "last", "mean", "pair"):
        raise StoreMismatchError(f"pool must be first, last, mean or pair; found {pool!r}")
    if pool == "pair" and info.positions != "all":
        raise StoreMismatchError(
            f"pool=pair pools each sentence of a pair from its token rows, but the store holds "
            f"only {info.positions!r} positions; use a store cached with --positions all"
        )
    if info.positions not in ("all", pool):
        raise StoreMismatchError(
            f"the side network pools {pool!r} but the store holds only {info.positions!r} "
            f"positions; use pool={info.positions} or a store cached with --positions all"
        )


def layer_index(info: StoreInfo, layer: int) -> int:
    """Position in the batch's layer axis of hidden state ``layer`` (negative: from the end)."""
    if layer < 0:
        if -layer > len(info.layers):
            raise StoreMismatchError(
                f"layer {layer}: the store holds only {len(info.layers)} layers"
            )
        return len(info.layers) + layer
    if layer not in info.layers:
        raise StoreMismatchError(
            f"layer {layer} is not in the store (it holds {list(info.layers)}); re-cache with it"
        )
    return info.layers.index(layer)


def make_head(width: int, outputs: int, hidden: int, dropout: float) -> nn.Module:
    """Task head: linear, or a one-hidden-layer MLP when ``hidden > 0``."""
    if hidden <= 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, outputs))
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(hidden, outputs),
    )  # fmt: skip


def loss_fn(info: StoreInfo, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if info.task["type"] == "regression":
        return nn.functional.mse_loss(outputs.reshape(-1), labels.float())
    return nn.functional.cross_entropy(outputs, labels.long())

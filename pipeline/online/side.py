"""Online READ and LST: stage two's side networks fed by the frozen backbone at every step.

The backbone stays in ``eval()`` under ``inference_mode`` (:func:`pipeline.extract.forward_rows`,
the code stage one runs); its rows are rounded to ``dtype`` exactly as a store of that dtype
would hold them, stacked into a :class:`pipeline.sidenets.SideBatch` and handed to the side
network. With ``dtype="float32"`` and stage two's batch order this reproduces training from a
float32 store to float round-off (``tests/online/test_online_read.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.backbone import Backbone
from pipeline.extract import encode, forward_rows
from pipeline.online.batches import TokenBatch
from pipeline.sidenets import SideBatch, StoreInfo
from storage import decode_rows


def online_info(bb: Backbone, task: dict[str, Any], dtype: str, pairs: bool = False) -> StoreInfo:
    """The :class:`StoreInfo` a store of every layer and token of this backbone would have;
    ``pairs``: the data are sentence pairs (their segments count when the backbone takes
    ``token_type_ids``, as a store records them then)."""
    pooling = str(bb.identity["pooling"])
    return StoreInfo(
        hidden_size=bb.hidden_size,
        layers=tuple(range(bb.n_layers)),
        positions="all",
        pooling=pooling,
        num_heads=int(bb.identity["num_attention_heads"] or 1),
        causal=pooling == "last",
        task=dict(task),
        dtype=dtype,
        pairs=pairs and bb.takes_token_type_ids,
    )


def rounded(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """``(R, D)`` float32 rows as a store of ``dtype`` gives them back."""
    if dtype == "float32":
        return x
    data, scale = encode(x, dtype)
    return torch.from_numpy(np.ascontiguousarray(decode_rows(data, dtype, scale))).to(x.device)


def side_batch(bb: Backbone, batch: TokenBatch, info: StoreInfo) -> SideBatch:
    """Run the backbone on a token batch; the rows every layer would have stored, as a batch."""
    rows = forward_rows(bb, batch.ids, list(info.layers), "all")  # L x (R, D)
    hidden = torch.stack([rounded(r, info.dtype) for r in rows], dim=1)  # (R, L, D)
    samples = torch.from_numpy(batch.ids.samples).to(hidden.device)
    segments = None
    if info.pairs and batch.ids.token_type_ids is not None:  # each row's sentence, as stored
        flat, real = batch.ids.token_type_ids.reshape(-1), batch.ids.real_slots
        segments = (flat if real is None else flat.index_select(0, real)).to(torch.int8)
    return SideBatch(hidden, batch.lengths, batch.labels, samples, segments=segments)

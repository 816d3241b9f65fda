"""A side network of your own: attention pooling over one stored layer's rows.

Each row (token) of the layer gets a score; a softmax over each sample's rows weights them, and
the weighted sum goes through a linear head. The scores start at zero, so training starts from
mean pooling. Train it like a built-in kind, naming the class by import path (from the
repository root, where ``examples`` is found)::

    sidecache train --train STORE --eval STORE --out OUT --epochs 3 \\
        --sidenet examples.attention_pool.AttentionPool:layer=-1,dropout=0.1,lr=3e-3

Its keys are the constructor's keyword parameters (typed by their annotations); ``lr``,
``seed``, ``name`` and the other training keys work as for any kind. The run lands in
``OUT/attentionpool/``; ``sidecache predict --run OUT/attentionpool ...`` rebuilds it from the
spec recorded in the checkpoint. What ``info`` and ``batch`` hold: ``pipeline.sidenets``'s
``StoreInfo`` and ``SideBatch``.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.sidenets import SideBatch, StoreInfo


class AttentionPool(nn.Module):
    def __init__(self, info: StoreInfo, layer: int = -1, dropout: float = 0.1):
        super().__init__()
        layers = list(info.layers)  # stored hidden-state indices; negative: from the last
        if layer not in layers and not -len(layers) <= layer < 0:
            raise ValueError(f"layer {layer} is not stored; the store holds {layers}")
        self.index = layers.index(layer) if layer >= 0 else len(layers) + layer
        self.score = nn.Linear(info.hidden_size, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(info.hidden_size, info.num_outputs)

    def forward(self, batch: SideBatch) -> torch.Tensor:
        rows = batch.hidden[:, self.index]  # (R, D): every sample's rows, back to back
        x, mask = batch.padded(rows)  # (B, T, D) zero-padded, (B, T) True on real rows
        scores = self.score(x).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, T)
        pooled = torch.einsum("bt,btd->bd", scores.softmax(-1), x)  # (B, D)
        return self.head(self.drop(pooled))  # (B, C)

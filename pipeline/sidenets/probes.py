"""Probes: a linear or MLP head on one stored layer, or on a learned softmax mix of layers.

The honest floor every side network has to beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.sidenets.base import (
    SideBatch,
    StoreInfo,
    check_pool,
    layer_index,
    make_head,
    pool_rows,
    pooled_width,
    select_rows,
)


@dataclass
class ProbeConfig:
    layer: int = -1  # hidden-state index, negative from the end; ignored when mix is set
    mix: bool = False  # learned softmax mix of every stored layer
    hidden: int = 0  # 0 = linear probe
    pool: str = ""  # first | last | mean | pair; empty = info.default_pool
    dropout: float = 0.1


class Probe(nn.Module):
    def __init__(self, info: StoreInfo, cfg: ProbeConfig):
        super().__init__()
        self.info, self.cfg = info, cfg
        self.pool = cfg.pool or info.default_pool
        check_pool(self.pool, info)
        self.index = layer_index(info, cfg.layer)
        self.mix_logits = nn.Parameter(torch.zeros(len(info.layers))) if cfg.mix else None
        width = pooled_width(self.pool, info.hidden_size)
        self.head = make_head(width, info.num_outputs, cfg.hidden, cfg.dropout)

    def forward(self, batch: SideBatch) -> torch.Tensor:
        h = select_rows(batch, batch.hidden, self.pool, self.info)  # (R, L, D)
        if self.mix_logits is None:
            x = h[:, self.index]  # (R, D)
        else:
            x = torch.einsum("l,rld->rd", self.mix_logits.softmax(0), h)
        return self.head(pool_rows(batch, x, self.pool, self.info))  # (B, C)

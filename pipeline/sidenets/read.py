"""READ (Nguyen et al. 2023): a small RNN over the *layer axis* of every token.

For each token, x_i = W_in · Norm(h_i) for the stored layers i, z_i = RNN(x_i, z_{i-1});
the aggregate of z (last step or mean) goes through W_out to a correction δ that is added to
the deepest stored hidden state; the corrected state is pooled and fed to the task head. W_out
starts tiny, so δ starts near zero and the network starts as a probe on the final layer.

A single-position head (``pool=first|last``) only runs the recurrence on that token, so it trains
identically from a ``--positions first|last`` store. On a ``mean`` store the recurrence runs on
per-layer mean-pooled states: a cheaper variant, not READ itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.sidenets.base import (
    SideBatch,
    StoreInfo,
    check_pool,
    make_head,
    pool_rows,
    pooled_width,
    select_rows,
)
from storage import ConfigError

RNNS = {"gru": nn.GRU, "lstm": nn.LSTM, "elman": nn.RNN}


@dataclass
class ReadConfig:
    hidden: int = 128  # RNN width
    rnn: str = "gru"  # gru | lstm | elman
    aggregate: str = "last"  # last | mean over the layer steps
    pool: str = ""  # first | last | mean | pair; empty = info.default_pool
    head_hidden: int = 0  # 0 = linear head
    dropout: float = 0.1
    init_scale: float = 1e-3  # std of W_out at start: the correction starts near zero


class Read(nn.Module):
    def __init__(self, info: StoreInfo, cfg: ReadConfig):
        super().__init__()
        if cfg.rnn not in RNNS:
            raise ConfigError(f"read: rnn must be one of {sorted(RNNS)}; found {cfg.rnn!r}")
        if cfg.aggregate not in ("last", "mean"):
            raise ConfigError(f"read: aggregate must be last or mean; found {cfg.aggregate!r}")
        self.info, self.cfg = info, cfg
        self.pool = cfg.pool or info.default_pool
        check_pool(self.pool, info)
        d = info.hidden_size
        self.norm = nn.LayerNorm(d)
        self.w_in = nn.Linear(d, cfg.hidden)
        self.rnn = RNNS[cfg.rnn](cfg.hidden, cfg.hidden, batch_first=True)
        self.w_out = nn.Linear(cfg.hidden, d)
        nn.init.normal_(self.w_out.weight, std=cfg.init_scale)
        nn.init.zeros_(self.w_out.bias)
        width = pooled_width(self.pool, d)
        self.head = make_head(width, info.num_outputs, cfg.head_hidden, cfg.dropout)

    def forward(self, batch: SideBatch) -> torch.Tensor:
        h = select_rows(batch, batch.hidden, self.pool, self.info)  # (R, L, D)
        x = self.w_in(self.norm(h))  # (R, L, H)
        z, _ = self.rnn(x)  # (R, L, H)
        agg = z[:, -1] if self.cfg.aggregate == "last" else z.mean(1)  # (R, H)
        corrected = h[:, -1] + self.w_out(agg)  # (R, D)
        return self.head(pool_rows(batch, corrected, self.pool, self.info))  # (B, C)

"""LST, ladder side-tuning (Sung et al. 2022): a thin transformer beside the backbone.

Width d/r with the backbone's head count (fewer when that does not divide the width). The side
state starts as a projection of the embedding output; before side block i, a ladder from stored
layer l_i is mixed in: s ← g_i · s + (1 − g_i) · W_i h_{l_i}, with g_i = sigmoid(α_i / T),
T = 0.1 and α_i = 0 at start. The output is projected back up to d, pooled, and fed to the head.
Attention masks come from the stored offsets. Needs a ``--positions all`` store.

Side blocks are pre-LN when initialised at random. With ``init=pruned`` side block i starts as
the backbone's block i pruned to width d/r (:mod:`pipeline.prune`) and computes as that block
does: post-LN (BERT's arrangement), its LayerNorms at the kept dimensions, attention scaled by
the backbone's head width. Copied into a pre-LN block the same weights computed another function
(at r = 1, 1.9-5.2x the norm of the block's output off, against 0 this way:
``benchmarks.lst_pruned``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.sidenets.base import (
    SideBatch,
    StoreInfo,
    check_pool,
    layer_index,
    make_head,
    pair_pool,
    pooled_width,
)
from storage import ConfigError, StoreMismatchError


@dataclass
class LstConfig:
    r: int = 8  # reduction factor: side width = hidden_size / r
    ladders: str = "all"  # stored layers feeding side blocks ("all" = every layer after 0)
    heads: int = 0  # 0 = the backbone's head count (reduced until it divides the width)
    ff_mult: int = 4
    pool: str = ""  # first | last | mean | pair; empty = info.default_pool
    head_hidden: int = 0
    dropout: float = 0.1
    temperature: float = 0.1
    init: str = "random"  # random | pruned (from the backbone copy stored by --lst-prune R)


# BERT-family LayerNorms (the only blocks pipeline.prune copies) use this epsilon
BERT_LN_EPS = 1e-12


class SideBlock(nn.Module):
    """Transformer block with an explicit key-padding (and optional causal) mask: pre-LN, or
    post-LN with a given attention scale (a pruned copy of a BERT block)."""

    def __init__(self, width: int, heads: int, ff_mult: int, dropout: float,
                 post_ln: bool = False, scale: float | None = None):  # fmt: skip
        super().__init__()
        self.heads, self.post_ln, self.scale = heads, post_ln, scale
        eps = BERT_LN_EPS if post_ln else 1e-5
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ff = nn.Sequential(
            nn.Linear(width, ff_mult * width), nn.GELU(), nn.Linear(ff_mult * width, width)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, s: torch.Tensor, mask: torch.Tensor, causal: bool) -> torch.Tensor:
        b, t, w = s.shape  # (B, T, W)
        x = s if self.post_ln else self.norm1(s)
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).unbind(2)
        allowed = mask[:, None, None, :]  # (B, 1, 1, T) keys that are real tokens
        if causal:
            allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=s.device).tril()
        out = F.scaled_dot_product_attention(  # (B, H, T, W/H)
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=allowed,
            scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(b, t, w)
        if self.post_ln:  # BERT: LN(s + attn(s)), then LN(s + ff(s))
            s = self.norm1(s + self.drop(self.proj(out)))
            return self.norm2(s + self.drop(self.ff(s)))
        s = s + self.drop(self.proj(out))
        return s + self.drop(self.ff(self.norm2(s)))


class Lst(nn.Module):
    def __init__(self, info: StoreInfo, cfg: LstConfig):
        super().__init__()
        if info.positions != "all":
            raise StoreMismatchError(
                f"LST attends over tokens but the store holds only {info.positions!r} "
                "positions; use a store cached with --positions all"
            )
        if info.hidden_size % cfg.r:
            raise StoreMismatchError(
                f"lst: r={cfg.r} does not divide the store's hidden size {info.hidden_size}; "
                "choose an r that divides it (e.g. lst:r=8 for 384 or 768)"
            )
        self.info, self.cfg = info, cfg
        self.pool = cfg.pool or info.default_pool
        check_pool(self.pool, info)
        d, width = info.hidden_size, info.hidden_size // cfg.r
        heads = cfg.heads or info.num_heads
        while width % heads:
            heads -= 1
        ladders = (
            [x for x in info.layers if x != info.layers[0]]
            if cfg.ladders == "all"
            else [int(x) for x in cfg.ladders.split("+")]
        )
        if not ladders:
            raise StoreMismatchError("LST needs at least two stored layers (input and a ladder)")
        self.input_index = 0
        self.ladder_index = [layer_index(info, x) for x in ladders]
        self.down_in = nn.Linear(d, width)
        self.down = nn.ModuleList(nn.Linear(d, width) for _ in ladders)
        self.alpha = nn.Parameter(torch.zeros(len(ladders)))
        pruned = cfg.init == "pruned"  # blocks computed as the backbone's (see the docstring)
        scale = 1.0 / math.sqrt(d // info.num_heads) if pruned else None
        self.blocks = nn.ModuleList(
            SideBlock(width, heads, cfg.ff_mult, cfg.dropout, post_ln=pruned, scale=scale)
            for _ in ladders
        )
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, d)
        self.head = make_head(pooled_width(self.pool, d), info.num_outputs, cfg.head_hidden,
                              cfg.dropout)  # fmt: skip
        self.ladders = ladders
        if cfg.init == "pruned" and (heads != info.num_heads or cfg.ff_mult != 4):
            raise StoreMismatchError("lst:init=pruned keeps the backbone's heads and ff_mult=4")
        if cfg.init not in ("random", "pruned"):
            raise ConfigError(f"lst: init must be random or pruned; found {cfg.init!r}")

    def store_arrays(self) -> list[str]:
        """The arrays of the train store that :meth:`init_from_store` needs (none for a random
        init). The caller reads them: a side network never opens a store."""
        cfg, info = self.cfg, self.info
        if cfg.init != "pruned":
            return []
        if info.lst_prune != cfg.r:
            raise StoreMismatchError(
                f"lst:init=pruned needs a store cached with --lst-prune {cfg.r}; this store has "
                f"{info.lst_prune!r}. Re-run stage one with --lst-prune {cfg.r}"
            )
        prefix = f"lst_init/r{cfg.r}"
        names = [f"{prefix}/hidden_index"]
        for layer in self.ladders:
            for name in ("qkv", "proj", "ff1", "ff2", "ln1", "ln2"):
                names += [f"{prefix}/block{layer}/{name}_{part}" for part in ("weight", "bias")]
        return names

    @torch.no_grad()
    def init_from_store(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Side block i starts as the pruned copy of the backbone block that produced ladder i;
        the down/up projections start as the selection of the kept residual dimensions. Called
        once, when training starts from scratch (checkpoints restore the weights otherwise)."""
        cfg, info = self.cfg, self.info
        prefix = f"lst_init/r{cfg.r}"
        keep = torch.from_numpy(arrays[f"{prefix}/hidden_index"])
        select = torch.zeros(len(keep), info.hidden_size)
        select[torch.arange(len(keep)), keep] = 1.0
        for lin in (self.down_in, *self.down):
            lin.weight.copy_(select)
            lin.bias.zero_()
        self.up.weight.copy_(select.T)
        self.up.bias.zero_()
        for block, layer in zip(self.blocks, self.ladders, strict=True):
            assert isinstance(block, SideBlock)
            pairs = [(block.qkv, "qkv"), (block.proj, "proj"), (block.ff[0], "ff1"),
                     (block.ff[2], "ff2"), (block.norm1, "ln1"), (block.norm2, "ln2")]  # fmt: skip
            for lin, name in pairs:
                for part in ("weight", "bias"):
                    data = arrays[f"{prefix}/block{layer}/{name}_{part}"]
                    getattr(lin, part).copy_(torch.from_numpy(data))

    def forward(self, batch: SideBatch) -> torch.Tensor:
        h = batch.hidden  # (R, L, D): project the packed rows down first, then pad (W << D)
        s, mask = batch.padded(self.down_in(h[:, self.input_index]))  # (B, T, W), (B, T)
        gates = torch.sigmoid(self.alpha / self.cfg.temperature)
        for i, block in enumerate(self.blocks):
            ladder, _ = batch.padded(self.down[i](h[:, self.ladder_index[i]]))  # (B, T, W)
            s = gates[i] * s + (1 - gates[i]) * ladder
            s = block(s, mask, self.info.causal)
        out = self.up(self.norm(s))  # (B, T, D)
        if self.pool == "pair":  # each sentence of the pair pooled on its own
            return self.head(pair_pool(batch, batch.packed(out)))
        return self.head(_pool_padded(out, mask, batch.lengths, self.pool))


def _pool_padded(
    x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, pool: str
) -> torch.Tensor:
    if pool == "first":
        return x[:, 0]
    if pool == "last":
        return x[torch.arange(len(lengths), device=x.device), lengths - 1]
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / lengths.to(x.dtype)[:, None]

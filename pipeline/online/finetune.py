"""Full fine-tuning and LoRA: the backbone's last hidden state, pooled like the backbone pools,
into the same task head as stage two's side networks (:func:`pipeline.sidenets.base.make_head`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.backbone import Backbone
from pipeline.extract import DeviceBatch, gather
from pipeline.online.batches import TokenBatch
from pipeline.sidenets.base import make_head


@dataclass
class FullConfig:
    pool: str = ""  # first | last | mean; empty = the backbone's own pooling
    dropout: float = 0.1  # head dropout (the backbone keeps its own dropout settings)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    lora_dropout: float = 0.1
    targets: str = ""  # module names joined by '+', e.g. query+value; empty = peft's default
    pool: str = ""
    dropout: float = 0.1


def backbone_kwargs(bb: Backbone, ids: DeviceBatch) -> dict[str, Any]:
    """Keyword arguments of one backbone call, as stage one passes them."""
    kwargs: dict[str, Any] = {"input_ids": ids.input_ids, "attention_mask": ids.attention_mask}
    if ids.token_type_ids is not None and bb.takes_token_type_ids:
        kwargs["token_type_ids"] = ids.token_type_ids
    if "use_cache" in inspect.signature(bb.model.forward).parameters:
        kwargs["use_cache"] = False
    return kwargs


class Finetuned(nn.Module):
    """``encoder`` (the backbone, possibly wrapped by peft) -> pool -> head."""

    def __init__(self, bb: Backbone, encoder: nn.Module, pool: str, outputs: int, dropout: float):
        super().__init__()
        self.bb, self.encoder = bb, encoder
        self.pool = pool or str(bb.identity["pooling"])
        if self.pool not in ("first", "last", "mean"):
            raise ValueError(f"pool must be first, last or mean; found {self.pool!r}")
        self.head = make_head(bb.hidden_size, outputs, 0, dropout)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        out = self.encoder(**backbone_kwargs(self.bb, batch.ids))
        h = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, D)
        return self.head(gather(h, batch.ids, self.pool))  # (B, C)


def build_full(bb: Backbone, cfg: FullConfig, outputs: int) -> nn.Module:
    bb.model.requires_grad_(True)
    return Finetuned(bb, bb.model, cfg.pool, outputs, cfg.dropout)


def build_lora(bb: Backbone, cfg: LoraConfig, outputs: int) -> nn.Module:
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    targets = [t for t in cfg.targets.split("+") if t] or None
    peft_cfg = PeftLora(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, target_modules=targets
    )
    wrapped = get_peft_model(bb.model, peft_cfg)  # freezes everything but the LoRA factors
    return Finetuned(bb, wrapped, cfg.pool, outputs, cfg.dropout)

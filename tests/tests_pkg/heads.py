"""Side networks of the kind a user writes, named by import path in the tests' specs."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.sidenets import SideBatch, StoreInfo

CONSTANT = 3


class MyHead(nn.Module):
    """Mean of one layer's rows per sample, then a one-hidden-layer MLP."""

    def __init__(self, info: StoreInfo, hidden: int = 16, dropout: float = 0.1, layer: int = -1,
                 center: bool = False, act: str = "gelu", scale: float | None = None):  # fmt: skip
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be at least 1; found {hidden}")
        self.index = layer % len(info.layers)
        self.center, self.scale = center, scale
        self.args = {"hidden": hidden, "dropout": dropout, "layer": layer, "center": center,
                     "act": act, "scale": scale}  # fmt: skip
        self.net = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(info.hidden_size, hidden),
            nn.GELU() if act == "gelu" else nn.ReLU(), nn.Linear(hidden, info.num_outputs),
        )  # fmt: skip

    def forward(self, batch: SideBatch) -> torch.Tensor:
        rows, mask = batch.padded(batch.hidden[:, self.index])  # (B, T, D), (B, T)
        x = (rows * mask[..., None]).sum(1) / batch.lengths[:, None].to(rows.dtype)
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        return self.net(x * (self.scale or 1.0))


class AnyKeys(MyHead):
    """Takes any key (``**kwargs``): values arrive as text."""

    def __init__(self, info: StoreInfo, hidden: int = 16, **kwargs: object):
        super().__init__(info, hidden)
        self.extra = kwargs


class NeedsWidth(MyHead):
    def __init__(self, info: StoreInfo, width: int):
        super().__init__(info, width)


class WrongShape(MyHead):
    """Returns one column too many."""

    def forward(self, batch: SideBatch) -> torch.Tensor:
        out = super().forward(batch)
        return torch.cat([out, out[:, :1]], 1)


class Flat(MyHead):
    """Returns ``(B,)``: no output axis."""

    def forward(self, batch: SideBatch) -> torch.Tensor:
        return super().forward(batch)[:, 0]


class NotAModule:
    def __init__(self, info: StoreInfo):
        self.info = info

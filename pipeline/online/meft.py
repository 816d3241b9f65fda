"""MEFT (Liao, Tan, Monz 2023): a BERT-family encoder made reversible with bottleneck adapters.

Every block ``n`` of the frozen backbone becomes a two-stream reversible coupling::

    y1 = λ·x1 + F(x2)      F(x) = A_n(layer_n(x)),   A_n(h) = h + up(gelu(down(h)))
    y2 = β·x2 + G(y1)      G(y) = up'(gelu(down'(y)))
    next block's input: (x1, x2) <- (y2, y1)

with both streams starting at the embedding output and the up-projections starting at zero, so
``G = 0`` and ``A_n`` is the identity at the start: the stream that enters ``F`` carries the
pretrained computation (plus λ times the output two blocks back; λ = 0.1 as in MEFT's first
variant), and the head reads ``y1`` of the last block. Only the adapters and the head train.

The coupling is inverted exactly: ``x2 = (y2 - G(y1)) / β``, ``x1 = (y1 - F(x2)) / λ``. So
:class:`RevStack` keeps only the last block's two outputs (and each block's random-number state,
for dropout) from the forward pass; the backward pass walks the blocks from the top, rebuilds each
block's inputs from its outputs, re-runs ``F`` and ``G`` with autograd on and back-propagates
through them locally. Activation memory is that of one block, whatever the depth.

Dividing by λ amplifies round-off about 1/λ-fold per block going down. In float64 the gradients
equal ordinary autograd's to 1e-9 (``tests/online/test_meft.py``). Measured in float32 on MiniLM
(6 blocks, one CoLA batch), the relative gradient error of block 0's adapters is 9e-3 at λ = 0.1,
4e-6 at λ = 0.5 and 1e-6 at λ = 1 (the last block: 2e-7 for all); so for deeper backbones in
float32 use ``lam=0.5`` or more. The last block's ``G`` adapter does not reach the head.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from pipeline import rng
from pipeline.backbone import Backbone
from pipeline.errors import ConfigError
from pipeline.extract import gather
from pipeline.online.batches import TokenBatch
from pipeline.sidenets.base import make_head


@dataclass
class MeftConfig:
    bottleneck: int = 64  # adapter width
    lam: float = 0.1  # λ: weight of the skip stream in y1
    beta: float = 1.0  # β: weight of x2 in y2
    pool: str = ""  # first | last | mean; empty = the backbone's own pooling
    dropout: float = 0.1  # head dropout


class Bottleneck(nn.Module):
    """``x -> up(gelu(down(x)))``, with ``up`` zero at the start."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(x)))


class RevBlock(nn.Module):
    """One backbone block with its two adapters: ``f`` and ``g`` of the coupling."""

    def __init__(self, layer: nn.Module, width: int, bottleneck: int):
        super().__init__()
        self.layer = layer
        self.adapter_f, self.adapter_g = (
            Bottleneck(width, bottleneck),
            Bottleneck(width, bottleneck),
        )

    def f(self, x: torch.Tensor, mask: Any) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        out = self.layer(x, attention_mask=mask)
        h = out[0] if isinstance(out, tuple) else out
        return h + self.adapter_f(h)

    def g(self, y: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        return self.adapter_g(y)

    def trainable(self, part: str) -> list[nn.Parameter]:
        mods = [self.layer, self.adapter_f] if part == "f" else [self.adapter_g]
        return [p for m in mods for p in m.parameters() if p.requires_grad]


class RevStack(torch.autograd.Function):
    """``(x1, x2) -> (x1', x2')`` through every block, storing only the last outputs."""

    @staticmethod
    def forward(
        ctx: Any,
        x1: torch.Tensor,
        x2: torch.Tensor,
        blocks: list[RevBlock],
        mask: Any,
        lam: float,
        beta: float,
        *params: nn.Parameter,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        states = []
        with torch.no_grad():
            for b in blocks:
                sf = rng.capture(x1.device)
                y1 = lam * x1 + b.f(x2, mask)
                sg = rng.capture(x1.device)
                y2 = beta * x2 + b.g(y1)
                states.append((sf, sg))
                x1, x2 = y2, y1
        ctx.blocks, ctx.mask, ctx.lam, ctx.beta, ctx.states = blocks, mask, lam, beta, states
        ctx.index = {id(p): i for i, p in enumerate(params)}
        ctx.n_params = len(params)
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx: Any, g1: torch.Tensor, g2: torch.Tensor) -> tuple[Any, ...]:
        a, b_out = ctx.saved_tensors
        lam, beta, mask = ctx.lam, ctx.beta, ctx.mask
        grads: list[torch.Tensor | None] = [None] * ctx.n_params
        for blk, (sf, sg) in zip(reversed(ctx.blocks), reversed(ctx.states), strict=True):
            y2, y1, gy2, gy1 = a, b_out, g1, g2  # this block's outputs were swapped
            gparams = blk.trainable("g")
            with torch.enable_grad(), rng.swapped(sg, y1.device):
                y1_ = y1.detach().requires_grad_(True)
                gy = blk.g(y1_)
            dg = torch.autograd.grad(gy, [y1_, *gparams], gy2, allow_unused=True)
            with torch.no_grad():
                x2 = (y2 - gy) / beta
            fparams = blk.trainable("f")
            with torch.enable_grad(), rng.swapped(sf, y1.device):
                x2_ = x2.detach().requires_grad_(True)
                fx = blk.f(x2_, mask)
            gy1_total = gy1 + _zero_if_none(dg[0], y1)
            df = torch.autograd.grad(fx, [x2_, *fparams], gy1_total, allow_unused=True)
            with torch.no_grad():
                x1 = (y1 - fx) / lam
            _accumulate(grads, ctx.index, gparams, dg[1:])
            _accumulate(grads, ctx.index, fparams, df[1:])
            a, b_out = x1.detach(), x2.detach()
            g1, g2 = lam * gy1_total, beta * gy2 + _zero_if_none(df[0], x2)
        return (g1, g2, None, None, None, None, *grads)


def _zero_if_none(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def _accumulate(
    grads: list[torch.Tensor | None],
    index: dict[int, int],
    params: list[nn.Parameter],
    found: tuple[torch.Tensor | None, ...],
) -> None:
    for p, g in zip(params, found, strict=True):
        if g is None:
            continue
        i = index[id(p)]
        old = grads[i]
        grads[i] = g if old is None else old + g


def attention_mask_for(model: nn.Module, mask: torch.Tensor, emb: torch.Tensor) -> Any:
    """The mask a BERT block takes, built the way the model builds it."""
    create: Callable[..., Any] | None = getattr(model, "_create_attention_masks", None)
    if create is not None:
        given = {
            "attention_mask": mask,
            "encoder_attention_mask": None,
            "embedding_output": emb,
            "encoder_hidden_states": None,
        }
        # the cache argument is named past_key_values in some transformers releases and cache in
        # others (5.24): every parameter beyond these four is a cache of some kind, and None here
        rest = {name: None for name in inspect.signature(create).parameters if name not in given}
        out, _ = create(**given, **rest)
        return out
    return model.get_extended_attention_mask(mask, mask.shape)  # type: ignore[operator]


class Meft(nn.Module):
    """Embeddings (frozen) -> reversible blocks -> pool ``y1`` -> head."""

    def __init__(self, bb: Backbone, cfg: MeftConfig, outputs: int):
        super().__init__()
        if not hasattr(bb.model, "embeddings") or bb.causal:
            raise ConfigError(
                f"meft wraps BERT-family encoders (embeddings + encoder.layer); backbone "
                f"{bb.name!r} ({bb.identity['model_type']}) is not one; use full, lora or read"
            )
        if cfg.lam <= 0 or cfg.beta <= 0:
            raise ConfigError(f"meft needs lam > 0 and beta > 0; found {cfg.lam}, {cfg.beta}")
        self.bb, self.cfg = bb, cfg
        self.embeddings = cast(nn.Module, bb.model.embeddings)
        self.blocks = nn.ModuleList(
            RevBlock(layer, bb.hidden_size, cfg.bottleneck) for layer in bb.blocks
        )
        self.pool = cfg.pool or str(bb.identity["pooling"])
        self.head = make_head(bb.hidden_size, outputs, 0, cfg.dropout)
        self.reversible = True  # False: the same network through ordinary autograd (tests)

    def stack(self, emb: torch.Tensor, mask: Any) -> torch.Tensor:
        """``(B, T, D)`` embeddings -> ``(B, T, D)`` last block's ``y1``."""
        blocks = [cast(RevBlock, b) for b in self.blocks]
        lam, beta = self.cfg.lam, self.cfg.beta
        if self.reversible:
            params = [p for b in blocks for p in (*b.trainable("f"), *b.trainable("g"))]
            _, y1 = RevStack.apply(emb, emb, blocks, mask, lam, beta, *params)
            return cast(torch.Tensor, y1)
        x1, x2 = emb, emb
        for b in blocks:
            y1 = lam * x1 + b.f(x2, mask)
            y2 = beta * x2 + b.g(y1)
            x1, x2 = y2, y1
        return x2

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        ids = batch.ids
        types = ids.token_type_ids if self.bb.takes_token_type_ids else None
        emb = self.embeddings(input_ids=ids.input_ids, token_type_ids=types)  # (B, T, D)
        mask = attention_mask_for(self.bb.model, ids.attention_mask, emb)
        return self.head(gather(self.stack(emb, mask), ids, self.pool))  # (B, C)


def build_meft(bb: Backbone, cfg: MeftConfig, outputs: int) -> nn.Module:
    bb.model.requires_grad_(False)
    return Meft(bb, cfg, outputs)

"""LST's initialisation, computed in stage one: a pruned copy of every backbone block.

LST (Sung et al. 2022) starts its side blocks from the backbone's own blocks, structurally pruned
to width d/r by weight magnitude (L1 norm, as in Li et al. 2017). That needs the backbone, so
stage one does it and stores the result beside the hidden states (``lst_init/r<r>/...``); stage
two never needs the backbone. Supported: BERT-family blocks (``attention.self.query`` ...).

Kept dimensions: the same ``d/r`` residual dimensions everywhere (largest total L1 norm of the
rows that write into the residual stream), ``d/(r·H)`` dimensions inside each of the H heads
(largest L1 norm of their query, key and value rows) and ``4·d/r`` feed-forward units. The two
LayerNorms of each block are kept at the residual dimensions too: a BERT block is post-LN, and
the side block that starts from it computes the same way (:class:`pipeline.sidenets.lst.SideBlock`
with ``post_ln``), so at ``r = 1`` it is the backbone's block (``benchmarks.lst_pruned``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.backbone import Backbone
from pipeline.errors import BackboneError, ConfigError

FF_MULT = 4


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k).indices).values


def _block_parts(block: Any) -> dict[str, Any]:
    try:
        return {
            "q": block.attention.self.query,
            "k": block.attention.self.key,
            "v": block.attention.self.value,
            "o": block.attention.output.dense,
            "ff1": block.intermediate.dense,
            "ff2": block.output.dense,
            "ln1": block.attention.output.LayerNorm,  # after attention (post-LN)
            "ln2": block.output.LayerNorm,  # after the feed-forward
        }
    except AttributeError:
        raise BackboneError(
            f"LST pruned initialisation supports BERT-family blocks; {type(block).__name__} "
            "has no attention.self.query/... (drop --lst-prune)"
        ) from None


def lst_prune(bb: Backbone, r: int) -> dict[str, np.ndarray]:
    """Arrays to store under ``lst_init/r<r>/``: ``hidden_index`` and, per block (1-based, the
    block whose output is hidden state ``i``), ``block<i>/{qkv,proj,ff1,ff2,ln1,ln2}_{weight,
    bias}``."""
    d, heads = bb.hidden_size, int(bb.identity.get("num_attention_heads") or 1)
    if r < 1 or d % r or (d // r) % heads:
        raise ConfigError(
            f"--lst-prune {r}: the side width {d}/{r} must be a whole multiple of the "
            f"{heads} heads; pick r dividing {d // heads}"
        )
    w = d // r
    parts = [_block_parts(b) for b in bb.blocks]
    ff_units = parts[0]["ff1"].out_features
    if FF_MULT * w > ff_units:
        raise ConfigError(
            f"--lst-prune {r}: {FF_MULT * w} feed-forward units > the backbone's {ff_units}"
        )
    with torch.no_grad():
        residual = torch.stack(
            [p["o"].weight.abs().sum(1) + p["ff2"].weight.abs().sum(1) for p in parts]
        ).sum(0)
        keep = _top(residual, w)  # (w,) residual dims
        out: dict[str, np.ndarray] = {"hidden_index": keep.cpu().numpy().astype(np.int64)}
        for i, p in enumerate(parts, start=1):
            out.update({f"block{i}/{k}": v for k, v in _prune_block(p, keep, heads, w).items()})
    return {f"lst_init/r{r}/{k}": v for k, v in out.items()}


def _prune_block(p: dict[str, Any], keep: torch.Tensor, heads: int, w: int
                 ) -> dict[str, np.ndarray]:  # fmt: skip
    d = p["q"].weight.shape[0]
    hd, side_hd = d // heads, w // heads
    qkv_rows = p["q"].weight.abs().sum(1) + p["k"].weight.abs().sum(1) + p["v"].weight.abs().sum(1)
    per_head = [h * hd + _top(qkv_rows[h * hd : (h + 1) * hd], side_hd) for h in range(heads)]
    head_idx = torch.cat(per_head)  # (w,) head-major, like the side block's q/k/v layout
    ff_idx = _top(p["ff1"].weight.abs().sum(1), FF_MULT * w)

    def rows_cols(lin: torch.nn.Linear, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return lin.weight[rows][:, cols]

    tensors = {
        "qkv_weight": torch.cat([rows_cols(p[x], head_idx, keep) for x in "qkv"]),
        "qkv_bias": torch.cat([p[x].bias[head_idx] for x in "qkv"]),
        "proj_weight": rows_cols(p["o"], keep, head_idx),
        "proj_bias": p["o"].bias[keep],
        "ff1_weight": rows_cols(p["ff1"], ff_idx, keep),
        "ff1_bias": p["ff1"].bias[ff_idx],
        "ff2_weight": rows_cols(p["ff2"], keep, ff_idx),
        "ff2_bias": p["ff2"].bias[keep],
        "ln1_weight": p["ln1"].weight[keep],
        "ln1_bias": p["ln1"].bias[keep],
        "ln2_weight": p["ln2"].weight[keep],
        "ln2_bias": p["ln2"].bias[keep],
    }
    return {k: v.float().cpu().numpy() for k, v in tensors.items()}

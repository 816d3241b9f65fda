"""How faithful is LST's pruned initialisation? Each side block against the backbone block it was
pruned from, on real hidden states.

``lst:init=pruned`` starts side block i from backbone block i pruned to width d/r
(:mod:`pipeline.prune`). If the copy is good, feeding the block the kept dimensions of the
backbone's hidden state ``h_{i-1}`` should give back (close to) the kept dimensions of ``h_i``.
This script measures, per block, the relative error ``|pred - h_i[keep]| / |h_i[keep]|`` over the
real tokens of ``--n`` sentences, for three predictions:

* ``identity``: ``h_{i-1}[keep]`` itself (a block that does nothing);
* ``pre-LN copy``: the pruned weights in a pre-LN block with fresh LayerNorms and attention
  scaled by the side head width (how ``init=pruned`` used to start: another function than the
  backbone's, even unpruned at ``r = 1``);
* ``init=pruned``: the side block as LST builds it now: post-LN like BERT, the backbone's
  LayerNorms at the kept dimensions, the backbone's attention scale (at ``r = 1`` it is the
  backbone's block).

Run from the repository root (MiniLM from PyPI, GLUE dev sentences; seconds on a CPU)::

    .venv/bin/python -m benchmarks.lst_pruned --data glue:../shared/data/glue/SST-2 --r 8
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

from pipeline.backbone import hidden_states, load_backbone
from pipeline.data import head, load_data
from pipeline.extract import make_batch
from pipeline.prune import lst_prune
from pipeline.sidenets import StoreInfo
from pipeline.sidenets.lst import Lst, LstConfig, SideBlock
from pipeline.tokens import tokenize


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--data", default="glue:../shared/data/glue/SST-2")
    p.add_argument("--split", default="dev")
    p.add_argument("--n", type=int, default=256, help="sentences (default 256)")
    p.add_argument("--r", type=int, default=8, help="LST reduction factor (default 8)")
    return p.parse_args(argv)


def pre_ln_copy(block: SideBlock, width: int, heads: int) -> SideBlock:
    """``block``'s weights in a pre-LN block with fresh LayerNorms and the default scale."""
    old = SideBlock(width, heads, 4, block.drop.p)
    state = {k: v for k, v in block.state_dict().items() if not k.startswith("norm")}
    old.load_state_dict(state, strict=False)
    return old.eval()


def rel_error(pred: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> float:
    d = (pred - want)[mask]
    return float(d.norm() / want[mask].norm())


@torch.no_grad()
def measure(args: argparse.Namespace) -> dict[str, Any]:
    bb = load_backbone(args.backbone, "cpu")
    data = head(load_data(args.data, args.split), args.n)
    tok = tokenize(bb.tokenizer, data, bb.max_length, bb.takes_token_type_ids)
    batch = make_batch(tok, np.arange(len(data)), torch.device("cpu"))
    layers = list(range(bb.n_layers))
    hs = hidden_states(bb, batch.input_ids, batch.attention_mask, batch.token_type_ids, layers)
    mask = batch.attention_mask.bool()
    arrays = lst_prune(bb, args.r)
    prefix = f"lst_init/r{args.r}"
    keep = torch.from_numpy(arrays[f"{prefix}/hidden_index"])
    heads = int(bb.identity["num_attention_heads"])
    info = StoreInfo(hidden_size=bb.hidden_size, layers=tuple(layers), positions="all",
                     pooling="mean", num_heads=heads, causal=False,
                     task={"name": "x", "type": "classification", "num_labels": 2},
                     lst_prune=args.r)  # fmt: skip
    side = Lst(info, LstConfig(r=args.r, init="pruned"))
    side.init_from_store({k: arrays[k] for k in side.store_arrays()})
    side.eval()
    rows = []
    for i, block in enumerate(side.blocks, start=1):
        assert isinstance(block, SideBlock)
        x, want = hs[i - 1][..., keep], hs[i][..., keep]
        old = pre_ln_copy(block, bb.hidden_size // args.r, heads)
        rows.append({
            "block": i,
            "identity": rel_error(x, want, mask),
            "pre-LN copy": rel_error(old(x, mask, False), want, mask),
            "init=pruned": rel_error(block(x, mask, False), want, mask),
        })  # fmt: skip
    return {"backbone": args.backbone, "data": args.data, "split": args.split, "n": len(data),
            "r": args.r, "width": bb.hidden_size // args.r, "blocks": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = measure(args)
    print(json.dumps(report, indent=2), file=sys.stderr)
    print(
        f"relative error of each prediction of h_i[keep] ({report['n']} sentences of "
        f"{report['data']} {report['split']}, r={report['r']}, side width {report['width']})"
    )
    print("| block | identity | pre-LN copy | init=pruned |")
    print("|---:|---:|---:|---:|")
    for r in report["blocks"]:
        print(
            f"| {r['block']} | {r['identity']:.3f} | {r['pre-LN copy']:.3f} "
            f"| {r['init=pruned']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Use a trained side network on new text: backbone -> the stored rows' rounding -> side network.

:class:`Predictor` joins the backbone recorded in a run's checkpoint with the side network into
one ``torch.nn.Module`` (token ids in, outputs out). :func:`predict` runs it over a whole dataset
the way stage one and stage two did: the same length-bucketed batch plan for the backbone, the
same stored-dtype rounding, and the side network over consecutive samples in the evaluation
batch size, so predictions on a cached split equal stage two's evaluation of that split.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.backbone import Backbone, load_backbone
from pipeline.data import TextData
from pipeline.errors import ConfigError, StoreMismatchError
from pipeline.extract import DeviceBatch, encode, forward_rows, make_batch
from pipeline.pairs import SEPARATE, join_rows, mode, pieces, tokenize_separate
from pipeline.sidenets import SideBatch, StoreInfo, build, parse_spec
from pipeline.tokens import PlanSettings, Tokenized, plan_batches, tokenize
from storage import decode_rows

log = logging.getLogger(__name__)


def load_checkpoint(run: str | Path) -> dict[str, Any]:
    path = Path(run)
    path = path / "best.pt" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}: pass --run OUT/<name> of a 'sidecache train'")
    return dict(torch.load(path, map_location="cpu", weights_only=False))


def check_identity(state: dict[str, Any], bb: Backbone) -> None:
    """Refuse a backbone or tokenizer other than the one the side network was trained on."""
    want = state["store_identity"]
    for key in ("config_hash", "weights_hash"):
        if want["backbone"][key] != bb.identity[key]:
            raise StoreMismatchError(
                f"the side network was trained on hidden states of backbone "
                f"{want['backbone']['name']!r} ({key} {want['backbone'][key][:12]}...), but the "
                f"loaded backbone has {key} {bb.identity[key][:12]}...; load the same backbone "
                "(--backbone, --revision)"
            )
    if want["tokenizer"]["hash"] != bb.tokenizer_identity["hash"]:
        raise StoreMismatchError(
            "the tokenizer differs from the one used to cache the training data "
            f"(hash {want['tokenizer']['hash'][:12]}... vs {bb.tokenizer_identity['hash'][:12]}...)"
        )


class Predictor(nn.Module):
    """Backbone + side network as one module: ``forward(input_ids, attention_mask,
    token_type_ids=None) -> (B, C)`` logits (or ``(B, 1)`` regression values).

    For a side network trained on a ``--pairs separate`` store (``pairs="separate"``) the
    backbone's sequences are single sentences: rows ``2i`` and ``2i + 1`` of ``input_ids`` are
    sample ``i``'s first and second sentence, each encoded alone, and the output has one row per
    pair."""

    def __init__(self, bb: Backbone, sidenet: nn.Module, info: StoreInfo, dtype: str,
                 pairs: str = "joint"):  # fmt: skip
        super().__init__()
        self.bb, self.sidenet, self.info, self.dtype = bb, sidenet.eval(), info, dtype
        self.layers = list(info.layers)
        self.pairs = pairs

    def rows(self, batch: DeviceBatch) -> list[np.ndarray]:
        """Per sample ``(rows, L, D)`` float32, rounded exactly like the store."""
        per_layer = []
        for x in forward_rows(self.bb, batch, self.layers, self.info.positions):
            data, scale = encode(x, self.dtype)
            per_layer.append(decode_rows(data, self.dtype, scale))
        stacked = np.stack(per_layer, axis=1)  # (R, L, D)
        lengths = batch.lengths.cpu().numpy()
        counts = lengths if self.info.positions == "all" else np.ones_like(lengths)
        return np.split(stacked, np.cumsum(counts)[:-1])

    @torch.no_grad()
    def side(self, rows: list[np.ndarray], device: torch.device,
             segments: list[np.ndarray] | None = None) -> torch.Tensor:  # fmt: skip
        """``segments``: each sample's rows' segment ids, for a sentence pair (``pool=pair``)."""
        batch = SideBatch(
            hidden=torch.from_numpy(np.concatenate(rows)),
            lengths=torch.tensor([len(r) for r in rows], dtype=torch.int64),
            labels=torch.zeros(len(rows)),
            samples=torch.arange(len(rows)),
            segments=None if segments is None else torch.from_numpy(
                np.concatenate(segments).astype(np.int8)),
        ).to(device)  # fmt: skip
        return self.sidenet(batch)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = DeviceBatch(
            samples=np.arange(input_ids.shape[0]),
            input_ids=input_ids.to(self.bb.device),
            attention_mask=attention_mask.to(self.bb.device),
            token_type_ids=None if token_type_ids is None else token_type_ids.to(self.bb.device),
            lengths=attention_mask.sum(1).to(self.bb.device),
        )
        rows, segments = self.rows(batch), None
        if self.pairs == SEPARATE:
            rows, segments = join_rows(rows)
        elif token_type_ids is not None and self.info.positions == "all":
            types = token_type_ids.cpu().numpy()
            segments = [types[i, : len(r)] for i, r in enumerate(rows)]
        return self.side(rows, self.bb.device, segments)


@dataclass
class Loaded:
    predictor: Predictor
    state: dict[str, Any]
    plan: PlanSettings
    max_length: int
    pairs: str = "joint"  # how the train store encoded sentence pairs (pipeline.pairs)


def load_predictor(run: str | Path, device: str = "auto", backbone: str | None = None) -> Loaded:
    """A trained side network (``OUT/<name>``) with the backbone it was trained on."""
    state = load_checkpoint(run)
    ident = state["store_identity"]
    bb = load_backbone(backbone or ident["backbone"]["name"], device, ident["backbone"]["revision"])
    check_identity(state, bb)
    info = StoreInfo(**{**state["store_info"], "layers": tuple(state["store_info"]["layers"])})
    spec = parse_spec(state["spec"])
    sidenet = build(spec, info)  # the weights come from the checkpoint
    sidenet.load_state_dict(state["state_dict"])
    ex = ident["extraction"]
    plan = PlanSettings.from_extraction(ex)
    pairs = mode(ident)
    predictor = Predictor(bb, sidenet.to(bb.device), info, info.dtype, pairs)
    return Loaded(predictor, state, plan, int(ident["tokenizer"]["max_length"]), pairs)


def predict(loaded: Loaded, data: TextData) -> np.ndarray:
    """Outputs ``(N, C)`` for every sample of ``data``, in order. The backbone runs the
    sequences stage one ran for the training store: each sample, or with ``--pairs separate``
    each sentence of a pair alone (its rows then joined, A's then B's, as the store holds them)."""
    p = loaded.predictor
    started = time.perf_counter()
    tok, seqs = _sequences(loaded, data)
    per_seq = seqs.lengths if p.info.positions == "all" else np.ones(len(seqs.lengths), np.int64)
    pairwise = p.info.positions == "all" and tok.type_ids is not None
    per = 2 if seqs is not tok else 1  # sequences per sample
    ready: dict[int, np.ndarray] = {}
    outputs: list[np.ndarray] = []
    step, next_sample = int(loaded.state.get("eval_batch_size", 64)), 0
    for batch in plan_batches(seqs.lengths, per_seq, loaded.plan):
        rows = p.rows(make_batch(seqs, batch, p.bb.device))
        ready.update(zip(batch.tolist(), rows, strict=True))
        while True:
            chunk = range(next_sample, min(next_sample + step, len(data)))
            if not chunk or any(i not in ready for i in range(per * chunk.start, per * chunk.stop)):
                break
            segs = _segments(tok, chunk) if data.pairs is not None and pairwise else None
            got = [ready.pop(i) for i in range(per * chunk.start, per * chunk.stop)]
            mine = got if per == 1 else join_rows(got)[0]
            outputs.append(p.side(mine, p.bb.device, segs).float().cpu().numpy())
            next_sample = chunk.stop
    seconds = time.perf_counter() - started
    log.info("predicted %d samples (%d tokens) in %.1f s: %.0f samples/s, %.0f tokens/s",
             len(data), int(tok.offsets[-1]), seconds, len(data) / seconds,
             tok.offsets[-1] / seconds)  # fmt: skip
    return np.concatenate(outputs)


def _sequences(loaded: Loaded, data: TextData) -> tuple[Tokenized, Tokenized]:
    """``data``'s samples tokenised as the training store's were, and the sequences the
    backbone runs (the samples themselves, or with ``--pairs separate`` each sentence alone)."""
    bb = loaded.predictor.bb
    if loaded.pairs != SEPARATE:
        tok = tokenize(bb.tokenizer, data, loaded.max_length, bb.takes_token_type_ids)
        return tok, tok
    if data.pairs is None:
        raise ConfigError(
            "this side network was trained on sentence pairs cached with --pairs separate; "
            f"{data.spec} has one text per sample: give the second sentences (--text-pair, or "
            "data with a pair column)"
        )
    tok = tokenize_separate(bb.tokenizer, data, loaded.max_length)
    return tok, pieces(tok, bb.takes_token_type_ids)


def _segments(tok: Tokenized, samples: range) -> list[np.ndarray]:
    """The segment ids of ``samples``' tokens (their rows, in a ``--positions all`` store)."""
    assert tok.type_ids is not None
    return [tok.type_ids[tok.offsets[i] : tok.offsets[i + 1]] for i in samples]

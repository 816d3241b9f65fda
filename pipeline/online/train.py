"""The online training loop: backbone every step, stage two's optimiser, schedule and metrics.

One method per run; with ``valid_fraction`` the same held-out samples as stage two's
``--valid-fraction`` (:func:`pipeline.data.holdout_samples`) are kept out of training and score
each epoch, and the best epoch is chosen on them. Per epoch: the batches of
:func:`pipeline.online.batches.grouped_order` (or ``order(epoch)`` when given, e.g. stage two's
loader order for the equivalence test), one :func:`pipeline.train.train_step` each (AdamW,
warmup/linear decay, the member's own dropout stream), then evaluation on the whole eval split
in length-sorted batches. ``OUT/<name>/metrics.json`` has the same fields as stage two's, plus
the history; no checkpoints are written (these runs are baselines to measure, not models to
keep).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline import metrics
from pipeline.backbone import Backbone, load_backbone, pick_device
from pipeline.checkpoints import eval_summary, valid_summary
from pipeline.data import head, load_data
from pipeline.errors import ConfigError
from pipeline.holdout import holdout_samples
from pipeline.memory import peak_memory
from pipeline.online.batches import TokenBatch, eval_plan, grouped_order, token_batch
from pipeline.online.methods import build_online, is_side, parse_method
from pipeline.online.side import online_info, side_batch
from pipeline.optim import schedule
from pipeline.sidenets import SideSpec, StoreInfo
from pipeline.tokens import Tokenized, tokenize
from pipeline.train import Member, TrainConfig, make_member, member_stream, record_epoch, train_step
from storage import parse_dtype

log = logging.getLogger(__name__)
Feed = Callable[[TokenBatch], Any]


@dataclass
class OnlineConfig:
    backbone: str
    data: str
    spec: str  # full | lora | meft | read | lst, with key=value settings
    epochs: int
    out: str
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    limit: int | None = None  # first N training samples
    eval_limit: int | None = None
    max_length: int | None = None
    dtype: str = "float32"  # read/lst: round the backbone's rows like a store of this dtype
    eval_split: str = "dev"
    group: int = 50  # length grouping of training batches (1 = plain random order)
    progress: bool = True
    order: Callable[[int], Iterable[np.ndarray]] | None = None  # epoch -> sample batches
    valid_fraction: float = 0.0  # hold out this share of train to choose the epoch on


@dataclass
class Split:
    tok: Tokenized
    labels: np.ndarray
    pairs: bool = False  # sentence pairs

    def subset(self, samples: np.ndarray) -> Split:
        """These samples only, in this order."""
        t = self.tok
        spans = [np.arange(t.offsets[i], t.offsets[i + 1]) for i in samples]
        at = np.concatenate(spans) if spans else np.empty(0, np.int64)
        lengths = t.lengths[samples]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        types = None if t.type_ids is None else t.type_ids[at]
        return Split(Tokenized(t.ids[at], types, offsets), self.labels[samples], self.pairs)


def load_split(
    cfg: OnlineConfig, bb: Backbone, split: str, limit: int | None
) -> tuple[Split, dict[str, Any]]:
    data = head(load_data(cfg.data, split), limit)
    max_length = min(cfg.max_length or bb.max_length, bb.max_length)
    tok = tokenize(bb.tokenizer, data, max_length, bb.takes_token_type_ids)
    return Split(tok, data.labels, data.pairs is not None), data.task


def make_online_member(
    spec: SideSpec,
    bb: Backbone,
    info: StoreInfo,
    total: int,
    cfg: OnlineConfig,
    device: torch.device,
) -> tuple[Member, Feed]:
    """The member (model, optimiser, schedule, dropout stream) and what its model is fed."""
    name = spec.train.name or spec.kind
    if is_side(spec):  # exactly stage two's construction: same seed -> same initial weights
        tc = TrainConfig(
            train="",
            eval="",
            specs=[],
            epochs=cfg.epochs,
            out=cfg.out,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        )
        return make_member(name, spec, info, total, tc, device), lambda b: side_batch(bb, b, info)
    seed = spec.train.seed or cfg.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_online(spec, bb, info.num_outputs).to(device)
        stream = member_stream(torch.get_rng_state(), seed, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, schedule(total, spec.train.warmup))
    member = Member(name, spec, model, optim, sched, stream, Path(cfg.out) / name,
                    max(cfg.batch_size, 64), device=device)  # fmt: skip
    return member, lambda b: b


@torch.no_grad()
def evaluate(
    m: Member, feed: Feed, split: Split, task: dict[str, Any], device: torch.device
) -> dict[str, float]:
    m.model.eval()
    outputs: np.ndarray | None = None
    for samples in eval_plan(split.tok.lengths):
        out = m.model(feed(token_batch(split.tok, split.labels, samples, device)))
        out = out.float().cpu().numpy()
        if outputs is None:
            outputs = np.zeros((len(split.labels), *out.shape[1:]), np.float32)
        outputs[samples] = out
    assert outputs is not None
    return metrics.compute(task, outputs, split.labels)


def run_online(cfg: OnlineConfig) -> dict[str, Any]:
    """Train one online method; returns (and writes) its metrics."""
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError("--epochs and --batch-size must be at least 1")
    spec = parse_method(cfg.spec)
    cfg.dtype = parse_dtype(cfg.dtype)
    started = time.perf_counter()
    device = pick_device(cfg.device)
    bb = load_backbone(cfg.backbone, str(device))
    train, task = load_split(cfg, bb, "train", cfg.limit)
    dev, _ = load_split(cfg, bb, cfg.eval_split, cfg.eval_limit)
    held = holdout_samples(len(train.labels), cfg.valid_fraction)
    valid = train.subset(held) if len(held) else None
    if valid is not None:
        train = train.subset(np.setdiff1d(np.arange(len(train.labels)), held))
    info = online_info(bb, task, cfg.dtype, train.pairs)
    steps = -(-len(train.labels) // cfg.batch_size)
    m, feed = make_online_member(spec, bb, info, cfg.epochs * steps, cfg, device)
    m.valid_fraction = cfg.valid_fraction
    log.info(
        "%s: %d trainable parameters, %d samples, %d steps per epoch",
        m.name,
        m.params,
        len(train.labels),
        steps,
    )
    for epoch in range(cfg.epochs):
        order = (
            cfg.order(epoch)
            if cfg.order is not None
            else grouped_order(train.tok.lengths, cfg.batch_size, cfg.seed, epoch, cfg.group)
        )
        for samples in tqdm(
            order,
            total=steps,
            desc=f"{m.name} epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            disable=not cfg.progress,
        ):
            train_step(m, feed(token_batch(train.tok, train.labels, samples, device)), info)
        scores = evaluate(m, feed, dev, task, device)
        on_valid = None if valid is None else evaluate(m, feed, valid, task, device)
        record_epoch(m, epoch, scores, on_valid)
        log.info("%s epoch %d/%d: %s score %.4f%s, %.0f s so far", m.name, epoch + 1, cfg.epochs,
                 cfg.eval_split, scores["score"],
                 "" if on_valid is None else f", validation {on_valid['score']:.4f}",
                 time.perf_counter() - started)  # fmt: skip
        if m.stopped:
            break
    return write_metrics(m, device, time.perf_counter() - started)


def write_metrics(m: Member, device: torch.device, seconds: float) -> dict[str, Any]:
    result = {
        "name": m.name,
        "spec": m.spec.text,
        "kind": f"online:{m.spec.kind}",
        "eval": eval_summary(m),
        "train_loss": m.history[-1]["train_loss"],
        "epochs": m.epochs_done,
        "stopped_early": m.stopped,
        "finished": True,
        "trainable_params": m.params,
        "wall_time_s": round(seconds, 3),
        "memory": peak_memory(device),
        "history": m.history,
    }
    if m.valid_fraction:
        result["valid"] = valid_summary(m)
    m.folder.mkdir(parents=True, exist_ok=True)
    (m.folder / "metrics.json").write_text(json.dumps(result, indent=2))
    return result

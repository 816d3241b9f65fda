"""Stage two: train K side networks from one stream of cached batches.

One loader pass feeds every side network; each has its own optimiser, schedule, early-stopping
state and random-number stream (dropout), so a network trains exactly as it would alone. After
each epoch every network is evaluated on the eval store; the best checkpoint is kept.

Outputs under ``OUT/<name>/``: ``best.pt`` (config, weights, store identity), ``last.pt`` (plus
optimiser state, for resuming), ``metrics.json``, ``history.csv``.
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import functools
import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline import metrics
from pipeline.errors import ConfigError, StoreMismatchError
from pipeline.loader import StoreLoader
from pipeline.sidenets import SideSpec, StoreInfo, build, loss_fn, parse_spec
from storage import StoreReader, open_store

log = logging.getLogger(__name__)
SAME_SOURCE = (
    "identity.backbone.config_hash",
    "identity.backbone.weights_hash",
    "identity.tokenizer.hash",
    "layout.hidden_size",
    "layout.layers",
    "layout.positions",
    "layout.dtype",
    "task.type",
    "task.num_labels",
)


@dataclass
class TrainConfig:
    train: str
    eval: str
    specs: list[str]
    epochs: int
    out: str
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    ram_budget_mb: int = 4096
    progress: bool = True
    threads: int = 0  # torch intra-op threads on CPU; 0 = half the usable cores (at least 1)
    pool_mb: int = 512  # streaming: the loader's budget for stored rows; a round holds <= half
    low_memory: bool = False  # one prefetched batch, and glibc returns freed buffers at once
    micro_rows: int = 0  # > 0: forward and backward on groups of at most this many rows


@dataclass
class Member:
    """One side network in the pass and everything it owns."""

    name: str
    spec: SideSpec
    model: torch.nn.Module
    optim: torch.optim.Optimizer | AdamW  # online baselines use torch's own
    sched: torch.optim.lr_scheduler.LambdaLR | WarmupDecay
    rng: torch.Tensor
    folder: Path
    eval_batch: int
    micro_rows: int = 0  # > 0: training steps run in groups of at most this many rows
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    epochs_done: int = 0
    seconds: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def member_names(specs: list[SideSpec]) -> list[str]:
    base = [s.train.name or s.kind for s in specs]
    names = [b if base.count(b) == 1 else f"{b}-{base[:i].count(b)}" for i, b in enumerate(base)]
    if len(set(names)) != len(names):
        raise ConfigError(f"side network names collide: {names}; set name=... in --sidenet")
    return names


def same_source(meta: dict[str, Any]) -> dict[str, Any]:
    """The ``SAME_SOURCE`` values of a store's metadata: what another store must share with it
    (as ``open_store(..., expect=...)`` takes them)."""
    want = {}
    for key in SAME_SOURCE:
        node: Any = meta
        for part in key.split("."):
            node = node[part]
        want[key] = node
    return want


def open_pair(train: str, eval_: str) -> tuple[StoreReader, StoreReader]:
    tr = open_store(train)
    try:
        ev = open_store(eval_, expect=same_source(tr.meta))
    except StoreMismatchError as exc:
        raise StoreMismatchError(f"train and eval stores do not match: {exc}") from exc
    return tr, ev


class AdamW:
    """``torch.optim.AdamW`` with its defaults (betas 0.9/0.999, eps 1e-8, no amsgrad), step for
    step the same arithmetic as the single-tensor path torch runs for CPU tensors, so results are
    bit-identical to it (``tests/pipeline/test_train.py``). Stage two uses this instead of
    ``torch.optim`` because any ``torch.optim.Optimizer`` imports ``torch._dynamo`` (and with it
    sympy) on first use: +71 MB resident, a third of a stage-two process's memory above an idle
    interpreter with torch. State per parameter: its step count and the two moments."""

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):  # fmt: skip
        self.params: list[torch.Tensor] = list(params)
        self.base_lr, self.lr, self.weight_decay = lr, lr, weight_decay
        self.betas, self.eps = betas, eps
        self.steps: list[float] = [0.0] * len(self.params)
        self.moments: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        lr, wd, (beta1, beta2), eps = self.lr, self.weight_decay, self.betas, self.eps
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            moments = self.moments[i]
            if moments is None:
                moments = (
                    torch.zeros_like(p, memory_format=torch.preserve_format),
                    torch.zeros_like(p, memory_format=torch.preserve_format),
                )
                self.moments[i] = moments
            exp_avg, exp_avg_sq = moments
            grad = p.grad
            self.steps[i] += 1.0
            step = self.steps[i]
            if wd != 0:
                p.mul_(1 - lr * wd)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = lr / (1 - beta1**step)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "steps": list(self.steps), "moments": list(self.moments)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "moments" not in state or len(state["moments"]) != len(self.params):
            raise ConfigError(
                "last.pt holds optimiser state of another format (torch.optim, from an older "
                "sidecache) or of another network; delete it to train from the start"
            )
        self.lr, self.steps = state["lr"], list(state["steps"])
        self.moments = list(state["moments"])


class WarmupDecay:
    """``torch.optim.lr_scheduler.LambdaLR(optim, schedule(total, warmup))`` for :class:`AdamW`:
    the learning rate is ``base_lr * factor(n)`` after ``n`` calls of :meth:`step`."""

    def __init__(self, optim: AdamW, factor: Any):
        self.optim, self.factor, self.last_epoch = optim, factor, 0
        optim.lr = optim.base_lr * factor(0)

    def step(self) -> None:
        self.last_epoch += 1
        self.optim.lr = self.optim.base_lr * self.factor(self.last_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.optim.lr = self.optim.base_lr * self.factor(self.last_epoch)


def schedule(total: int, warmup: float) -> Any:
    ramp = max(1, round(total * warmup))

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        return max(0.0, (total - step) / max(1, total - ramp))

    return factor


def make_member(name: str, spec: SideSpec, info: StoreInfo, total: int, cfg: TrainConfig,
                device: torch.device, eval_batch: int | None = None) -> Member:  # fmt: skip
    seed = spec.train.seed or cfg.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(spec, info).to(device)
        rng = torch.get_rng_state()
    optim = AdamW(model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    sched = WarmupDecay(optim, schedule(total, spec.train.warmup))
    if eval_batch is None:  # callers without stores: the size that needs none
        eval_batch = eval_batch_size(cfg)
    return Member(
        name, spec, model, optim, sched, rng, Path(cfg.out) / name, eval_batch, cfg.micro_rows
    )


def check_micro_rows(n: int) -> None:
    if n < 0:
        raise ConfigError(f"--micro-rows must be 0 (whole batches) or a number of rows; found {n}")


def eval_batch_size(cfg: TrainConfig, train: StoreReader | None = None,
                    evaluation: StoreReader | None = None) -> int:  # fmt: skip
    """Evaluation batches: consecutive samples in store order, this many at a time.

    Under ``--low-memory``, batches of about a training batch's stored rows: ``--batch-size``
    scaled by the stores' rows per sample, when the evaluation samples are longer (SST-2's dev
    sentences are twice as long as its training sentences: 17 per batch instead of 32). With 64,
    then 32 per batch, evaluating READ set the peak. 10 epochs on MiniLM SST-2 10k, MB above idle:
    181 with 64 and 122 with 32 (4 MB chunks, 32 MB pool); 108 with 32 and 99.5 sized by rows
    (1 MB chunks, 4 MB pool). BENCHMARKS.md, sessions 5 and 6."""
    if not cfg.low_memory:
        return max(cfg.batch_size, 64)
    if train is None or evaluation is None:
        return cfg.batch_size
    per_train = train.layout.n_rows / max(1, train.layout.n_samples)
    per_eval = evaluation.layout.n_rows / max(1, evaluation.layout.n_samples)
    return max(1, min(cfg.batch_size, round(cfg.batch_size * per_train / max(per_eval, 1e-9))))


def checkpoint(m: Member, info: StoreInfo, identity: dict[str, Any], full: bool) -> dict[str, Any]:
    state: dict[str, Any] = {
        "kind": m.spec.kind,
        "spec": m.spec.text,
        "model_config": dataclasses.asdict(m.spec.config()),
        "train_settings": dataclasses.asdict(m.spec.train),
        "store_info": info.to_json(),
        "store_identity": identity,
        "state_dict": m.model.state_dict(),
        "epoch": m.epochs_done,
        "eval_batch_size": m.eval_batch,
    }
    if full:
        state.update(
            optim=m.optim.state_dict(), sched=m.sched.state_dict(), rng=m.rng, history=m.history,
            best=m.best, best_epoch=m.best_epoch, bad_epochs=m.bad_epochs, stopped=m.stopped,
            seconds=m.seconds,
        )  # fmt: skip
    return state


def resume(m: Member, identity: dict[str, Any]) -> None:
    path = m.folder / "last.pt"
    if not path.is_file():
        return
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["spec"] != m.spec.text or state["store_identity"] != identity:
        raise ConfigError(
            f"{m.folder} holds a run of {state['spec']!r} on another store; choose another --out "
            "or delete that folder"
        )
    m.model.load_state_dict(state["state_dict"])
    m.optim.load_state_dict(state["optim"])
    m.sched.load_state_dict(state["sched"])
    m.rng, m.history, m.best = state["rng"], state["history"], state["best"]
    m.best_epoch, m.bad_epochs, m.stopped = (
        state["best_epoch"],
        state["bad_epochs"],
        state["stopped"],
    )
    m.epochs_done, m.seconds = state["epoch"], state["seconds"]
    log.info("%s: resuming after epoch %d", m.name, m.epochs_done)


def train_step(m: Member, batch: Any, info: StoreInfo) -> None:
    """One optimiser step on ``batch``. When the member's ``micro_rows`` is set, a batch of more
    rows runs forward and backward in groups of whole samples (:meth:`SideBatch.split`), each
    group's mean loss weighted by its share of the samples, so the gradients add up to the whole
    batch's (up to float rounding; dropout masks are drawn group by group). The activations held
    for backward then follow ``micro_rows``, not the batch's longest samples. Evaluation keeps
    whole batches (it holds no activations for backward, and ``evaluate``/``predict`` reproduce
    its outputs exactly)."""
    started = time.perf_counter()
    m.model.train()
    torch.set_rng_state(m.rng)  # each network has its own dropout stream
    m.optim.zero_grad(set_to_none=True)
    # online baselines' batches are not SideBatches; they never set micro_rows
    parts = batch.split(m.micro_rows) if m.micro_rows > 0 else [batch]
    n = len(batch.lengths)
    for part in parts:
        loss = loss_fn(info, m.model(part), part.labels)
        (loss if len(parts) == 1 else loss * (len(part.lengths) / n)).backward()
        m.loss_sum += float(loss.detach()) * len(part.lengths)
    m.optim.step()
    m.sched.step()
    m.rng = torch.get_rng_state()
    m.loss_count += n
    m.seconds += time.perf_counter() - started


@torch.no_grad()
def evaluate(models: list[Member], loader: StoreLoader, info: StoreInfo, device: torch.device,
             ) -> dict[str, dict[str, float]]:  # fmt: skip
    outs: dict[str, list[np.ndarray]] = {m.name: [] for m in models}
    gold: list[np.ndarray] = []
    for batch in loader.epoch(0):
        batch = batch.to(device)
        gold.append(batch.labels.cpu().numpy())
        for m in models:
            started = time.perf_counter()
            m.model.eval()
            outs[m.name].append(m.model(batch).float().cpu().numpy())
            m.seconds += time.perf_counter() - started
    y = np.concatenate(gold)
    return {name: metrics.compute(info.task, np.concatenate(o), y) for name, o in outs.items()}


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"device": "cuda", "peak_bytes": int(torch.cuda.max_memory_allocated(device))}
    return {
        "device": "cpu",
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def write_outputs(m: Member, info: StoreInfo, identity: dict[str, Any], device: torch.device,
                  finished: bool, loaders: list[dict[str, Any]] | None = None,
                  ) -> dict[str, Any]:  # fmt: skip
    m.folder.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint(m, info, identity, full=True), m.folder / "last.pt.tmp")
    (m.folder / "last.pt.tmp").replace(m.folder / "last.pt")
    final = m.history[-1]["eval"] if m.history else None
    result = {
        "name": m.name,
        "spec": m.spec.text,
        "kind": m.spec.kind,
        "eval": {"best": m.best, "final": final, "best_epoch": m.best_epoch},
        "train_loss": m.history[-1]["train_loss"] if m.history else None,
        "epochs": m.epochs_done,
        "stopped_early": m.stopped,
        "finished": finished,
        "trainable_params": m.params,
        "wall_time_s": round(m.seconds, 3),
        "memory": peak_memory(device),
        "torch_threads": torch.get_num_threads(),
        "micro_rows": m.micro_rows,
    }
    if loaders is not None:  # the streaming loaders' memory, once the run is over
        result["loader_memory"] = loaders
    (m.folder / "metrics.json").write_text(json.dumps(result, indent=2))
    with (m.folder / "history.csv").open("w", newline="") as f:
        keys = sorted(m.history[0]["eval"]) if m.history else []
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", *keys])
        for h in m.history:
            w.writerow([h["epoch"], h["train_loss"], *(h["eval"][k] for k in keys)])
    return result


def record_epoch(m: Member, epoch: int, scores: dict[str, float]) -> bool:
    """Append the epoch to the history; True when it is the best so far. Sets ``m.stopped``
    once ``patience`` epochs in a row brought no improvement."""
    m.epochs_done = epoch + 1
    m.history.append(
        {"epoch": epoch + 1, "train_loss": m.loss_sum / max(1, m.loss_count), "eval": scores}
    )
    m.loss_sum, m.loss_count = 0.0, 0
    if m.best is None or scores["score"] > m.best["score"]:
        m.best, m.best_epoch, m.bad_epochs = scores, epoch + 1, 0
        return True
    m.bad_epochs += 1
    if m.spec.train.patience and m.bad_epochs >= m.spec.train.patience:
        m.stopped = True
        log.info("%s: no improvement for %d epochs, stopping", m.name, m.bad_epochs)
    return False


def end_epoch(m: Member, epoch: int, scores: dict[str, float], info: StoreInfo,
              identity: dict[str, Any]) -> None:  # fmt: skip
    if record_epoch(m, epoch, scores):
        m.folder.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint(m, info, identity, full=False), m.folder / "best.pt")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def _glibc() -> Any:
    """glibc's allocator entry points, or None where they are not there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def lean_malloc(threshold: int = 128 << 10) -> bool:
    """Serve every allocation above ``threshold`` bytes with its own mmap, returned to the OS when
    freed (glibc only; process-wide and permanent; False where it does not apply).

    By default glibc raises this threshold (up to 32 MB) each time such a block is freed, so later
    batch-sized buffers (decoded batches, activations, gradients) come from the heap and their
    pages stay resident after they are freed. Fixing it at glibc's initial 128 KiB measured 38 MB
    less peak RSS for one epoch of READ on CoLA (BENCHMARKS.md), at the cost of page faults for
    every large buffer."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def trim_malloc() -> None:
    """Return the free pages inside glibc's heaps to the OS (``malloc_trim``; a no-op elsewhere).

    Buffers under the mmap threshold come from per-thread heaps; once freed, their pages stay
    resident, and over an epoch the holes that the loader's and the steps' small buffers leave
    add up. ``--low-memory`` trims after every training batch and before evaluating."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def cpu_threads(wanted: int) -> int:
    """Intra-op threads for training on CPU. Side networks run many small matrix products, and
    the loader decompresses and decodes on its own threads; on a loaded machine, more OpenMP
    threads mostly spin (on 2 busy cores READ burnt 12x the CPU time with 2 threads than with 1).
    """
    if wanted > 0:
        return wanted
    return max(1, len(os.sched_getaffinity(0)) // 2)


def run_train(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """Train every ``--sidenet`` from one stream of batches; returns metrics per network."""
    before = torch.get_num_threads()
    try:
        return _run_train(cfg)
    finally:
        torch.set_num_threads(before)


def _run_train(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError("--epochs and --batch-size must be at least 1")
    check_micro_rows(cfg.micro_rows)
    specs = [parse_spec(s) for s in cfg.specs]
    if not specs:
        raise ConfigError("give at least one --sidenet (e.g. --sidenet read --sidenet linear)")
    names = member_names(specs)
    train_reader, eval_reader = open_pair(cfg.train, cfg.eval)
    info, identity = (
        StoreInfo.from_meta(train_reader.meta, train_reader.path),
        train_reader.identity,
    )
    from pipeline.backbone import pick_device  # torch only; transformers is never imported

    device = pick_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads))
    if cfg.low_memory and not lean_malloc():
        log.warning("--low-memory: cannot set the allocator's mmap threshold (not glibc)")
    memory = {
        "ram_budget": cfg.ram_budget_mb << 20,
        "pool_bytes": cfg.pool_mb << 20,
        "prefetch": 1 if cfg.low_memory else 4,
    }
    loader = StoreLoader(train_reader, cfg.batch_size, shuffle=True, seed=cfg.seed, **memory)
    eval_batch = eval_batch_size(cfg, train_reader, eval_reader)
    eval_loader = StoreLoader(eval_reader, eval_batch, shuffle=False, **memory)
    total = cfg.epochs * len(loader)
    members = [
        make_member(n, s, info, total, cfg, device, eval_batch)
        for n, s in zip(names, specs, strict=True)
    ]
    for m in members:
        resume(m, identity)
    start = min((m.epochs_done for m in members if not m.stopped), default=cfg.epochs)
    for epoch in range(start, cfg.epochs):
        active = [m for m in members if not m.stopped and m.epochs_done == epoch]
        if not active:
            break
        bar = tqdm(loader.epoch(epoch), total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", disable=not cfg.progress)  # fmt: skip
        for batch in bar:
            batch = batch.to(device)
            for m in active:
                train_step(m, batch, info)
            if cfg.low_memory:
                trim_malloc()
        if cfg.low_memory:
            trim_malloc()
        scores = evaluate(active, eval_loader, info, device)
        for m in active:
            end_epoch(m, epoch, scores[m.name], info, identity)
            write_outputs(m, info, identity, device, finished=False)
        log.info("epoch %d: %s", epoch + 1, ", ".join(
            f"{m.name} {scores[m.name]['score']:.4f}" for m in active))  # fmt: skip
    loaders = [
        {"loader": which, "held_peak": ld.held_peak, "pool_bytes": ld.pool_bytes,
         "held_bound": ld.held_bound}
        for which, ld in (("train", loader), ("eval", eval_loader)) if not ld.in_ram
    ]  # fmt: skip
    for x in loaders:
        log.info("loader memory (%(loader)s): held at most %(held_peak)d bytes of stored rows; "
                 "budget %(pool_bytes)d, bound %(held_bound)d", x)  # fmt: skip
    return {
        m.name: write_outputs(m, info, identity, device, finished=True, loaders=loaders)
        for m in members
    }

"""Stage two: train K side networks from one stream of cached batches.

One loader pass feeds every side network; each has its own optimiser, schedule, early-stopping
state and random-number stream (dropout), so a network trains exactly as it would alone. After
each epoch every network is evaluated on the eval store, and on a held-out share of the train
store when ``--valid-fraction`` is set (the best epoch is then chosen on it, never on the eval
store); the best checkpoint is kept.

Outputs under ``OUT/<name>/`` (:mod:`pipeline.checkpoints`): ``best.pt`` (config, weights,
store identity), ``last.pt`` (plus optimiser state, for resuming), ``metrics.json``,
``history.csv``. The optimiser is :mod:`pipeline.optim`; CPU threads and glibc's allocator are
:mod:`pipeline.memory`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from pipeline import metrics, rng
from pipeline.checkpoints import resume, save_best, write_outputs
from pipeline.errors import ConfigError, StoreMismatchError
from pipeline.holdout import holdout_samples
from pipeline.loader import StoreLoader
from pipeline.memory import cpu_threads, lean_malloc, trim_malloc
from pipeline.optim import AdamW, WarmupDecay, schedule
from pipeline.resident import ResidentLoader, resident_bytes
from pipeline.settings import TrainConfig
from pipeline.sidenets import SideSpec, StoreInfo, build, init_from_store, loss_fn, parse_spec
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
class Member:
    """One side network in the pass and everything it owns."""

    name: str
    spec: SideSpec
    model: torch.nn.Module
    optim: torch.optim.Optimizer | AdamW  # online baselines use torch's own
    sched: torch.optim.lr_scheduler.LambdaLR | WarmupDecay
    rng: rng.RngState  # its dropout stream: swapped into torch's generators for its steps
    folder: Path
    eval_batch: int
    micro_rows: int = 0  # > 0: training steps run in groups of at most this many rows
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # eval scores at the chosen epoch
    best_valid: dict[str, Any] | None = None  # validation scores there (with --valid-fraction)
    valid_fraction: float = 0.0
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    epochs_done: int = 0
    seconds: float = 0.0
    loss_sum: torch.Tensor | float = 0.0
    loss_count: int = 0

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def member_names(specs: list[SideSpec]) -> list[str]:
    base = [s.train.name or s.default_name for s in specs]
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
    if pair_mode(tr.identity) != pair_mode(ev.identity):
        raise StoreMismatchError(
            f"train and eval stores do not match: {train} encodes sentence pairs "
            f"{pair_mode(tr.identity)}, {eval_} {pair_mode(ev.identity)} (--pairs of sidecache "
            "cache); cache both with the same --pairs"
        )
    return tr, ev


def pair_mode(identity: dict[str, Any]) -> str:
    """How a store encoded sentence pairs (``--pairs`` of stage one, :mod:`pipeline.pairs`)."""
    return str(identity.get("extraction", {}).get("pairs", "joint"))


def make_member(name: str, spec: SideSpec, info: StoreInfo, total: int, cfg: TrainConfig,
                device: torch.device, eval_batch: int | None = None,
                read: Callable[[str], np.ndarray] | None = None) -> Member:  # fmt: skip
    """A fresh network, its optimiser and schedule, seeded by its ``seed=`` (else ``cfg.seed``).
    ``read`` reads the train store's small arrays, for networks initialised from them."""
    seed = spec.train.seed or cfg.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(spec, info)
        stream = rng.capture(torch.device("cpu"))
    init_from_store(model, read)
    model.to(device)
    optim = AdamW(model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    sched = WarmupDecay(optim, schedule(total, spec.train.warmup))
    if eval_batch is None:  # callers without stores: the size that needs none
        eval_batch = eval_batch_size(cfg)
    folder = Path(cfg.out) / name
    return Member(name, spec, model, optim, sched, member_stream(stream[0], seed, device),
                  folder, eval_batch, cfg.micro_rows, device,
                  valid_fraction=cfg.valid_fraction)  # fmt: skip


def member_stream(cpu_state: torch.Tensor, seed: int, device: torch.device) -> rng.RngState:
    """A network's dropout stream: on CPU the generator's state right after building it (as
    before any step when it trains alone); on CUDA that plus the device generator seeded with
    the network's seed, so its masks never depend on what else trains in the pass."""
    if device.type != "cuda":
        return cpu_state, None
    return cpu_state, rng.seeded(seed, device)[1]


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
    (1 MB chunks, 4 MB pool); `python -m benchmarks.read_memory`, BENCHMARKS.md."""
    if not cfg.low_memory:
        return max(cfg.batch_size, 64)
    if train is None or evaluation is None:
        return cfg.batch_size
    per_train = train.layout.n_rows / max(1, train.layout.n_samples)
    per_eval = evaluation.layout.n_rows / max(1, evaluation.layout.n_samples)
    return max(1, min(cfg.batch_size, round(cfg.batch_size * per_train / max(per_eval, 1e-9))))


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
    rng.restore(m.rng, m.device)  # each network has its own dropout stream
    m.optim.zero_grad(set_to_none=True)
    # online baselines' batches are not SideBatches; they never set micro_rows
    parts = batch.split(m.micro_rows) if m.micro_rows > 0 else [batch]
    n = len(batch.lengths)
    for part in parts:
        loss = loss_fn(info, m.model(part), part.labels)
        (loss if len(parts) == 1 else loss * (len(part.lengths) / n)).backward()
        # kept on the device, summed in float64: no host sync per step
        m.loss_sum = m.loss_sum + loss.detach().double() * len(part.lengths)
    m.optim.step()
    m.sched.step()
    m.rng = rng.capture(m.device)
    m.loss_count += n
    m.seconds += time.perf_counter() - started


@torch.no_grad()
def evaluate(models: list[Member], loader: Loader, info: StoreInfo, device: torch.device,
             ) -> dict[str, dict[str, float]]:  # fmt: skip
    """Every model's metrics on one pass over ``loader``; outputs stay on the device until the
    pass is over (one copy to the host, no sync per batch)."""
    outs: dict[str, list[torch.Tensor]] = {m.name: [] for m in models}
    gold: list[torch.Tensor] = []
    for batch in loader.epoch(0):
        batch = batch.to(device)
        gold.append(batch.labels)
        for m in models:
            started = time.perf_counter()
            m.model.eval()
            outs[m.name].append(m.model(batch).float())
            m.seconds += time.perf_counter() - started
    y = torch.cat(gold).cpu().numpy()
    return {
        name: metrics.compute(info.task, torch.cat(o).cpu().numpy(), y) for name, o in outs.items()
    }


def record_epoch(m: Member, epoch: int, scores: dict[str, float],
                 valid: dict[str, float] | None = None) -> bool:  # fmt: skip
    """Append the epoch to the history; True when it is the best so far: by the validation
    ``score`` when there is one (``--valid-fraction``), else by the eval ``score``. Sets
    ``m.stopped`` once ``patience`` epochs in a row brought no improvement."""
    m.epochs_done = epoch + 1
    entry: dict[str, Any] = {
        "epoch": epoch + 1, "train_loss": float(m.loss_sum) / max(1, m.loss_count), "eval": scores
    }  # fmt: skip
    if valid is not None:
        entry["valid"] = valid
    m.history.append(entry)
    m.loss_sum, m.loss_count = 0.0, 0
    judged, so_far = (scores, m.best) if valid is None else (valid, m.best_valid)
    if so_far is None or judged["score"] > so_far["score"]:
        m.best, m.best_valid, m.best_epoch, m.bad_epochs = scores, valid, epoch + 1, 0
        return True
    m.bad_epochs += 1
    if m.spec.train.patience and m.bad_epochs >= m.spec.train.patience:
        m.stopped = True
        log.info("%s: no improvement for %d epochs, stopping", m.name, m.bad_epochs)
    return False


def end_epoch(m: Member, epoch: int, scores: dict[str, float], info: StoreInfo,
              identity: dict[str, Any], valid: dict[str, float] | None = None) -> None:  # fmt: skip
    if record_epoch(m, epoch, scores, valid):
        save_best(m, info, identity)


def run_train(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """Train every ``--sidenet`` from one stream of batches; returns metrics per network."""
    before = torch.get_num_threads()
    try:
        return _run_train(cfg)
    finally:
        torch.set_num_threads(before)


Loader = StoreLoader | ResidentLoader


class LoaderUse(NamedTuple):
    """One loader to build: a store, its batch size, shuffled or not, and which samples."""

    reader: StoreReader
    batch_size: int
    shuffle: bool
    samples: np.ndarray | None = None  # None: all of them


class Loaders(NamedTuple):
    train: Loader
    eval: Loader
    valid: Loader | None  # the held-out share of the train store (``--valid-fraction``)


def make_loaders(cfg: TrainConfig, train: StoreReader, evaluation: StoreReader, eval_batch: int,
                 device: torch.device) -> Loaders:  # fmt: skip
    """The train and eval loaders, and the validation loader over the samples of the train store
    that ``cfg.valid_fraction`` holds out (the train loader then serves the others)."""
    held = holdout_samples(train.layout.n_samples, cfg.valid_fraction)
    if not len(held):
        uses = [LoaderUse(train, cfg.batch_size, True), LoaderUse(evaluation, eval_batch, False)]
        loader, eval_loader = store_loaders(cfg, uses, device)
        return Loaders(loader, eval_loader, None)
    fit = np.setdiff1d(np.arange(train.layout.n_samples), held)
    uses = [LoaderUse(train, cfg.batch_size, True, fit), LoaderUse(evaluation, eval_batch, False),
            LoaderUse(train, eval_batch, False, held)]  # fmt: skip
    log.info("--valid-fraction %g: %d training samples, %d held out to choose the best epoch",
             cfg.valid_fraction, len(fit), len(held))  # fmt: skip
    return Loaders(*store_loaders(cfg, uses, device))


def store_loaders(cfg: TrainConfig, stores: list[LoaderUse], device: torch.device,
                  ) -> list[Loader]:  # fmt: skip
    """A loader per :class:`LoaderUse`: on CUDA, all resident on the GPU when the stored rows of
    their stores (each store counted once) fit ``device_budget_mb``; otherwise read on the host
    (in RAM when they fit ``ram_budget_mb``, else streamed), into pinned memory when training on
    CUDA. Shuffled ones follow ``cfg.seed``. (:class:`pipeline.dataset.StoreDataset` serves the
    train store's.)"""
    memory: dict[str, Any] = {
        "ram_budget": cfg.ram_budget_mb << 20,
        "pool_bytes": cfg.pool_mb << 20,
        "prefetch": 1 if cfg.low_memory else 4,
        "pin_memory": device.type == "cuda",
    }

    def on_host(**extra: Any) -> list[StoreLoader]:
        settings = {**memory, **extra}
        return [StoreLoader(u.reader, u.batch_size, shuffle=u.shuffle,
                            seed=cfg.seed if u.shuffle else 0, samples=u.samples, **settings)
                for u in stores]  # fmt: skip

    if device.type != "cuda":
        return list(on_host())
    host = on_host(ram_budget=0)  # reads nothing yet
    first = {id(x.reader): x for x in reversed(host)}  # one copy per store on the device
    need = sum(resident_bytes(x) for x in first.values())
    budget = cfg.device_budget_mb << 20
    if cfg.device_budget_mb < 0:
        budget = torch.cuda.mem_get_info(device)[0] // 2
    if need <= budget:
        made: dict[int, ResidentLoader] = {}
        out: list[Loader] = []
        for x in host:
            out.append(ResidentLoader(x, device, made.get(id(x.reader))))
            made.setdefault(id(x.reader), out[-1])  # type: ignore[arg-type]
        return out
    log.info("stores need %.1f MB on the GPU, over the budget of %.1f MB (--device-budget-mb): "
             "reading them on the host", need / 1e6, budget / 1e6)  # fmt: skip
    return list(on_host())


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
        StoreInfo.from_meta(train_reader.meta),
        train_reader.identity,
    )
    from pipeline.backbone import pick_device  # torch only; transformers is never imported

    device = pick_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads))
    if cfg.low_memory and not lean_malloc():
        log.warning("--low-memory: cannot set the allocator's mmap threshold (not glibc)")
    eval_batch = eval_batch_size(cfg, train_reader, eval_reader)
    loader, eval_loader, valid_loader = make_loaders(cfg, train_reader, eval_reader, eval_batch,
                                                     device)  # fmt: skip
    total = cfg.epochs * len(loader)
    members = [
        make_member(n, s, info, total, cfg, device, eval_batch, train_reader.extra)
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
        valid = None if valid_loader is None else evaluate(active, valid_loader, info, device)
        for m in active:
            end_epoch(m, epoch, scores[m.name], info, identity,
                      None if valid is None else valid[m.name])  # fmt: skip
            write_outputs(m, info, identity, finished=False)
        log.info("epoch %d: %s", epoch + 1, ", ".join(
            f"{m.name} {scores[m.name]['score']:.4f}"
            + ("" if valid is None else f" (valid {valid[m.name]['score']:.4f})")
            for m in active))  # fmt: skip
    loaders = [
        {"loader": which, "held_peak": ld.held_peak, "pool_bytes": ld.pool_bytes,
         "held_bound": ld.held_bound}
        for which, ld in (("train", loader), ("eval", eval_loader), ("valid", valid_loader))
        if ld is not None and not ld.in_ram
    ]  # fmt: skip
    for x in loaders:
        log.info("loader memory (%(loader)s): held at most %(held_peak)d bytes of stored rows; "
                 "budget %(pool_bytes)d, bound %(held_bound)d", x)  # fmt: skip
    return {
        m.name: write_outputs(m, info, identity, finished=True, loaders=loaders) for m in members
    }

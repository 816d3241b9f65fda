"""Stage-two sweeps on Dask distributed: side-network specs x tasks x seeds over a cluster.

The sweep is cut into *units*: one (task, seed) pass over a train store with a group of the
specs, trained together by :func:`pipeline.train.run_train` (one read of the store feeds every
network of the group; each network trains exactly as it would alone). Units go to a Dask cluster
(a ``LocalCluster`` of single-threaded worker processes by default, or a scheduler address);
every worker opens the stores itself and writes its networks' outputs under
``OUT/<task>/seed<S>/<name>/``. Results are gathered into one table; a unit that fails is
retried ``retries`` times and then reported with its error, never dropped.

Grouping: with P = tasks x seeds passes and W workers, each pass's specs are split into
``min(K, ceil(W / P))`` groups (or ``per_pass`` networks at most), balanced by trainable
parameters (longest first onto the lightest group), so passes keep sharing reads when there are
enough of them to fill the cluster and are split only when there are not. Splitting is not free:
every group reads and decodes the store again.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import default_of, int_list, setting
from pipeline.errors import ConfigError
from pipeline.settings import TrainConfig
from pipeline.sidenets import parse_spec
from storage import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """A train/eval store pair; ``name`` names its output folder and table rows."""

    name: str
    train: str
    eval: str


def parse_task(text: str) -> Task:
    """``NAME=TRAIN,EVAL`` or ``TRAIN,EVAL`` (named after the train store's last part)."""
    name, eq, rest = text.partition("=")
    if not eq or "://" in name or "," in name:
        name, rest = "", text
    train, comma, eval_ = rest.partition(",")
    if not comma or not train.strip() or not eval_.strip():
        raise ConfigError(f"--task {text!r}: expected NAME=TRAIN_STORE,EVAL_STORE")
    train, eval_ = train.strip(), eval_.strip()
    return Task(name.strip() or train.rstrip("/").rsplit("/", 1)[-1], train, eval_)


@dataclass
class SweepConfig:
    """Everything ``sidecache sweep`` takes; each unit trains as ``sidecache train`` would."""

    tasks: list[Task] = setting(
        help="a train/eval store pair (folders or URLs such as s3://bucket/store); repeat",
        flag="--task", metavar="NAME=TRAIN,EVAL", parse=parse_task, append=True, fallback=[],
    )  # fmt: skip
    specs: list[str] = setting(
        help="KIND[:key=value,...] as for 'sidecache train'; repeat",
        flag="--sidenet", metavar="SPEC", append=True, fallback=[],
    )  # fmt: skip
    seeds: list[int] = setting(
        help="comma list, e.g. 0,1,2 (default 0)", parse=int_list, fallback=[0]
    )
    epochs: int = setting(help="epochs of every unit", fallback=default_of(TrainConfig, "epochs"))
    out: str = setting(help="OUT/<task>/seed<S>/<name>/ (shared by workers)")
    scheduler: str = setting(
        "local",
        "local (a LocalCluster here), sequential (no Dask), or a scheduler address "
        "(tcp://host:8786)",
    )
    workers: int = setting(2, "LocalCluster worker processes")
    threads: int = setting(1, "torch threads per worker")  # and in sequential mode
    per_pass: int = setting(0, "side networks per pass at most (0 = auto)")  # from the cluster
    retries: int = setting(1, "retries of a failed unit")
    batch_size: int = setting(TrainConfig.batch_size, "samples per training batch")
    device: str = setting("cpu", "cpu | cuda | auto (on the workers)")
    ram_budget_mb: int = setting(TrainConfig.ram_budget_mb, "keep stores this small in RAM")
    valid_fraction: float = setting(
        TrainConfig.valid_fraction,
        "as for sidecache train: choose each network's best epoch on this held-out share of "
        "the train store instead of on the eval store",
        metavar="F",
    )


@dataclass(frozen=True)
class Unit:
    """One pass: a task, a seed and the specs trained together (each with its ``name=``)."""

    task: Task
    seed: int
    specs: tuple[str, ...]
    names: tuple[str, ...]
    out: str
    epochs: int
    batch_size: int
    device: str
    ram_budget_mb: int
    threads: int
    cost: float = 1.0
    valid_fraction: float = 0.0

    @property
    def key(self) -> str:
        return f"sidecache-{self.task.name}-seed{self.seed}-{'+'.join(self.names)}"


def named_specs(specs: list[str]) -> list[tuple[str, str]]:
    """Each spec with an explicit, sweep-wide unique ``name=`` (as ``sidecache train`` names
    them), so a spec keeps its name and output folder whichever group it lands in."""
    from pipeline.train import member_names

    parsed = [parse_spec(s) for s in specs]
    names = member_names(parsed)
    out = []
    for text, spec, name in zip(specs, parsed, names, strict=True):
        if not spec.train.name:
            text = f"{text}{',' if ':' in text else ':'}name={name}"
        out.append((name, text))
    return out


def spec_costs(task: Task, specs: list[str]) -> list[float]:
    """Trainable parameters of each spec on ``task``'s store (1 each if it cannot be opened)."""
    try:
        from pipeline.sidenets import StoreInfo, build
        from storage import open_store

        reader = open_store(task.train)
        info = StoreInfo.from_meta(reader.meta)
        models = [build(parse_spec(s), info) for s in specs]
        return [float(sum(p.numel() for p in m.parameters() if p.requires_grad)) for m in models]
    except Exception as exc:  # the workers will report the real problem
        log.warning("cannot size the side networks on %s (%s); grouping them evenly", task.train,
                    exc)  # fmt: skip
        return [1.0] * len(specs)


def groups_per_pass(cfg: SweepConfig, n_specs: int) -> int:
    passes = len(cfg.tasks) * len(cfg.seeds)
    if cfg.per_pass > 0:
        return math.ceil(n_specs / cfg.per_pass)
    if cfg.scheduler == "sequential":
        return 1
    return max(1, min(n_specs, math.ceil(cfg.workers / passes)))


def balance(costs: list[float], n_groups: int, cap: int = 0) -> list[list[int]]:
    """Longest-first onto the lightest group (of fewer than ``cap`` members, when given);
    groups keep the specs' original order."""
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    load = [0.0] * n_groups
    for i in sorted(range(len(costs)), key=lambda j: -costs[j]):
        open_ = [k for k in range(n_groups) if not cap or len(groups[k]) < cap]
        g = min(open_, key=lambda k: (load[k], len(groups[k])))
        groups[g].append(i)
        load[g] += costs[i]
    return [sorted(g) for g in groups if g]


def plan_units(cfg: SweepConfig) -> list[Unit]:
    """Every (task, seed, group) unit, most expensive first."""
    if not cfg.tasks or not cfg.specs or not cfg.seeds:
        raise ConfigError("a sweep needs at least one --task, one --sidenet and one seed")
    if cfg.epochs < 1 or cfg.workers < 1 or cfg.threads < 1 or cfg.retries < 0:
        raise ConfigError("--epochs, --workers and --threads must be >= 1, --retries >= 0")
    tasks = [t.name for t in cfg.tasks]
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"task names collide: {tasks}; name them with --task NAME=TRAIN,EVAL")
    named = named_specs(cfg.specs)
    units = []
    for task in cfg.tasks:
        costs = spec_costs(task, [text for _, text in named])
        for group in balance(costs, groups_per_pass(cfg, len(named)), cfg.per_pass):
            specs = tuple(named[i][1] for i in group)
            names = tuple(named[i][0] for i in group)
            for seed in cfg.seeds:
                out = str(Path(cfg.out) / task.name / f"seed{seed}")
                units.append(Unit(
                    task, seed, specs, names, out, cfg.epochs, cfg.batch_size, cfg.device,
                    cfg.ram_budget_mb, cfg.threads, sum(costs[i] for i in group),
                    cfg.valid_fraction,
                ))  # fmt: skip
    return sorted(units, key=lambda u: -u.cost)


def run_unit(unit: Unit) -> list[dict[str, Any]]:
    """Train one unit (on a worker): returns one result row per network."""

    from pipeline.train import run_train

    started = time.perf_counter()
    cpu = time.process_time()
    results = run_train(TrainConfig(
        train=unit.task.train, eval=unit.task.eval, specs=list(unit.specs), epochs=unit.epochs,
        out=unit.out, batch_size=unit.batch_size, seed=unit.seed, device=unit.device,
        ram_budget_mb=unit.ram_budget_mb, threads=unit.threads, progress=False,
        valid_fraction=unit.valid_fraction,
    ))  # fmt: skip
    where = f"{socket.gethostname()}:{os.getpid()}"
    extra = {
        "unit_wall_s": round(time.perf_counter() - started, 3),
        "unit_cpu_s": round(time.process_time() - cpu, 3),
        "worker": where,
    }
    return [_row(unit, name, results[name], extra) for name in unit.names]


def _row(unit: Unit, name: str, result: dict[str, Any] | None, extra: dict[str, Any]
         ) -> dict[str, Any]:  # fmt: skip
    spec = unit.specs[unit.names.index(name)]
    row: dict[str, Any] = {"task": unit.task.name, "seed": unit.seed, "name": name, "spec": spec}
    if result is None:
        return {**row, "status": "failed", **extra}
    best = result["eval"]["best"] or {}
    row.update(status="ok", best_epoch=result["eval"]["best_epoch"])
    row.update({k: best[k] for k in sorted(best)})
    if "valid" in result:  # chosen on held-out training samples: their score, and eval's own
        row["valid_score"] = (result["valid"]["best"] or {}).get("score")
        row["best_on_eval_score"] = (result["eval"].get("best_on_eval") or {}).get("score")
    row.update(train_loss=result["train_loss"], params=result["trainable_params"],
               train_s=result["wall_time_s"], **extra)  # fmt: skip
    return row


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    failures: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Plan the units, run them (Dask or in this process), gather every row, write the table."""
    units = plan_units(cfg)
    log.info("sweep: %d tasks x %d seeds x %d side networks = %d units on %s", len(cfg.tasks),
             len(cfg.seeds), len(cfg.specs), len(units), cfg.scheduler)  # fmt: skip
    started = time.perf_counter()
    result = _run_here(units) if cfg.scheduler == "sequential" else _run_dask(units, cfg)
    result.wall_s = time.perf_counter() - started
    tasks = [t.name for t in cfg.tasks]
    specs = [n for n, _ in named_specs(cfg.specs)]
    result.rows.sort(key=lambda r: (tasks.index(r["task"]), r["seed"], specs.index(r["name"])))
    write_table(result.rows, Path(cfg.out) / "sweep.csv")
    return result


def _failed(unit: Unit, exc: BaseException) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    error = f"{type(exc).__name__}: {exc}"
    log.error("unit %s failed: %s", unit.key, error)
    rows = [_row(unit, n, None, {"error": error}) for n in unit.names]
    return rows, {"unit": unit.key, "task": unit.task.name, "seed": unit.seed,
                  "names": list(unit.names), "error": error}  # fmt: skip


def _run_here(units: list[Unit]) -> SweepResult:
    result = SweepResult([])
    for unit in units:
        try:
            result.rows += run_unit(unit)
        except Exception as exc:  # reported in the table, like a failed Dask task
            rows, failure = _failed(unit, exc)
            result.rows += rows
            result.failures.append(failure)
    return result


def _run_dask(units: list[Unit], cfg: SweepConfig) -> SweepResult:
    from distributed import as_completed

    from pipeline.cluster import dask_client

    result = SweepResult([])
    with dask_client(cfg.scheduler, cfg.workers, cfg.threads) as client:
        futures = {}
        for i, unit in enumerate(units):  # most expensive first
            future = client.submit(
                run_unit, unit, key=unit.key, retries=cfg.retries, pure=False, priority=-i
            )
            futures[future] = unit
        for future in as_completed(futures):
            unit = futures[future]
            if future.status == "finished":
                result.rows += future.result()
                log.info("unit %s done", unit.key)
                continue
            rows, failure = _failed(unit, future.exception())
            result.rows += rows
            result.failures.append(failure)
    return result


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


MARKDOWN_COLUMNS = ("task", "seed", "name", "status", "score", "valid_score", "best_epoch",
                    "params", "train_s")  # fmt: skip


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown: the key columns, plus the error of failed rows."""
    cols = [c for c in MARKDOWN_COLUMNS if any(c in r for r in rows)]
    if any("error" in r for r in rows):
        cols.append("error")

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value).replace("|", "/")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)

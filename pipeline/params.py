"""``params.yaml``: what ``dvc repro`` runs, read and checked in one place.

The DVC stages (``sidecache stage ...``) take only a task name (and a split or a side-network
name); everything else comes from here, so ``dvc.yaml`` can declare each stage's parameters key
by key and DVC re-runs exactly the stages whose keys changed. The file has one section per stage
plus the task list::

    tasks: [bbc]                  # which tasks to run
    glue_dir: ../shared/data/glue # a task name not under `datasets` is looked up here
    datasets: {bbc: {data: bbc}}  # task name -> data spec (+ train_limit, columns)
    cache: {backbone: minilm, ...}  # stage one
    train: {sidenets: {read: read, ...}, epochs: 3, ...}  # stage two
    report: {title: ...}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ParamsError, check_settings, defaults
from pipeline.settings import CacheConfig, TrainConfig

DEFAULT_PARAMS = "params.yaml"
# the settings of stage one and two that params.yaml may set; their types and defaults are
# CacheConfig's and TrainConfig's (pipeline.settings), which `sidecache cache`/`train` share
CACHE_KEYS = (
    "backbone", "revision", "max_length", "layers", "positions", "dtype", "codec", "device",
    "token_budget", "lst_prune", "pairs",
)  # fmt: skip
TRAIN_KEYS = ("epochs", "batch_size", "seed", "device", "ram_budget_mb")

__all__ = [
    "CACHE_KEYS",
    "DEFAULT_PARAMS",
    "TRAIN_KEYS",
    "Dataset",
    "Params",
    "ParamsError",
    "ReportParams",
    "TrainParams",
    "glue_tasks",
    "load_params",
    "sidenet_specs",
]


@dataclass
class TrainParams:
    """The ``train:`` key only params.yaml has: the side networks to train, name -> spec."""

    sidenets: dict[str, str] = field(default_factory=lambda: {"read": "read"})


@dataclass
class ReportParams:
    title: str = "sidecache results"


@dataclass
class Dataset:
    """One task: a data spec (``bbc``, ``glue:DIR``, ``hf:NAME[:CONFIG]``, ``csv:...``)."""

    name: str
    data: str
    train_limit: int | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None


@dataclass
class Params:
    path: Path
    tasks: list[str]
    datasets: dict[str, Dataset]
    glue_dir: Path | None
    cache: dict[str, Any]  # CACHE_KEYS -> the value set here, else CacheConfig's default
    train: dict[str, Any]  # TRAIN_KEYS -> the value set here, else TrainConfig's default
    sidenets: dict[str, str]  # train.sidenets
    report: ReportParams

    def dataset(self, task: str) -> Dataset:
        """The data of ``task``: its ``datasets`` entry, else a GLUE folder under ``glue_dir``."""
        if task in self.datasets:
            return self.datasets[task]
        found = glue_tasks(self.glue_dir) if self.glue_dir else {}
        folder = found.get(_key(task))
        if folder is not None:
            return Dataset(name=task, data=f"glue:{folder}")
        known = sorted(self.datasets) + sorted(p.name for p in found.values())
        where = f" or a GLUE task folder under {self.glue_dir}" if self.glue_dir else ""
        raise ParamsError(
            f"{self.path}: task {task!r} is neither a key of `datasets`{where}; known tasks: "
            f"{', '.join(known) or 'none'}. Add it under `datasets:` (e.g. `{task}: {{data: "
            "'glue:PATH'}`) or fix `tasks:`"
        )


def _key(name: str) -> str:
    """``SST-2``, ``sst2`` and ``sst_2`` name the same task."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def glue_tasks(root: Path | None) -> dict[str, Path]:
    """GLUE task folders (holding ``train.tsv`` and ``dev.tsv``) under ``root``, by key."""
    if root is None or not root.is_dir():
        return {}
    return {
        _key(p.name): p
        for p in sorted(root.iterdir())
        if (p / "train.tsv").is_file() and (p / "dev.tsv").is_file()
    }


def _section(raw: dict[str, Any], name: str, cls: Any, keys: Any, path: Path) -> dict[str, Any]:
    values = raw.get(name)
    return check_settings(cls, {} if values is None else values, name, keys, source=str(path))


def _dataset(name: str, entry: Any, path: Path) -> Dataset:
    entry = {"data": entry} if isinstance(entry, str) else entry
    if not isinstance(entry, dict) or not isinstance(entry.get("data"), str):
        raise ParamsError(
            f"{path}: `datasets.{name}` must be a data spec or a mapping with `data: SPEC`, "
            f"found {entry!r}"
        )
    keys = [f.name for f in fields(Dataset) if f.name != "name"]
    return Dataset(name=name, **check_settings(Dataset, entry, f"datasets.{name}", keys, str(path)))


def _without(values: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k != key}


def _sidenets(train: dict[str, Any], path: Path) -> dict[str, str]:
    sidenets: dict[str, str] = train.get("sidenets", TrainParams().sidenets)
    if not sidenets:
        raise ParamsError(
            f"{path}: `train.sidenets` must map names to specs (e.g. `read: 'read:hidden=128'`), "
            f"found {sidenets!r}"
        )
    return sidenets


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and check ``params.yaml``; every problem names the key and what to write."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(
            f"no parameters file at {path}: run from the project folder (where dvc.yaml is) or "
            "pass --params PATH"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, found {type(raw).__name__}")
    allowed = {"tasks", "glue_dir", "datasets", "cache", "train", "report"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ParamsError(
            f"{path}: unknown section(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(sorted(allowed))}"
        )
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ParamsError(f"{path}: `tasks` must be a non-empty list of names, found {tasks!r}")
    entries = raw.get("datasets") or {}
    if not isinstance(entries, dict):
        raise ParamsError(
            f"{path}: `datasets` must map task names to data specs, found {entries!r}"
        )
    datasets = {str(name): _dataset(str(name), entry, path) for name, entry in entries.items()}
    glue = raw.get("glue_dir")
    glue_dir = (path.parent / glue) if isinstance(glue, str) else None
    cache = _section(raw, "cache", CacheConfig, CACHE_KEYS, path)
    train = _section(raw, "train", (TrainConfig, TrainParams), (*TRAIN_KEYS, "sidenets"), path)
    params = Params(
        path=path,
        tasks=[str(t) for t in tasks],
        datasets=datasets,
        glue_dir=glue_dir,
        cache={**defaults(CacheConfig, CACHE_KEYS), **cache},
        train={**defaults(TrainConfig, TRAIN_KEYS), **_without(train, "sidenets")},
        sidenets=_sidenets(train, path),
        report=ReportParams(**_section(raw, "report", ReportParams, None, path)),
    )
    for task in params.tasks:
        params.dataset(task)  # every task must resolve before anything runs
    return params


def sidenet_specs(sidenets: dict[str, str]) -> list[str]:
    """``--sidenet`` specs with the params' names, so outputs land in ``<task>/<name>/``."""
    specs = []
    for name, spec in sidenets.items():
        if re.search(r"(^|[:,])name=", spec):
            raise ParamsError(
                f"`train.sidenets.{name}` sets name= itself; the key ({name!r}) is the name"
            )
        specs.append(f"{spec}{',' if ':' in spec else ':'}name={name}")
    return specs

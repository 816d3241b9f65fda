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

from pipeline.errors import ConfigError

DEFAULT_PARAMS = "params.yaml"


class ParamsError(ConfigError):
    """``params.yaml`` is missing, malformed, or names something that does not exist."""


@dataclass
class CacheParams:
    backbone: str = "minilm"
    revision: str | None = None
    max_length: int | None = 128
    layers: str = "all"
    positions: str = "all"
    dtype: str = "bfloat16"
    codec: str = "blosc-lz4:5"
    device: str = "auto"
    token_budget: int = 4096
    lst_prune: int | None = None


@dataclass
class TrainParams:
    sidenets: dict[str, str] = field(default_factory=lambda: {"read": "read"})
    epochs: int = 3
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    ram_budget_mb: int = 4096


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
    cache: CacheParams
    train: TrainParams
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


def _section(raw: dict[str, Any], name: str, cls: type, path: Path) -> Any:
    values = raw.get(name) or {}
    if not isinstance(values, dict):
        raise ParamsError(
            f"{path}: `{name}` must be a mapping of settings, found {type(values).__name__} "
            f"{values!r}"
        )
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ParamsError(
            f"{path}: unknown key(s) {', '.join(unknown)} in `{name}`; expected some of "
            f"{', '.join(known)}"
        )
    defaults = cls()
    for key, value in values.items():
        want = getattr(defaults, key)
        _check_type(f"{name}.{key}", value, want, path)
    return cls(**values)


def _check_type(key: str, value: Any, default: Any, path: Path) -> None:
    if value is None or default is None:
        return  # optional settings (limit, revision) take null
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
    }[type(default)](value)
    if not ok:
        raise ParamsError(
            f"{path}: `{key}` must be {type(default).__name__} (like {default!r}), found "
            f"{type(value).__name__} {value!r}"
        )


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
    datasets: dict[str, Dataset] = {}
    for name, entry in (raw.get("datasets") or {}).items():
        entry = {"data": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("data"), str):
            raise ParamsError(
                f"{path}: `datasets.{name}` must be a data spec or a mapping with `data: SPEC`, "
                f"found {entry!r}"
            )
        extra = sorted(set(entry) - {f.name for f in fields(Dataset)} - {"name"})
        if extra:
            raise ParamsError(f"{path}: unknown key(s) {', '.join(extra)} in `datasets.{name}`")
        datasets[str(name)] = Dataset(name=str(name), **entry)
    glue = raw.get("glue_dir")
    glue_dir = (path.parent / glue) if isinstance(glue, str) else None
    train = _section(raw, "train", TrainParams, path)
    if not train.sidenets or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in train.sidenets.items()
    ):
        raise ParamsError(
            f"{path}: `train.sidenets` must map names to specs (e.g. `read: 'read:hidden=128'`), "
            f"found {train.sidenets!r}"
        )
    params = Params(
        path=path,
        tasks=[str(t) for t in tasks],
        datasets=datasets,
        glue_dir=glue_dir,
        cache=_section(raw, "cache", CacheParams, path),
        train=train,
        report=_section(raw, "report", ReportParams, path),
    )
    for task in params.tasks:
        params.dataset(task)  # every task must resolve before anything runs
    return params


def sidenet_specs(train: TrainParams) -> list[str]:
    """``--sidenet`` specs with the params' names, so outputs land in ``<task>/<name>/``."""
    specs = []
    for name, spec in train.sidenets.items():
        if re.search(r"(^|[:,])name=", spec):
            raise ParamsError(
                f"`train.sidenets.{name}` sets name= itself; the key ({name!r}) is the name"
            )
        specs.append(f"{spec}{',' if ':' in spec else ':'}name={name}")
    return specs

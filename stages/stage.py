"""``sidecache stage``: the steps ``dvc.yaml`` runs, each configured by ``params.yaml``.

    sidecache stage cache TASK SPLIT   # stage one -> stores/TASK-SPLIT (+ stores/TASK-SPLIT.json)
    sidecache stage train TASK         # stage two, every train.sidenets entry -> outputs/TASK/
    sidecache stage evaluate TASK NAME # best.pt on the dev store -> results/metrics/TASK/NAME.json
    sidecache stage report             # results/report/report.{html,md}, results/cost.csv
    sidecache stage tasks [--glue DIR] # the task names params.yaml resolves (and GLUE ones found)

Each is a thin layer over the same library calls as ``sidecache cache`` / ``train``: the store
written by ``stage cache`` equals the one ``sidecache cache`` writes with the same settings.
Stage one writes its manifest (the store's metadata, a few KB) only once the store is complete;
later stages depend on the manifest, never on the store's chunk files.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.params import Params, ParamsError, glue_tasks, load_params, sidenet_specs
from pipeline.settings import CacheConfig, ColumnOptions, TrainConfig
from storage import write_text_atomic

log = logging.getLogger(__name__)


def store_path(root: Path, task: str, split: str) -> Path:
    return root / "stores" / f"{task}-{split}"


def manifest_path(root: Path, task: str, split: str) -> Path:
    return root / "stores" / f"{task}-{split}.json"


def cache_config(params: Params, root: Path, task: str, split: str, progress: bool) -> CacheConfig:
    """Stage one's settings for one task and split: params.yaml's `cache:` keys (the others at
    CacheConfig's defaults, as `sidecache cache` has them) and the task's data."""
    ds = params.dataset(task)
    return CacheConfig(
        **params.cache, data=ds.data, split=split,
        limit=ds.train_limit if split == "train" else None, out=str(store_path(root, task, split)),
        columns=ColumnOptions(ds.text_column, ds.text_pair_column, ds.label_column),
        progress=progress,
    )  # fmt: skip


def train_config(params: Params, root: Path, task: str, progress: bool) -> TrainConfig:
    """Stage two's settings for one task: params.yaml's `train:` keys (the others at
    TrainConfig's defaults) and every `train.sidenets` entry, named by its key."""
    return TrainConfig(
        **params.train, train=str(store_path(root, task, "train")),
        eval=str(store_path(root, task, "dev")), specs=sidenet_specs(params.sidenets),
        out=str(root / "outputs" / task), progress=progress,
    )  # fmt: skip


def cmd_cache(params: Params, root: Path, task: str, split: str, progress: bool) -> int:
    from pipeline.cache import run_cache
    from storage import StoreExistsError, open_store

    cfg = cache_config(params, root, task, split, progress)
    out = store_path(root, task, split)
    manifest = manifest_path(root, task, split)
    manifest.unlink(missing_ok=True)  # no manifest until this store is complete again
    try:
        run_cache(cfg)
    except StoreExistsError as exc:
        if not (out / "zarr.json").is_file():
            raise  # something other than a store is in the way: never delete it
        # DVC re-runs this stage because params.yaml changed: the old store is stale by design
        log.warning("%s; replacing it because params.yaml asks for other settings", exc)
        cfg.overwrite = True
        run_cache(cfg)
    meta = open_store(str(out)).meta
    keep = ("schema_version", "layout", "identity", "task", "stats")
    write_text_atomic(
        manifest, json.dumps({k: meta[k] for k in keep if k in meta}, indent=1) + "\n"
    )
    log.info("wrote %s", manifest)
    return 0


def cmd_train(params: Params, root: Path, task: str, progress: bool) -> int:
    from pipeline.errors import StoreIncompleteError
    from pipeline.train import run_train

    for split in ("train", "dev"):
        if not manifest_path(root, task, split).is_file():
            raise StoreIncompleteError(
                f"no manifest {manifest_path(root, task, split)}: the {split} store of task "
                f"{task!r} is not complete; run its cache stage first (dvc repro)"
            )
    run_train(train_config(params, root, task, progress))
    return 0


def cmd_evaluate(params: Params, root: Path, task: str, name: str) -> int:
    from pipeline.evaluate import check_recorded, evaluate_run, flat_row, write_curve

    if name not in params.sidenets:
        raise ParamsError(
            f"side network {name!r} is not in train.sidenets ({', '.join(params.sidenets)})"
        )
    params.dataset(task)
    cfg = train_config(params, root, task, progress=False)
    run = root / "outputs" / task / name
    scores = evaluate_run(run, cfg.eval, device=cfg.device, ram_budget_mb=cfg.ram_budget_mb)
    recorded = json.loads((run / "metrics.json").read_text())
    check_recorded(run, recorded, scores)
    row = flat_row(task, name, recorded, scores)
    results = root / "results"
    metrics_file = results / "metrics" / task / f"{name}.json"
    write_text_atomic(metrics_file, json.dumps(row, indent=1) + "\n")
    write_curve(run, results / "curves" / task / f"{name}.csv")
    log.info("%s/%s: %s", task, name, {k: row[k] for k in scores})
    return 0


def cmd_report(params: Params, root: Path) -> int:
    from pipeline.report import load_rows, table, write_report

    results = root / "results"
    names = list(params.sidenets)
    rows = load_rows(results / "metrics", results / "curves", params.tasks, names)
    paths = write_report(rows, results / "report", results / "cost.csv", params.report.title)
    head, body = table(rows)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    for line in [head, *body]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
    print(f"report: {paths['html']}")
    return 0


def cmd_tasks(params_path: Path, glue: Path | None) -> int:
    if glue is not None:
        names = [p.name for p in glue_tasks(glue).values()]
        if not names:
            raise ParamsError(
                f"no GLUE task folders (holding train.tsv and dev.tsv) under {glue}; point "
                "--glue at the folder that holds SST-2/, CoLA/, ..."
            )
        print("[" + ",".join(names) + "]")
        return 0
    params = load_params(params_path)
    for task in params.tasks:
        print(f"{task}\t{params.dataset(task).data}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sidecache stage", description="The pipeline steps dvc.yaml runs (see params.yaml)."
    )
    p.add_argument("--params", default="params.yaml", help="parameters file (default params.yaml)")
    p.add_argument("--root", default=".", help="project folder holding stores/, outputs/, ...")
    p.add_argument("--no-progress", action="store_true")
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("cache", help="stage one for one task and split")
    s.add_argument("task")
    s.add_argument("split")
    s = sub.add_parser("train", help="stage two: every train.sidenets entry on one task")
    s.add_argument("task")
    s = sub.add_parser("evaluate", help="re-evaluate one side network's best checkpoint")
    s.add_argument("task")
    s.add_argument("name")
    sub.add_parser("report", help="table, learning curves, quality vs cost")
    s = sub.add_parser("tasks", help="list the tasks params.yaml runs, or GLUE tasks under a dir")
    s.add_argument("--glue", type=Path, default=None, help="list GLUE task folders under DIR")
    args = p.parse_args(argv)
    root, progress = Path(args.root), not args.no_progress
    if args.step == "tasks":
        return cmd_tasks(Path(args.params), args.glue)
    params = load_params(args.params)
    if args.step == "cache":
        return cmd_cache(params, root, args.task, args.split, progress)
    if args.step == "train":
        return cmd_train(params, root, args.task, progress)
    if args.step == "evaluate":
        return cmd_evaluate(params, root, args.task, args.name)
    return cmd_report(params, root)

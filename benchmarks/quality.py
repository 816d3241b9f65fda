"""Quality benchmark: dev-set GLUE scores of READ, LST, linear and MLP probes on MiniLM stores.

What it measures (MiniLM, every layer and token, bfloat16, ``--max-length 128``):

* Tasks: SST-2 (train = the first ``--sst2-limit`` = 10,000 samples of the GLUE train file; dev
  in full), CoLA and MRPC (train and dev in full). Each split is cached once under
  ``WORK/stores`` and reused by later runs.
* Side networks, default sizes: ``read``, ``lst``, ``linear`` (last layer), ``mlp`` (learned mix
  of all layers), ``--seeds`` (0, 1, 2: initialisation and dropout; the batch order is the pass's,
  shared by every network in it), learning rates ``--lrs``.
* ``--plan full``: per task ONE :func:`pipeline.train.run_train` pass trains every
  method × lr × seed; the lr of a method is the one with the best mean (over seeds) dev score.
  ``--plan select``: pass 1 trains every method × lr with seed 0 and picks the lr per method by
  that seed's best dev score; pass 2 trains the other seeds at the picked lr (one pass per task
  each). ``--plan estimate``: one epoch of one network per method per task, to time the grid.
* Reported per task and method: the GLUE metric (SST-2 accuracy, CoLA Matthews correlation,
  MRPC F1 and accuracy) at each network's best epoch on dev (``eval.best`` of ``metrics.json``,
  the epoch maximising the task's ``score``), mean ± sample std (ddof 1) over seeds; the lr;
  trainable parameters; the network's own training + evaluation compute time (``wall_time_s``,
  excluding the shared loader) and the pass wall time divided by its number of networks.
  The dev sets choose both the best epoch and the lr, so the figures are dev-selected (the usual
  GLUE-dev practice), slightly optimistic compared with a held-out test set.

Run from the repository root::

    .venv/bin/python -m benchmarks.quality --plan estimate --json /tmp/bench2/quality-est.json
    .venv/bin/python -m benchmarks.quality --plan select --epochs 5 \\
        --json /tmp/bench2/quality.json

Progress goes to the log (stderr); the markdown tables go to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.stage_two import GLUE, ensure_store, git_state, machine, wait_quiet
from pipeline.train import TrainConfig, run_train

log = logging.getLogger("benchmarks.quality")
KINDS = ("read", "lst", "linear", "mlp")
TASKS = {  # key: (GLUE folder, store prefix, metrics to report)
    "sst2": ("SST-2", "sst2", ("accuracy",)),
    "cola": ("CoLA", "cola", ("mcc",)),
    "mrpc": ("MRPC", "mrpc", ("f1", "accuracy")),
}


def spec(kind: str, lr: float, seed: int) -> str:
    return f"{kind}:lr={lr:g},seed={seed},name={kind}-lr{lr:g}-s{seed}"


def stores(task: str, work: Path, sst2_limit: int) -> tuple[Path, Path]:
    folder, prefix, _ = TASKS[task]
    data = f"glue:{GLUE}/{folder}"
    limit = sst2_limit if task == "sst2" else None
    name = f"{prefix}-train{sst2_limit // 1000}k" if limit else f"{prefix}-train"
    train = ensure_store("minilm", data, "train", work / "stores" / name, limit)
    dev = ensure_store("minilm", data, "dev", work / "stores" / f"{prefix}-dev", None)
    return train, dev


def one_pass(
    task: str,
    label: str,
    train: Path,
    dev: Path,
    specs: list[str],
    epochs: int,
    work: Path,
    max_wait: float,
) -> dict[str, Any]:
    """One run_train pass in a fresh folder; its wall time and every network's metrics."""
    watch = wait_quiet(f"{task}/{label}", max_wait)
    out = work / "quality" / task / label
    shutil.rmtree(out, ignore_errors=True)
    log.info("%s %s: %d networks, %d epochs", task, label, len(specs), epochs)
    started = time.perf_counter()
    res = run_train(TrainConfig(str(train), str(dev), specs, epochs, str(out), progress=False))
    wall = time.perf_counter() - started
    log.info("%s %s: %.0f s", task, label, wall)
    nets = {
        name: {
            "kind": m["kind"],
            "spec": m["spec"],
            "best": m["eval"]["best"],
            "best_epoch": m["eval"]["best_epoch"],
            "params": m["trainable_params"],
            "own_s": m["wall_time_s"],
        }
        for name, m in res.items()
    }
    return {"label": label, "env": watch.done(), "wall_s": wall, "epochs": epochs, "networks": nets}


def parse_name(name: str) -> tuple[str, float, int]:
    kind, rest = name.split("-", 1)
    lr, seed = rest.rsplit("-s", 1)
    return kind, float(lr[2:]), int(seed)


def summarise(
    task: str,
    passes: list[dict[str, Any]],
    choose_seed: int | None,
) -> dict[str, Any]:
    """Per method: pick the lr (on ``choose_seed`` alone, or the mean over seeds), then report
    every seed at that lr."""
    nets: dict[str, dict[str, Any]] = {}
    share: dict[str, float] = {}
    for p in passes:
        for name, n in p["networks"].items():
            nets[name] = n
            share[name] = p["wall_s"] / len(p["networks"])
    out: dict[str, Any] = {}
    for kind in KINDS:
        mine = {parse_name(k)[1:]: v for k, v in nets.items() if v["kind"] == kind}
        lrs = sorted({lr for lr, _ in mine})
        grid = {
            lr: [
                v["best"]["score"]
                for (x, s), v in mine.items()
                if x == lr and (choose_seed is None or s == choose_seed)
            ]
            for lr in lrs
        }
        lr = max(lrs, key=lambda x: statistics.mean(grid[x]))
        seeds = sorted(s for x, s in mine if x == lr)
        chosen = [mine[(lr, s)] for s in seeds]
        names = [spec(kind, lr, s).split("name=")[1] for s in seeds]
        figures = {}
        for metric in ("score", *TASKS[task][2]):
            vals = [c["best"][metric] for c in chosen]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            figures[metric] = {"mean": statistics.mean(vals), "std": sd, "per_seed": vals}
        out[kind] = {
            "lr": lr,
            "seeds": seeds,
            "grid_scores": {f"{x:g}": v for x, v in grid.items()},
            "figures": figures,
            "best_epochs": [c["best_epoch"] for c in chosen],
            "params": chosen[0]["params"],
            "own_s": statistics.mean(c["own_s"] for c in chosen),
            "pass_share_s": statistics.mean(share[n] for n in names),
        }
    return out


def run_task(task: str, args: argparse.Namespace) -> dict[str, Any]:
    train, dev = stores(task, args.work, args.sst2_limit)
    lrs, seeds = args.lrs, args.seeds
    if args.plan == "estimate":
        specs = [spec(k, lrs[0], seeds[0]) for k in KINDS]
        p = one_pass(task, "estimate", train, dev, specs, 1, args.work, args.max_wait)
        per_epoch = sum(n["own_s"] for n in p["networks"].values())
        full = per_epoch * len(lrs) * len(seeds)
        select = per_epoch * (len(lrs) + len(seeds) - 1)
        return {
            "passes": [p],
            "own_s_per_epoch_one_each": per_epoch,
            "est_full_grid_s_per_epoch": full,
            "est_select_s_per_epoch": select,
        }
    if args.plan == "full":
        specs = [spec(k, lr, s) for k in KINDS for lr in lrs for s in seeds]
        passes = [one_pass(task, "full", train, dev, specs, args.epochs, args.work, args.max_wait)]
        return {"passes": passes, "summary": summarise(task, passes, None)}
    first = [spec(k, lr, seeds[0]) for k in KINDS for lr in lrs]
    p1 = one_pass(task, "select", train, dev, first, args.epochs, args.work, args.max_wait)
    picked = summarise(task, [p1], seeds[0])
    rest = [spec(k, picked[k]["lr"], s) for k in KINDS for s in seeds[1:]]
    p2 = one_pass(task, "seeds", train, dev, rest, args.epochs, args.work, args.max_wait)
    return {"passes": [p1, p2], "summary": summarise(task, [p1, p2], seeds[0])}


def fmt(fig: dict[str, Any]) -> str:
    return f"{100 * fig['mean']:.2f} ± {100 * fig['std']:.2f}"


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"machine: {m['nproc']} CPUs, torch {m['torch']}, {m['torch_threads']} threads; "
        f"code at {res['git']}; plan {res['plan']}, epochs {res['epochs']}",
        "",
    ]
    if res["plan"] == "estimate":
        lines += [
            "| task | own s/epoch (1 net per method) | full grid s/epoch | select s/epoch |",
            "|---|---:|---:|---:|",
        ]
        for task, t in res["tasks"].items():
            lines.append(
                f"| {task} | {t['own_s_per_epoch_one_each']:.0f} | "
                f"{t['est_full_grid_s_per_epoch']:.0f} | "
                f"{t['est_select_s_per_epoch']:.0f} |"
            )
        return "\n".join(lines)
    lines += [
        "| task | method | dev metric (×100), mean ± std over seeds | lr | lr grid (dev score) "
        "| trainable params | own s / network | pass s / network | best epochs |",
        "|---|---|---|---:|---|---:|---:|---:|---|",
    ]
    for task, t in res["tasks"].items():
        for kind, s in t["summary"].items():
            metrics = TASKS[task][2]
            shown = ", ".join(f"{k} {fmt(s['figures'][k])}" for k in metrics)
            grid = ", ".join(
                f"{lr}: {100 * statistics.mean(v):.1f}" for lr, v in s["grid_scores"].items()
            )
            lines.append(
                f"| {task} | {kind} | {shown} | {s['lr']:g} | {grid} | {s['params']:,} | "
                f"{s['own_s']:.0f} | {s['pass_share_s']:.0f} | {s['best_epochs']} |"
            )
    lines += ["", "| task | pass | networks | epochs | wall s |", "|---|---|---:|---:|---:|"]
    for task, t in res["tasks"].items():
        for p in t["passes"]:
            lines.append(
                f"| {task} | {p['label']} | {len(p['networks'])} | {p['epochs']} | "
                f"{p['wall_s']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/bench2"), help="stores and outputs")
    p.add_argument("--tasks", default="sst2,cola,mrpc")
    p.add_argument("--plan", choices=("estimate", "full", "select"), default="select")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[1e-3, 3e-3])
    p.add_argument("--sst2-limit", type=int, default=10000)
    p.add_argument("--max-wait", type=float, default=900.0, help="s to wait for stage_one")
    p.add_argument("--json", type=Path, default=None, help="save every figure here")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    res: dict[str, Any] = {
        "machine": machine(),
        "git": git_state(),
        "plan": args.plan,
        "epochs": args.epochs,
        "argv": sys.argv,
        "tasks": {},
    }
    started = time.perf_counter()
    for task in args.tasks.split(","):
        res["tasks"][task] = run_task(task, args)
        if args.json:  # save as we go: a task's figures survive a later interruption
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=2, default=str))
    res["total_s"] = time.perf_counter() - started
    log.info("all tasks: %.0f s", res["total_s"])
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

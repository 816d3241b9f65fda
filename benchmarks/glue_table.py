"""One GLUE table from ``sidecache bench`` and ``sidecache sweep`` folders: every method family on
every task, its learning rate and epoch chosen on held-out training samples, never on dev.

Each folder is one ``sidecache bench`` (its task from the data spec, e.g.
``glue:../shared/data/glue/MRPC``) or one ``sidecache sweep`` (``OUT/<task>/seed<S>/<name>/
metrics.json``; its tasks from the ``--task`` names), best run with ``--valid-fraction``. The
folders of one task are joined, as :mod:`benchmarks.methods` joins bench folders (cached and
online methods run side by side, a re-run of a failed seed; a bench or sweep still running gives
its finished runs). A sweep task named ``TASK-VARIANT`` (e.g. ``MRPC-sep``, stores cached another
way) fills TASK's column in rows marked ``(VARIANT)``.

Per task, methods that differ only in ``lr=`` (and ``name=``) form a family and the lr with the
best mean validation score over seeds is chosen (:mod:`pipeline.bench.select`; ties: the first
listed, for a sweep the first in ``sweep.csv``, else in name order). A cell is dev at that
choice, ×100, mean ± sample std over seeds, in the task's GLUE metrics (MRPC, QQP: accuracy /
F1; CoLA: MCC; STS-B: Pearson / Spearman; the others: accuracy), with the chosen lr; a second
table gives dev at the epoch dev itself picks (same lr), for comparison with papers that report
that. A family whose runs held nothing out is chosen on dev and marked †. A third table gives each
family at its kind's default learning rate (:func:`at_defaults`). Last, an oracle per
task (:func:`oracle`): the best any configuration reaches when dev chooses, to show whether a
target is out of reach of everything tried. ``OUT.json`` holds the numbers.

An earlier table's ``OUT.json`` may stand among the folders: its rows fill the cells no folder
gives (a task or method not re-run), its settings checked against theirs.

    .venv/bin/python -m benchmarks.glue_table OUT.md DIR|EARLIER.json [...]
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.methods import load_runs
from pipeline.bench.select import choose, effective_lr
from pipeline.data import GLUE_TASKS, glue_task
from pipeline.errors import ConfigError, DataSpecError

METRICS = {
    "MRPC": ("accuracy", "f1"),
    "QQP": ("accuracy", "f1"),
    "CoLA": ("mcc",),
    "STS-B": ("pearson", "spearman"),
}
SHORT = {"accuracy": "acc", "f1": "F1", "mcc": "MCC", "pearson": "Pearson", "spearman": "Spearman"}
# what the folders joined into one task must share (where both record it): otherwise their
# scores do not compare (the held-out draw depends on the fraction and the training samples)
SHARED = ("backbone", "limit", "valid_fraction", "eval_split", "eval_limit")


@dataclass
class Part:
    """The runs of one task (and variant) from one folder."""

    task: str
    variant: str
    folder: Path
    settings: dict[str, Any]  # the SHARED keys the folder records
    methods: list[str]
    runs: list[dict[str, Any]]
    epochs: set[int] = field(default_factory=set)
    seeds: set[int] = field(default_factory=set)
    sweep: bool = False  # a sweep trains every side network of its task (and variant) anew


def task_name(data: str) -> str:
    """``glue:DIR/MRPC`` -> ``MRPC``; any other data spec is its own name."""
    kind, _, rest = data.partition(":")
    if kind != "glue":
        return data
    try:
        return glue_task(Path(rest)).name
    except DataSpecError:
        return Path(rest).name


def split_variant(name: str) -> tuple[str, str]:
    """A sweep's task name: ``MRPC-sep`` -> ``("MRPC", "sep")``, ``SST-2`` -> ``("SST-2", "")``;
    a name that is no GLUE task's is its own task."""
    for glue in GLUE_TASKS:
        if name.lower() == glue.lower():
            return glue, ""
        if name.lower().startswith(glue.lower() + "-"):
            return glue, name[len(glue) + 1 :]
    return name, ""


def metrics_of(task: str) -> tuple[str, ...]:
    return METRICS.get(task, ("accuracy",))


def bench_part(folder: Path) -> Part:
    config, runs = load_runs(folder)
    settings = {key: config.get(key, 0.0 if key == "valid_fraction" else None) for key in SHARED}
    return Part(task_name(config["data"]), "", folder, settings, list(config["methods"]),
                [r for r in runs if r.get("kind") in ("cached", "online")],
                {config["epochs"]}, set(config["seeds"]))  # fmt: skip


def sweep_order(folder: Path) -> list[str]:
    """The specs in ``sweep.csv``'s order (the sweep's ``--sidenet`` order), if it is there."""
    table = folder / "sweep.csv"
    if not table.is_file():
        return []
    with table.open(newline="") as f:
        return list(dict.fromkeys(f"cached:{row['spec']}" for row in csv.DictReader(f)))


def sweep_parts(folder: Path) -> list[Part]:
    """One part per task of a sweep folder: its finished networks' ``metrics.json``."""
    order, parts = sweep_order(folder), []
    for task_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        runs = []
        for path in sorted(task_dir.glob("seed*/*/metrics.json")):
            metrics = json.loads(path.read_text())
            if not metrics.get("finished", True):
                continue
            seed = int(path.parent.parent.name[len("seed") :])
            method = f"cached:{metrics['spec']}"
            runs.append({"kind": "cached", "method": method, "seed": seed, "payload": metrics})
        if not runs:
            continue
        task, variant = split_variant(task_dir.name)
        fractions = {(r["payload"].get("valid") or {}).get("fraction", 0.0) for r in runs}
        if len(fractions) > 1:
            raise ConfigError(
                f"{task_dir}: expected one --valid-fraction for every network of a task; found "
                f"{sorted(fractions)}: re-run the sweep with one"
            )
        methods = [m for m in order if any(r["method"] == m for r in runs)]
        methods += sorted({r["method"] for r in runs} - set(methods))
        parts.append(Part(task, variant, task_dir, {"valid_fraction": fractions.pop()}, methods,
                          runs, {r["payload"]["epochs"] for r in runs},
                          {r["seed"] for r in runs}, sweep=True))  # fmt: skip
    return parts


def load_parts(folder: Path) -> list[Part]:
    if (folder / "bench.json").is_file() or (folder / "jobs").is_dir():
        return [bench_part(folder)]
    parts = sweep_parts(folder) if folder.is_dir() else []
    if not parts:
        raise ConfigError(
            f"{folder}: expected a sidecache bench folder (bench.json or jobs/) or a sidecache "
            "sweep folder (TASK/seedS/NAME/metrics.json); found neither: check the path"
        )
    return parts


def check_shared(task: str, parts: list[Part]) -> dict[str, Any]:
    """The SHARED settings of a task's parts, refused where two parts record different ones."""
    known: dict[str, tuple[Any, Path]] = {}
    for part in parts:
        for key, value in part.settings.items():
            if key not in known:
                known[key] = value, part.folder
            elif known[key][0] != value:
                raise ConfigError(
                    f"{task}: the folders of one task must share --{key.replace('_', '-')}; "
                    f"expected {known[key][0]!r} (as in {known[key][1]}), found {value!r} in "
                    f"{part.folder}: give that folder as another table's, or re-run it"
                )
    return {key: value for key, (value, _) in known.items()}


def join_task(task: str, parts: list[Part]) -> dict[str, Any]:
    """The parts of one task as one: settings (checked to agree), and per variant the choice."""
    settings = check_shared(task, parts)
    settings.update(
        folders=[str(p.folder) for p in parts],
        epochs=sorted({e for p in parts for e in p.epochs}),
        seeds=sorted({s for p in parts for s in p.seeds}),
    )
    chosen = []
    for variant in dict.fromkeys(p.variant for p in parts):
        mine = [p for p in parts if p.variant == variant]
        methods = list(dict.fromkeys(m for p in mine for m in p.methods))
        for entry in choose(methods, [r for p in mine for r in p.runs]):
            entry["row"] = entry["family"] + (f" ({variant})" if variant else "")
            chosen.append(entry)
    swept = sorted({p.variant for p in parts if p.sweep})
    return {"settings": settings, "chosen": chosen, "swept": swept}


def load_tasks(folders: list[Path]) -> dict[str, dict[str, Any]]:
    """Task name -> its joined folders, tasks in the order first given. A ``.json`` (an earlier
    table's ``OUT.json``) adds its rows where no folder gives the same row of the same task."""
    grouped: dict[str, list[Part]] = {}
    earlier: list[tuple[Path, dict[str, Any]]] = []
    for folder in folders:
        if folder.suffix == ".json" and folder.is_file():
            earlier.append((folder, json.loads(folder.read_text())["tasks"]))
            continue
        for part in load_parts(folder):
            grouped.setdefault(part.task, []).append(part)
    tasks = {task: join_task(task, parts) for task, parts in grouped.items()}
    for path, old in earlier:
        for task, joined in old.items():
            merge_earlier(tasks, task, joined, path)
    return tasks


def merge_earlier(
    tasks: dict[str, dict[str, Any]], task: str, joined: dict[str, Any], path: Path
) -> None:
    """Add an earlier table's rows of ``task`` (from ``path``) that ``tasks`` lacks; its
    settings must agree with the folders' (the SHARED keys both record). A sweep of the task
    (and variant) among the folders replaces every side-network row the earlier table had
    there, also those it names otherwise (specs change between sweeps)."""
    if task not in tasks:
        tasks[task] = joined
        return
    mine = tasks[task]
    for key in (k for k in SHARED if k in mine["settings"] and k in joined["settings"]):
        if mine["settings"][key] != joined["settings"][key]:
            raise ConfigError(
                f"{task}: {path} records --{key.replace('_', '-')} "
                f"{joined['settings'][key]!r}, the folders {mine['settings'][key]!r}: their "
                "scores do not compare; leave that table out, or re-run its runs"
            )
    rows, swept = {c["row"] for c in mine["chosen"]}, set(mine.get("swept", []))

    def replaced(c: dict[str, Any]) -> bool:
        variant = c["row"][len(c["family"]) :].strip(" ()")
        return c["row"] in rows or (c["family"].startswith("cached:") and variant in swept)

    mine["chosen"] += [c for c in joined["chosen"] if not replaced(c)]
    settings = mine["settings"]
    settings["folders"] = list(
        dict.fromkeys([*settings["folders"], *joined["settings"]["folders"]])
    )
    for key in ("epochs", "seeds"):
        settings[key] = sorted({*settings[key], *joined["settings"][key]})


def pick(task: str, scores: dict[str, Any] | None) -> dict[str, Any] | None:
    """The task's GLUE metrics of a :func:`pipeline.bench.select.stats` result."""
    if not scores:
        return None
    return {m: scores.get(m) for m in metrics_of(task)}


def cells(tasks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for task, joined in tasks.items():
        for c in joined["chosen"]:
            if c["method"] is None:
                continue
            out.append(
                {
                    "row": c["row"],
                    "family": c["family"],
                    "task": task,
                    "method": c["method"],
                    "lr": c["lr"],
                    "lr_value": c["lr_value"],
                    "chosen_on": c["chosen_on"],
                    "runs": c["runs"],
                    "valid_score": (c["valid"] or {}).get("score"),
                    "dev": pick(task, c["dev"]),
                    "dev_best_on_eval": pick(task, c["dev_best_on_eval"]),
                }
            )
    return out


def at_defaults(tasks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per family and task, the member that trains at the kind's default learning rate (what
    ``--sidenet KIND`` or ``--methods online:KIND`` gives with no ``lr=``), if one ran: dev at
    its validation-chosen epoch, as cells of the main table."""
    out = []
    for task, joined in tasks.items():
        for entry in joined["chosen"]:
            default = effective_lr(entry["family"])
            for cand in entry["candidates"]:
                # an earlier table's candidates carry no dev figures: its chosen member's do
                dev = cand.get("dev") or (
                    entry["dev"] if cand["method"] == entry["method"] else None
                )
                if default is None or cand["lr_value"] != default or not dev:
                    continue
                out.append({"row": entry["row"], "family": entry["family"], "task": task,
                            "method": cand["method"], "lr": cand["lr"],
                            "lr_value": cand["lr_value"], "chosen_on": entry["chosen_on"],
                            "runs": cand["runs"], "dev": pick(task, dev),
                            "dev_best_on_eval": None})  # fmt: skip
                break  # the first listed, as choose() breaks ties
    return out


def _pm(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    std = "–" if stat.get("std") is None else f"{100 * stat['std']:.2f}"
    return f"{100 * stat['mean']:.2f} ± {std}"


def cell_text(cell: dict[str, Any] | None, which: str, seeds: int) -> str:
    """``62.50 ± 12.50 / 37.50 ± 12.50 (lr 0.003)``; the number of runs where it is not the
    task's number of seeds (a failed or unfinished run), † where chosen on dev."""
    if cell is None or cell[which] is None:
        return "–"
    lr = cell["lr"] if cell["lr_value"] is None else f"{cell['lr_value']:g}"
    runs = "" if cell["runs"] == seeds else f", {cell['runs']} of {seeds} seeds"
    mark = "" if cell["chosen_on"] == "valid" else " †"
    return " / ".join(_pm(s) for s in cell[which].values()) + f" (lr {lr}{runs}){mark}"


def table(tasks: dict[str, dict[str, Any]], found: list[dict[str, Any]], which: str) -> list[str]:
    rows = list(dict.fromkeys(c["row"] for c in found))
    at = {(c["row"], c["task"]): c for c in found}
    heads = [f"{t} {' / '.join(SHORT.get(m, m) for m in metrics_of(t))}" for t in tasks]
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(tasks)]
    for row in rows:
        texts = [
            cell_text(at.get((row, t)), which, len(tasks[t]["settings"]["seeds"])) for t in tasks
        ]
        lines.append(f"| {row} | " + " | ".join(texts) + " |")
    return lines


def settings_lines(tasks: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for task, joined in tasks.items():
        s = joined["settings"]
        share = s.get("valid_fraction") or 0.0
        held = f"{share:g} of it held out" if share else "none held out"
        known = ", ".join(
            f"{key.replace('_', ' ')} {s[key]}"
            for key in SHARED
            if key in s and key != "valid_fraction"
        )
        out.append(
            f"* {task}: train samples {held}; {known + '; ' if known else ''}epochs "
            f"{s['epochs']}, seeds {s['seeds']}; folders {', '.join(s['folders'])}"
        )
    return out


def oracle(tasks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and mode (cached, online): the configuration (family, variant, lr) with the best
    mean dev at dev's own epoch, on the task's first metric, and the best single run of any
    configuration. Both choose on dev: a ceiling of what was tried, to tell a target out of
    reach from a choice that missed it, never a result. The best mean is taken over the
    configurations that ran every seed of the task (a mean of fewer seeds is no match for
    them); only where none did, over all, saying of how many seeds. An earlier table's rows
    kept no figures per run and per learning rate: they count with their chosen lr's mean
    only, and the result says ``partial``."""
    out = []
    for task, joined in tasks.items():
        metric, seeds = metrics_of(task)[0], len(joined["settings"]["seeds"])
        for mode in ("cached", "online"):
            means: list[tuple[float, str, str, int]] = []
            top: tuple[float, str, str] | None = None
            partial = False
            for entry in joined["chosen"]:
                if not entry["family"].startswith(mode + ":"):
                    continue
                for cand in entry["candidates"]:
                    mean, peak = cand.get("dev_best_on_eval"), cand.get("dev_best_on_eval_max")
                    if mean is None and cand["method"] == entry["method"]:
                        mean, partial = entry["dev_best_on_eval"], True
                    if not mean or metric not in mean:
                        continue
                    runs = cand.get("runs", entry.get("runs", seeds))
                    means.append((mean[metric]["mean"], entry["row"], cand["lr"], runs))
                    if peak:
                        one = (peak[metric], entry["row"], cand["lr"])
                        top = one if top is None or one[0] > top[0] else top
            full = [m for m in means if m[3] >= seeds] or means
            if full:
                best = max(full, key=lambda m: m[0])  # ties: the first found
                out.append({"task": task, "mode": mode, "metric": metric, "partial": partial,
                            "best_mean": best[0], "best_mean_row": best[1], "best_mean_lr": best[2],
                            "best_mean_runs": best[3], "seeds": seeds,
                            "best_run": top and top[0], "best_run_row": top and top[1],
                            "best_run_lr": top and top[2]})  # fmt: skip
    return out


def oracle_lines(found: list[dict[str, Any]]) -> list[str]:
    if not found:
        return []
    lines = [
        "Oracle, chosen on dev (a ceiling of what was tried, not a result): per task, the "
        "configuration (every family and learning rate) with the best mean dev at dev's own "
        "epoch (among those that ran every seed), and the best single run of any "
        "configuration. ‡ some rows come from an earlier "
        "table, which kept only its chosen learning rate's mean: those count with that alone, "
        "and the best single run is the best of the rows that kept their runs (≥).",
        "",
        "| task | mode | best configuration, mean over seeds | best single run |",
        "|---|---|---|---|",
    ]
    for o in found:
        metric = SHORT.get(o["metric"], o["metric"])
        mark = " ‡" if o["partial"] else ""
        run = (
            f"{'≥ ' if o['partial'] else ''}{100 * o['best_run']:.2f} "
            f"({o['best_run_row']}, lr {o['best_run_lr']})"
            if o["best_run"] is not None
            else "–"
        )
        few = (
            ""
            if o["best_mean_runs"] >= o["seeds"]
            else f", {o['best_mean_runs']} of {o['seeds']} seeds"
        )
        lines.append(
            f"| {o['task']} {metric} | {o['mode']}{mark} | {100 * o['best_mean']:.2f} "
            f"({o['best_mean_row']}, lr {o['best_mean_lr']}{few}) | {run} |"
        )
    return ["", *lines]


def to_markdown(tasks: dict[str, dict[str, Any]], found: list[dict[str, Any]]) -> str:
    lines = [
        "Dev (×100, mean ± sample std over seeds) of each method family at its learning rate and "
        "epoch chosen on samples held out of training (the highest mean validation score over "
        "seeds; every run's epoch chosen on them too); the chosen lr in brackets. † chosen on dev "
        "itself (the runs held nothing out): optimistic. A row marked (X): the task's sweep "
        "named TASK-X (glue_table.sh: (sep) stores cached with --pairs separate, (long) the "
        "long-TASK part).",
        "",
        *table(tasks, found, "dev"),
        "",
        "For comparison with papers that report it: dev at the epoch dev itself picks, at the same "
        "learning rate.",
        "",
        *table(tasks, found, "dev_best_on_eval"),
        "",
        "At each kind's default learning rate (what `--sidenet KIND` trains with no `lr=`), the "
        "epoch chosen on validation as above.",
        "",
        *table(tasks, at_defaults(tasks), "dev"),
        *oracle_lines(oracle(tasks)),
        "",
        *settings_lines(tasks),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__)
        return 2
    out, folders = Path(args[0]), [Path(a) for a in args[1:]]
    tasks = load_tasks(folders)
    found = cells(tasks)
    report = {"tasks": tasks, "cells": found, "at_defaults": at_defaults(tasks),
              "oracle": oracle(tasks)}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    text = to_markdown(tasks, found)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The report: every (task, side network) row in one table, learning curves, quality vs cost.

Reads what the evaluate stage wrote (``results/metrics/<task>/<name>.json`` and
``results/curves/<task>/<name>.csv``) and writes ``results/report/report.md`` (table + PNG charts
beside it), ``results/report/report.html`` (the same, self-contained: charts embedded) and
``results/cost.csv`` (the quality-versus-cost points ``dvc plots`` draws).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from pipeline.errors import ConfigError

COST_AXES = (
    ("trainable_params", "trainable parameters", True),
    ("train_seconds", "training wall time (s)", False),
    ("peak_memory_mb", "peak memory of the training process (MB)", False),
)
METRIC_ORDER = ("score", "accuracy", "f1", "mcc", "pearson", "spearman", "mse")


@dataclass
class Row:
    metrics: dict[str, Any]
    curve: list[dict[str, float]]


def load_rows(metrics_dir: Path, curves_dir: Path, tasks: list[str], names: list[str]) -> list[Row]:
    rows = []
    for task in tasks:
        for name in names:
            path = metrics_dir / task / f"{name}.json"
            if not path.is_file():
                raise ConfigError(
                    f"no metrics for task {task!r}, side network {name!r} at {path}; run the "
                    "evaluate stage first (dvc repro)"
                )
            curve_path = curves_dir / task / f"{name}.csv"
            with curve_path.open() as f:
                curve = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
            rows.append(Row(json.loads(path.read_text()), curve))
    return rows


def _metric_keys(rows: list[Row]) -> list[str]:
    present = {k for r in rows for k in r.metrics}
    return [k for k in METRIC_ORDER if k in present]


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    keys = _metric_keys(rows)
    head = ["task", "side network", *keys, "params", "train s", "peak MB", "best epoch"]
    body = []
    for r in rows:
        m = r.metrics
        body.append([
            m["task"], m["sidenet"], *(f"{m[k]:.4f}" if k in m else "" for k in keys),
            f"{m['trainable_params']:,}", f"{m['train_seconds']:.1f}",
            "" if m.get("peak_memory_mb") is None else f"{m['peak_memory_mb']:.0f}",
            f"{m['best_epoch']}/{m['epochs']}",
        ])  # fmt: skip
    return head, body


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves_chart(rows: list[Row], task: str) -> bytes:
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    for r in (r for r in rows if r.metrics["task"] == task):
        epochs, name = [p["epoch"] for p in r.curve], r.metrics["sidenet"]
        ax_loss.plot(epochs, [p["train_loss"] for p in r.curve], marker="o", label=name)
        ax_score.plot(epochs, [p["score"] for p in r.curve], marker="o", label=name)
    ax_loss.set(title=f"{task}: training loss", xlabel="epoch", ylabel="loss")
    ax_score.set(title=f"{task}: eval score", xlabel="epoch", ylabel="score")
    for ax in (ax_loss, ax_score):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_score.legend(fontsize=8)
    return _png(fig)


def cost_chart(rows: list[Row]) -> bytes:
    fig, axes = plt.subplots(1, len(COST_AXES), figsize=(13, 3.8), constrained_layout=True)
    tasks = sorted({r.metrics["task"] for r in rows})
    markers = "osD^vP*X"
    for ax, (key, label, log_scale) in zip(axes, COST_AXES, strict=True):
        for i, task in enumerate(tasks):
            pts = [r.metrics for r in rows if r.metrics["task"] == task and r.metrics.get(key)]
            ax.scatter([m[key] for m in pts], [m["score"] for m in pts],
                       marker=markers[i % len(markers)], label=task)  # fmt: skip
            for m in pts:
                ax.annotate(m["sidenet"], (m[key], m["score"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
        if log_scale:
            ax.set_xscale("log")
        ax.set(xlabel=label, ylabel="eval score (best epoch)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("quality versus cost, per side network")
    return _png(fig)


def write_report(rows: list[Row], out: Path, cost_csv: Path, title: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    head, body = table(rows)
    charts = {"quality_vs_cost.png": cost_chart(rows)}
    for task in dict.fromkeys(r.metrics["task"] for r in rows):
        charts[f"curves_{task}.png"] = curves_chart(rows, task)
    for name, data in charts.items():
        (out / name).write_bytes(data)

    md = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in body]
    md += ["", "`score` is the task's GLUE metric (accuracy where GLUE has none); it picks the "
           "best epoch. Peak memory is the whole training pass (all side networks of a task "
           "train together).", ""]  # fmt: skip
    md += [f"![{name}]({name})" for name in charts]
    (out / "report.md").write_text("\n".join(md) + "\n")

    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    imgs = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"><figcaption>{name}</figcaption></figure>'
        for name, data in charts.items()
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1300px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}"
        "img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table><tr>{cells}</tr>{trs}</table>"
        "<p><code>score</code> is the task's GLUE metric; it picks the best epoch. Peak memory "
        "is the whole training pass (all side networks of a task train together).</p>"
        f"{imgs}</body></html>"
    )
    (out / "report.html").write_text(page)

    cost_csv.parent.mkdir(parents=True, exist_ok=True)
    with cost_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "score", "trainable_params", "train_seconds", "peak_memory_mb"])
        for r in rows:
            m = r.metrics
            w.writerow([f"{m['task']}/{m['sidenet']}", m["score"], m["trainable_params"],
                        m["train_seconds"], m.get("peak_memory_mb")])  # fmt: skip
    return {"html": out / "report.html", "markdown": out / "report.md", "cost": cost_csv}

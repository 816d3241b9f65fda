"""``sidecache inspect``: what a store holds and how well it compressed."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from storage import open_store


def plot_history(run: Path) -> Path | None:
    """``learning_curve.png`` beside the run: train loss and the eval score per epoch."""
    path = run / "history.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(epochs, [float(r["train_loss"]) for r in rows], marker="o")
    left.set(xlabel="epoch", ylabel="train loss", title="training")
    for key in [k for k in rows[0] if k not in ("epoch", "train_loss")]:
        right.plot(epochs, [float(r[key]) for r in rows], marker="o", label=key)
    right.set(xlabel="epoch", ylabel="dev metric", title="evaluation")
    right.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(run.name)
    fig.tight_layout()
    out = run / "learning_curve.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def inspect_run(run: Path, as_json: bool) -> int:
    result = json.loads((run / "metrics.json").read_text())
    import torch

    state = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    ident = state["store_identity"]
    view = {
        "run": str(run),
        "spec": result["spec"],
        "model_config": state["model_config"],
        "train_settings": state["train_settings"],
        "trainable_params": result["trainable_params"],
        "store": {
            "backbone": ident["backbone"]["name"],
            "weights_hash": ident["backbone"]["weights_hash"][:16],
            "dataset": ident["dataset"]["spec"],
            "split": ident["dataset"]["split"],
            "fingerprint": ident["dataset"]["fingerprint"][:16],
        },
        "best": result["eval"]["best"],
        "best_epoch": result["eval"]["best_epoch"],
        "epochs": result["epochs"],
        "finished": result["finished"],
        "learning_curve": str(plot_history(run)),
    }
    if as_json:
        print(json.dumps(view, indent=2))
    else:
        for key, value in view.items():
            print(f"{key:<17}{json.dumps(value) if isinstance(value, dict) else value}")
    return 0


def format_summary(s: dict[str, Any]) -> str:
    def mb(x: int | None) -> str:
        return "unknown" if x is None else f"{x / 1e6:,.1f} MB"

    ratio = s["compression_ratio"]
    lines = [
        f"store        {s['path']}  ({'complete' if s['complete'] else 'INCOMPLETE'})",
        f"backbone     {s['backbone']}",
        f"data         {s['dataset']}  split {s['split']}  task {s['task'].get('name')} "
        f"({s['task'].get('type')}, {s['task'].get('num_labels')} labels)",
        f"samples      {s['samples']:,}    tokens {s['tokens']:,}    rows {s['rows']:,}",
        f"layers       {s['layers']}  hidden size {s['hidden_size']}  positions {s['positions']}",
        f"stored dtype {s['dtype']}  codec {s['codec']['name']}:{s['codec']['level']}  "
        f"shards {s['shards']}",
        f"raw bytes    {mb(s['raw_bytes'])}    on disk {mb(s['bytes_on_disk'])}    "
        f"ratio {'unknown' if ratio is None else f'{ratio:.2f}x'}",
    ]
    if s["bytes_per_token"]:
        lines.append(f"bytes/token  {s['bytes_per_token']:,.0f} on disk")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sidecache inspect", description="Describe a store or a run.")
    p.add_argument("store", help="a store, or a run folder OUT/<name> of 'sidecache train'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if (Path(args.store) / "metrics.json").is_file():
        return inspect_run(Path(args.store), args.json)
    reader = open_store(args.store, allow_incomplete=True)
    summary = reader.summary()
    if args.json:
        summary["identity"] = reader.identity
        summary["stats"] = reader.meta.get("stats")
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0 if reader.complete else 1

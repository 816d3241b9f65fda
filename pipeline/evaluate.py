"""Evaluate a trained side network on a store: its best checkpoint, re-run on the eval split.

This is the DVC ``evaluate`` stage: it loads ``OUT/<name>/best.pt``, runs it over the evaluation
store exactly the way stage two evaluated it (same batches, same order), checks the metrics
agree with what training recorded, and writes one flat metrics file (one row of
``dvc metrics show``) plus the learning curve as CSV (``dvc plots``).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import metrics
from pipeline.errors import ConfigError, StoreMismatchError
from pipeline.loader import StoreLoader
from pipeline.sidenets import StoreInfo, build, parse_spec
from pipeline.train import same_source
from storage import open_store

log = logging.getLogger(__name__)


class EvaluationMismatchError(ConfigError):
    """Re-evaluating a checkpoint did not reproduce the metrics recorded during training."""


@torch.no_grad()
def store_outputs(model: torch.nn.Module, loader: StoreLoader, device: torch.device,
                  ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``(outputs, gold)`` of ``model`` over every sample of the loader's store, in order."""
    model.eval()
    outs, gold = [], []
    for batch in loader.epoch(0):
        batch = batch.to(device)
        outs.append(model(batch).float().cpu().numpy())
        gold.append(batch.labels.cpu().numpy())
    return np.concatenate(outs), np.concatenate(gold)


def evaluate_run(run: str | Path, eval_store: str, *, device: str = "cpu",
                 ram_budget_mb: int = 4096) -> dict[str, Any]:  # fmt: skip
    """Metrics of ``run``'s best checkpoint on ``eval_store``, which must come from the same
    backbone, tokenizer, layers, positions, dtype and task as the training store."""
    from pipeline.backbone import pick_device

    path = Path(run) / "best.pt"
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}: train the side network first (dvc repro)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    trained_on = state["store_info"]
    # the training store's metadata, as far as the checkpoint records it
    meta = {"identity": state["store_identity"], "layout": trained_on, "task": trained_on["task"]}
    try:
        reader = open_store(eval_store, expect=same_source(meta))
    except StoreMismatchError as exc:
        raise StoreMismatchError(f"{run} was trained on another kind of store: {exc}") from exc
    # a run from before StoreInfo.pairs pooled pairs the backbone's way: build it as trained
    info = dataclasses.replace(StoreInfo.from_meta(reader.meta),
                               pairs=bool(trained_on.get("pairs", False)))  # fmt: skip
    dev = pick_device(device)
    model = build(parse_spec(state["spec"]), info)
    model.load_state_dict(state["state_dict"])
    model.to(dev)
    loader = StoreLoader(
        reader,
        int(state.get("eval_batch_size", 64)),
        shuffle=False,
        ram_budget=ram_budget_mb << 20,
    )
    outputs, gold = store_outputs(model, loader, dev)
    return metrics.compute(info.task, outputs, gold)


def flat_row(task: str, name: str, recorded: dict[str, Any], scores: dict[str, float],
             ) -> dict[str, Any]:  # fmt: skip
    """One row of ``dvc metrics show``: the eval metrics and what the network cost to train
    (``recorded`` is the run's ``metrics.json``)."""
    mem = recorded.get("memory", {})
    peak = mem.get("peak_rss_bytes", mem.get("peak_bytes"))
    return {
        "task": task,
        "sidenet": name,
        "spec": recorded["spec"],
        **{k: round(float(v), 6) for k, v in scores.items()},
        "best_epoch": recorded["eval"]["best_epoch"],
        "epochs": recorded["epochs"],
        "trainable_params": recorded["trainable_params"],
        "train_seconds": recorded["wall_time_s"],
        "peak_memory_mb": None if peak is None else round(peak / 2**20, 1),
        "memory_device": mem.get("device"),
    }


def check_recorded(run: Path, metrics_json: dict[str, Any], scores: dict[str, float],
                   tol: float = 1e-6) -> None:  # fmt: skip
    recorded = metrics_json["eval"]["best"]
    if recorded is None:
        raise ConfigError(f"{run}/metrics.json records no evaluation; the training did not finish")
    off = {k: (recorded[k], v) for k, v in scores.items() if abs(recorded.get(k, v) - v) > tol}
    if off:
        raise EvaluationMismatchError(
            f"re-evaluating {run}/best.pt gave {off} (recorded, now); the checkpoint or the "
            "evaluation store changed since training: re-run training (dvc repro -f train)"
        )


def write_curve(run: Path, dest: Path) -> None:
    """The run's per-epoch history as a CSV with columns epoch, train_loss, <metrics>."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (run / "history.csv").open() as src, dest.open("w", newline="") as out:
        csv.writer(out).writerows(csv.reader(src))

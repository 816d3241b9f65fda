"""``sidecache predict``: run a trained side network (with its backbone) on new text."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import numpy as np

from pipeline import metrics
from pipeline.config import add_flags, from_args
from pipeline.data import ColumnOptions, TextData, head, load_data
from pipeline.errors import ConfigError
from pipeline.predict import load_predictor, predict
from storage import write_text_atomic

log = logging.getLogger(__name__)


def records(
    outputs: np.ndarray, task: dict[str, Any], gold: np.ndarray | None
) -> list[dict[str, Any]]:
    rows = []
    for i, out in enumerate(outputs):
        if task["type"] == "regression":
            row: dict[str, Any] = {"index": i, "value": float(out[0])}
        else:
            probs = np.exp(out - out.max())
            probs /= probs.sum()
            k = int(out.argmax())
            names = task.get("label_names") or [str(j) for j in range(len(out))]
            row = {"index": i, "label": names[k], "label_id": k,
                   "scores": [round(float(p), 6) for p in probs]}  # fmt: skip
        if gold is not None:
            row["gold"] = gold[i].item()
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sidecache predict", description="Predict with a trained run.")
    p.add_argument("--run", required=True, help="OUT/<name> folder of 'sidecache train' (or a .pt)")
    p.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    p.add_argument("--text-pair", action="append", default=[], help="second texts for pair tasks")
    p.add_argument("--data", default=None, help="a data spec, as for 'sidecache cache'")
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=int, default=None)
    add_flags(p, ColumnOptions)
    p.add_argument("--out", default=None, help="write predictions as JSON lines here")
    p.add_argument("--device", default="auto")
    p.add_argument("--backbone", default=None, help="load the backbone from here instead")
    args = p.parse_args(argv)
    if bool(args.text) == bool(args.data):
        raise ConfigError("give either --text (one or more) or --data SPEC --split S")
    if args.text_pair and len(args.text_pair) != len(args.text):
        raise ConfigError(f"{len(args.text)} --text but {len(args.text_pair)} --text-pair")
    loaded = load_predictor(args.run, args.device, args.backbone)
    task = loaded.predictor.info.task
    if args.data:
        cols = from_args(ColumnOptions, args)
        data = head(load_data(args.data, args.split, cols), args.limit)
        gold: np.ndarray | None = data.labels
    else:
        pairs = args.text_pair or None
        data = TextData(
            "text", "cli", list(args.text), pairs, np.zeros(len(args.text), np.int64), task
        )
        gold = None
    outputs = predict(loaded, data)
    rows = records(outputs, task, gold)
    if args.out:
        write_text_atomic(args.out, "".join(json.dumps(r) + "\n" for r in rows))
        log.info("wrote %d predictions to %s", len(rows), args.out)
    else:
        for row in rows[:20]:
            print(json.dumps(row))
    if gold is not None:
        print(json.dumps({"metrics": metrics.compute(task, outputs, gold)}, indent=2))
    return 0

"""GLUE-style metrics from predictions, in plain numpy.

Classification: accuracy, F1 (of class 1 for binary tasks, macro for more classes) and the
Matthews correlation. Regression: Pearson and Spearman. ``score`` is what model selection
maximises: the task's GLUE metric (CoLA: MCC; MRPC, QQP: mean of F1 and accuracy; STS-B: mean
of Pearson and Spearman; everything else: accuracy).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean())


def f1(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> float:
    present = sorted(set(np.unique(gold).tolist()) | set(np.unique(pred).tolist()))
    classes = [1] if num_labels == 2 else present  # macro over the labels that occur
    scores = []
    for c in classes:
        tp = float(((pred == c) & (gold == c)).sum())
        fp = float(((pred == c) & (gold != c)).sum())
        fn = float(((pred != c) & (gold == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def matthews(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> float:
    """Matthews correlation (Gorodkin's multi-class form; the usual one for two classes)."""
    conf = np.zeros((num_labels, num_labels), dtype=np.float64)
    np.add.at(conf, (gold.astype(int), pred.astype(int)), 1)
    t, p = conf.sum(1), conf.sum(0)
    c, s = np.trace(conf), conf.sum()
    denom = np.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return 0.0 if denom == 0 else float((c * s - (t * p).sum()) / denom)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64) - x.mean(), y.astype(np.float64) - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return 0.0 if denom == 0 else float((x * y).sum() / denom)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.zeros(len(counts))
    np.add.at(sums, inverse, ranks)
    return (sums / counts)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_ranks(x), _ranks(y))


def compute(task: dict[str, Any], outputs: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Metrics for one task from model outputs (logits ``(N, C)`` or values ``(N,)``)."""
    name = str(task.get("name", "")).lower().replace("-", "")
    if task["type"] == "regression":
        values = outputs.reshape(-1)
        out = {"pearson": pearson(values, gold), "spearman": spearman(values, gold)}
        out["score"] = (out["pearson"] + out["spearman"]) / 2
        return out
    n = int(task["num_labels"])
    pred = outputs.argmax(axis=1)
    out = {
        "accuracy": accuracy(pred, gold),
        "f1": f1(pred, gold, n),
        "mcc": matthews(pred, gold, n),
    }
    if name == "cola":
        out["score"] = out["mcc"]
    elif name in ("mrpc", "qqp"):
        out["score"] = (out["f1"] + out["accuracy"]) / 2
    else:
        out["score"] = out["accuracy"]
    return out

"""GLUE metrics against reference implementations (scikit-learn, SciPy) where installed."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import metrics


def test_metrics_match_scikit_learn_and_scipy():
    sk = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n_labels in (2, 3, 5):
        gold = rng.integers(0, n_labels, size=400)
        pred = np.where(rng.random(400) < 0.7, gold, rng.integers(0, n_labels, size=400))
        avg = "binary" if n_labels == 2 else "macro"
        assert metrics.accuracy(pred, gold) == pytest.approx(sk.accuracy_score(gold, pred))
        assert metrics.f1(pred, gold, n_labels) == pytest.approx(
            sk.f1_score(gold, pred, average=avg)
        )
        assert metrics.matthews(pred, gold, n_labels) == pytest.approx(
            sk.matthews_corrcoef(gold, pred)
        )
    x = rng.standard_normal(300)
    y = np.round(x + rng.standard_normal(300), 1)  # ties for the rank correlation
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_score_is_the_glue_metric_of_the_task():
    gold = np.array([0, 1, 1, 0, 1])
    logits = np.eye(2)[[0, 1, 0, 0, 1]]
    cola = metrics.compute(
        {"name": "CoLA", "type": "classification", "num_labels": 2}, logits, gold
    )
    assert cola["score"] == cola["mcc"]
    mrpc = metrics.compute(
        {"name": "MRPC", "type": "classification", "num_labels": 2}, logits, gold
    )
    assert mrpc["score"] == pytest.approx((mrpc["f1"] + mrpc["accuracy"]) / 2)
    sts = metrics.compute({"name": "STS-B", "type": "regression"}, np.array([1.0, 2, 3]),
                          np.array([1.0, 2.5, 2.9]))  # fmt: skip
    assert sts["score"] == pytest.approx((sts["pearson"] + sts["spearman"]) / 2)
    assert metrics.matthews(np.zeros(4), np.array([0, 1, 0, 1]), 2) == 0.0  # constant prediction

"""Every side-network kind and init, trained and then used: evaluate and predict reproduce
stage two's own evaluation (``lst:init=pruned`` once needed its store again to be rebuilt)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import metrics
from pipeline.data import load_data
from pipeline.evaluate import check_recorded, evaluate_run
from pipeline.predict import load_predictor, predict
from pipeline.train import TrainConfig, run_train
from stages.cli import main
from tests.conftest import best_outputs, cache_splits
from tests.pipeline.test_prune import wide_ff_bert  # noqa: F401 (a fixture)

SPECS = {
    "read": "read:hidden=16",
    "read-bf16": "read:hidden=16,precision=bfloat16",
    "lst": "lst:r=2",
    "lst-pruned": "lst:r=2,init=pruned",
    "linear": "linear",
    "mlp": "mlp:hidden=16",
}


@pytest.fixture(scope="module")
def trained(wide_ff_bert, glue_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("kinds")
    cache_splits(wide_ff_bert, f"glue:{glue_dir}", root, lst_prune=2)
    specs = [f"{spec}{',' if ':' in spec else ':'}name={name}" for name, spec in SPECS.items()]
    cfg = TrainConfig(train=str(root / "train"), eval=str(root / "dev"), specs=specs, epochs=1,
                      out=str(root / "out"), batch_size=16, progress=False)  # fmt: skip
    run_train(cfg)
    return root


@pytest.mark.parametrize("name", list(SPECS))
def test_evaluate_reproduces_training(trained, name):
    run = trained / "out" / name
    recorded = json.loads((run / "metrics.json").read_text())
    scores = evaluate_run(run, str(trained / "dev"))
    check_recorded(run, recorded, scores)  # raises when they differ
    assert scores == recorded["eval"]["best"]


@pytest.mark.parametrize("name", list(SPECS))
def test_predict_reproduces_training(trained, glue_dir, name):
    run = trained / "out" / name
    loaded = load_predictor(run, "cpu")
    data = load_data(f"glue:{glue_dir}", "dev")
    outputs = predict(loaded, data)
    assert np.array_equal(outputs, best_outputs(trained / "out" / name, trained / "dev"))
    recorded = json.loads((run / "metrics.json").read_text())["eval"]["best"]
    assert metrics.compute(loaded.predictor.info.task, outputs, data.labels) == recorded


def test_predict_cli_on_a_pruned_lst_run(trained, capsys):
    argv = ["predict", "--run", str(trained / "out" / "lst-pruned"), "--text", "a fine film",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert abs(sum(row["scores"]) - 1) < 1e-4

"""Predict from raw text == stage two's evaluation of the cached split; identity refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import metrics
from pipeline.data import load_data
from pipeline.errors import StoreMismatchError
from pipeline.loader import StoreLoader
from pipeline.predict import load_predictor, predict
from pipeline.sidenets import StoreInfo, build, parse_spec
from pipeline.train import TrainConfig, run_train
from stages.cli import main
from storage import open_store
from tests.conftest import build_bert, cache_splits


@pytest.fixture(scope="module")
def run(model_dir, glue_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    model = model_dir("bert")
    cache_splits(model, f"glue:{glue_dir}", root)  # bfloat16, all tokens
    specs = ["read:hidden=16", "lst:r=4", "read:hidden=16,precision=bfloat16,name=read-bf16"]
    run_train(TrainConfig(
        train=str(root / "train"), eval=str(root / "dev"), specs=specs, epochs=2,
        out=str(root / "out"), batch_size=16, progress=False,
    ))  # fmt: skip
    return root


def stage_two_outputs(root, name: str) -> np.ndarray:
    state = torch.load(root / "out" / name / "best.pt", weights_only=False)
    reader = open_store(root / "dev")
    model = build(parse_spec(state["spec"]), StoreInfo.from_meta(reader.meta))
    model.load_state_dict(state["state_dict"])
    model.eval()
    loader = StoreLoader(reader, state["eval_batch_size"], shuffle=False)
    with torch.no_grad():
        return np.concatenate([model(b).numpy() for b in loader.epoch(0)])


@pytest.mark.parametrize("name", ["read", "lst", "read-bf16"])
def test_predictions_from_raw_text_equal_stage_two_evaluation(run, glue_dir, name):
    loaded = load_predictor(run / "out" / name, "cpu")
    data = load_data(f"glue:{glue_dir}", "dev")
    outputs = predict(loaded, data)
    assert np.array_equal(outputs, stage_two_outputs(run, name))
    saved = json.loads((run / "out" / name / "metrics.json").read_text())
    assert (
        metrics.compute(loaded.predictor.info.task, outputs, data.labels) == saved["eval"]["best"]
    )


def test_predict_cli_writes_jsonl_and_text_mode(run, glue_dir, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    argv = ["predict", "--run", str(run / "out" / "read"), "--data", f"glue:{glue_dir}",
            "--split", "dev", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 and {"label", "label_id", "scores", "gold"} <= set(rows[0])
    capsys.readouterr()
    argv = ["predict", "--run", str(run / "out" / "lst"), "--text", "a great film", "--text",
            "a terrible film", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(printed) == 2 and abs(sum(printed[0]["scores"]) - 1) < 1e-4


def test_predictor_module_maps_token_ids_to_outputs(run, glue_dir):
    loaded = load_predictor(run / "out" / "read", "cpu")
    tok = loaded.predictor.bb.tokenizer(["a great film", "bad"], padding=True, return_tensors="pt")
    out = loaded.predictor(tok["input_ids"], tok["attention_mask"], tok["token_type_ids"])
    assert out.shape == (2, 2) and isinstance(loaded.predictor, torch.nn.Module)


def test_another_backbone_is_refused(run, tmp_path, caplog):
    other = build_bert(tmp_path / "other", seed=7)
    with pytest.raises(StoreMismatchError, match="weights_hash"):
        load_predictor(run / "out" / "read", "cpu", backbone=other)
    argv = ["predict", "--run", str(run / "out" / "read"), "--text", "x", "--backbone", other]
    assert main(argv) == 2
    assert "StoreMismatchError" in caplog.text


def test_inspect_a_run_shows_config_identity_metrics_and_plots(run, capsys):
    assert main(["inspect", str(run / "out" / "read"), "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["spec"] == "read:hidden=16" and view["model_config"]["hidden"] == 16
    assert view["store"]["split"] == "train" and view["best"]["accuracy"] >= 0
    png = run / "out" / "read" / "learning_curve.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

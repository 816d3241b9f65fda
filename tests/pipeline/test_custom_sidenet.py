"""Side networks named by import path: parsing and typing of their keys, every refusal with a
named error (exit 2 from the CLI), and train -> evaluate -> predict -> sweep on such a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import metrics
from pipeline.data import load_data
from pipeline.errors import ConfigError, SidecacheError
from pipeline.evaluate import check_recorded, evaluate_run, store_outputs
from pipeline.loader import StoreLoader
from pipeline.params import sidenet_specs
from pipeline.predict import load_predictor, predict
from pipeline.sidenets import SideNetError, StoreInfo, build, parse_spec
from pipeline.sidenets.precision import Autocast
from pipeline.sweep import SweepConfig, Task, named_specs, run_sweep
from pipeline.train import member_names
from stages.cli import main
from storage import open_store
from tests.conftest import cache_splits

REPO = Path(__file__).resolve().parents[2]
HEADS = "tests.tests_pkg.heads"
TASK = {"type": "classification", "num_labels": 3}
INFO = StoreInfo(hidden_size=32, layers=(0, 1, 2), positions="all", pooling="first",
                 num_heads=4, causal=False, task=TASK)  # fmt: skip


@pytest.fixture(scope="module")
def stores(model_dir, glue_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("custom")
    return cache_splits(model_dir("bert"), f"glue:{glue_dir}", root)


@pytest.fixture(scope="module")
def run(stores) -> Path:
    """``sidecache train`` of a custom head (default name) and a built-in kind in one pass."""
    argv = ["train", "--train", str(stores / "train"), "--eval", str(stores / "dev"),
            "--sidenet", f"{HEADS}.MyHead:hidden=8,center=true,lr=3e-3", "--sidenet", "linear",
            "--epochs", "2", "--batch-size", "16", "--out", str(stores / "out"),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return stores / "out" / "myhead"


def test_keys_are_typed_by_the_constructor_and_training_keys_are_kept_apart():
    spec = parse_spec(f"{HEADS}.MyHead:hidden=8,dropout=0.2,center=yes,act=relu,scale=none,"
                      "lr=3e-3,seed=4,precision=bfloat16,name=h")  # fmt: skip
    assert spec.kind == f"{HEADS}.MyHead" and spec.is_custom
    assert spec.model == {"hidden": 8, "dropout": 0.2, "center": True, "act": "relu",
                          "scale": None}  # fmt: skip
    assert type(spec.model["hidden"]) is int and type(spec.model["dropout"]) is float
    assert (spec.train.lr, spec.train.seed, spec.train.name) == (3e-3, 4, "h")
    assert parse_spec(f"{HEADS}.MyHead:scale=2").model == {"scale": 2.0}  # float | None
    assert spec.model_config() == spec.model
    net = build(spec, INFO)
    assert isinstance(net, Autocast) and net.net.args["act"] == "relu"
    anything = parse_spec(f"{HEADS}.AnyKeys:hidden=4,foo=1")  # **kwargs: untyped, kept as text
    assert anything.model == {"hidden": 4, "foo": "1"}
    assert build(anything, INFO).extra == {"foo": "1"}


def test_default_name_is_the_class_name_lower_cased():
    specs = [parse_spec(f"{HEADS}.MyHead"), parse_spec(f"{HEADS}.MyHead:hidden=4"),
             parse_spec("read")]  # fmt: skip
    assert member_names(specs[2:]) == ["read"]
    assert member_names(specs[:1]) == ["myhead"]
    assert member_names(specs) == ["myhead-0", "myhead-1", "read"]
    named = named_specs([f"{HEADS}.MyHead", f"{HEADS}.MyHead:hidden=4"])
    assert named == [("myhead-0", f"{HEADS}.MyHead:name=myhead-0"),
                     ("myhead-1", f"{HEADS}.MyHead:hidden=4,name=myhead-1")]  # fmt: skip
    # params.yaml's train.sidenets: the key names it
    (text,) = sidenet_specs({"mine": f"{HEADS}.MyHead:hidden=4"})
    assert parse_spec(text).train.name == "mine"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (f"{HEADS}_nothere.MyHead", r"cannot import module 'tests.tests_pkg.heads_nothere'"),
        (f"{HEADS}.Nope", r"has no attribute 'Nope'; its nn.Module classes are \['AnyKeys'"),
        (f"{HEADS}.NotAModule", "the class NotAModule, not an nn.Module subclass"),
        (f"{HEADS}.CONSTANT", "is a int; expected a torch.nn.Module subclass"),
        (f"{HEADS}.MyHead:width=3", r"unknown key 'width'; MyHead takes \['act', 'center'"),
        (f"{HEADS}.MyHead:hidden=big", "hidden='big' is not a int"),
        (f"{HEADS}.MyHead:center=maybe", "center='maybe' is not a bool"),
        (f"{HEADS}.MyHead:lr=fast", "lr='fast' is not a float"),
        (f"{HEADS}.NeedsWidth", r"NeedsWidth needs width=\.\.\."),
        ("tests..heads.MyHead", "is not an import path"),
    ],
)
def test_bad_specs_are_refused_when_parsed(spec, match):
    with pytest.raises(SideNetError, match=match) as err:
        parse_spec(spec)
    assert isinstance(err.value, ConfigError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (f"{HEADS}.MyHead:hidden=0", r"MyHead\(info, hidden=0\) failed: ValueError: hidden must"),
        (f"{HEADS}.WrongShape", r"returned shape \(2, 4\) .* expected \(B, C\) = \(2, 3\)"),
        (f"{HEADS}.Flat", r"returned shape \(2,\) .* expected \(B, C\) = \(2, 3\)"),
    ],
)
def test_bad_networks_are_refused_when_built(spec, match):
    with pytest.raises(SideNetError, match=match):
        build(parse_spec(spec), INFO)


def test_a_module_that_fails_to_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "needs_missing.py").write_text("import not_installed_anywhere_xyz\n")
    (tmp_path / "raises.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SideNetError, match="no module named 'not_installed_anywhere_xyz'"):
        parse_spec("needs_missing.Head")
    with pytest.raises(SideNetError, match="failed with RuntimeError: broken on purpose"):
        parse_spec("raises.Head")


def test_a_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    (tmp_path / "here_heads.py").write_text("from tests.tests_pkg.heads import MyHead as Here\n")
    monkeypatch.chdir(tmp_path)
    cwd = os.getcwd()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", cwd)])
    assert parse_spec("here_heads.Here:hidden=4").model == {"hidden": 4}
    assert sys.path[-1] == cwd


def test_the_cli_exits_2_with_the_error_named(stores, tmp_path, caplog):
    base = ["train", "--train", str(stores / "train"), "--eval", str(stores / "dev"),
            "--epochs", "1", "--out", str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    assert main([*base, "--sidenet", f"{HEADS}.Nope"]) == 2
    assert "SideNetError" in caplog.text and "has no attribute 'Nope'" in caplog.text
    caplog.clear()
    assert main([*base, "--sidenet", f"{HEADS}.WrongShape"]) == 2  # found once the store is open
    assert "SideNetError" in caplog.text and "expected (B, C) = (2, 2)" in caplog.text
    assert issubclass(SideNetError, SidecacheError)


def test_train_records_the_spec_and_evaluate_reproduces_it(run, stores):
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    assert state["kind"] == f"{HEADS}.MyHead"
    assert state["spec"] == f"{HEADS}.MyHead:hidden=8,center=true,lr=3e-3"
    assert state["model_config"] == {"hidden": 8, "center": True}
    assert state["train_settings"]["lr"] == 3e-3
    recorded = json.loads((run / "metrics.json").read_text())
    assert recorded["epochs"] == 2 and recorded["kind"] == f"{HEADS}.MyHead"
    scores = evaluate_run(run, str(stores / "dev"))
    check_recorded(run, recorded, scores)
    assert (stores / "out" / "linear" / "best.pt").is_file()


def test_predict_on_the_run_equals_stage_two_evaluation(run, stores, glue_dir, tmp_path):
    out = tmp_path / "preds.jsonl"
    argv = ["predict", "--run", str(run), "--data", f"glue:{glue_dir}", "--split", "dev",
            "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40
    loaded = load_predictor(run, "cpu")
    outputs = predict(loaded, load_data(f"glue:{glue_dir}", "dev"))
    state = loaded.state
    reader = open_store(stores / "dev")
    model = build(parse_spec(state["spec"]), StoreInfo.from_meta(reader.meta))
    model.load_state_dict(state["state_dict"])
    loader = StoreLoader(reader, state["eval_batch_size"], shuffle=False)
    expected, gold = store_outputs(model, loader, torch.device("cpu"))
    assert np.array_equal(outputs, expected)
    recorded = json.loads((run / "metrics.json").read_text())["eval"]["best"]
    assert metrics.compute(loaded.predictor.info.task, outputs, gold) == recorded


def test_inspect_shows_the_kwargs(run, capsys):
    assert main(["inspect", str(run), "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["model_config"] == {"hidden": 8, "center": True}


def test_a_sequential_sweep_trains_it(stores, tmp_path):
    cfg = SweepConfig(
        tasks=[Task("t", str(stores / "train"), str(stores / "dev"))],
        specs=[f"{HEADS}.MyHead:hidden=4", "linear"], seeds=[0], epochs=1,
        out=str(tmp_path / "sweep"), scheduler="sequential",
    )  # fmt: skip
    result = run_sweep(cfg)
    assert result.ok, result.failures
    assert {r["name"] for r in result.rows} == {"myhead", "linear"}
    assert (tmp_path / "sweep" / "t" / "seed0" / "myhead" / "best.pt").is_file()


def test_the_attention_pool_example_trains_from_the_command_line(stores, tmp_path):
    """``sidecache`` itself (the console script), run from the repository root: the example's
    module is found in the current directory."""
    script = Path(sys.executable).with_name("sidecache")
    cmd = [str(script), "train", "--train", str(stores / "train"), "--eval", str(stores / "dev"),
           "--sidenet", "examples.attention_pool.AttentionPool:dropout=0.1,lr=3e-3",
           "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "out"),
           "--no-progress", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "out" / "attentionpool" / "metrics.json").read_text())
    assert result["finished"] and result["kind"] == "examples.attention_pool.AttentionPool"
    assert result["trainable_params"] == 32 + 1 + 32 * 2 + 2  # score and head

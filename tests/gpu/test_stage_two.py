"""Stage two on the device: a network trains alike alone and among K, resumes to the same run,
splits batches (--micro-rows) and computes in bfloat16; evaluate and predict reproduce its
metrics; its checkpoints load on the CPU.

Comparisons are exact: each network owns its random stream (dropout) on the device too, and the
same batches in the same order through the same kernels give the same bits. Only the CPU
rerun of a checkpoint written on CUDA allows a tolerance (other kernels, other roundings).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pipeline.train as train_mod
from pipeline import metrics
from pipeline.data import load_data
from pipeline.evaluate import evaluate_run, store_outputs
from pipeline.loader import StoreLoader
from pipeline.predict import load_predictor, predict
from pipeline.sidenets import StoreInfo, build, parse_spec
from storage import open_store
from tests.gpu.conftest import EPOCHS, NAMES, SPECS, train_on

pytestmark = pytest.mark.gpu


def checkpoint(folder, name: str = "best.pt") -> dict:
    return torch.load(folder / name, map_location="cpu", weights_only=False)


def assert_same_weights(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_run(a: dict, b: dict) -> None:
    """Two results of ``run_train`` for one network: the same scores, losses and best weights."""
    assert a["eval"] == b["eval"]
    assert a["train_loss"] == b["train_loss"] and a["epochs"] == b["epochs"]


@pytest.mark.parametrize("spec", ["read:hidden=16", "mlp:hidden=32,pool=mean"])
def test_a_network_alone_trains_as_it_does_among_k(spec, device, device_stores, trained,
                                                   tmp_path):  # fmt: skip
    name = parse_spec(spec).train.name or parse_spec(spec).kind
    alone = train_on(device, device_stores, tmp_path, [spec])[name]
    assert_same_run(alone, trained["results"][name])
    for file in ("best.pt", "last.pt"):
        assert_same_weights(checkpoint(tmp_path / name, file)["state_dict"],
                            checkpoint(trained["root"] / name, file)["state_dict"])  # fmt: skip


def test_an_interrupted_run_resumes_to_the_uninterrupted_one(device, device_stores, trained,
                                                             tmp_path, monkeypatch):  # fmt: skip
    real, calls = train_mod.evaluate, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == EPOCHS:  # after the first epoch's checkpoints, before the last's
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        train_on(device, device_stores, tmp_path, SPECS)
    monkeypatch.undo()
    assert all(checkpoint(tmp_path / n, "last.pt")["epoch"] == EPOCHS - 1 for n in NAMES)
    resumed = train_on(device, device_stores, tmp_path, SPECS)  # resumes the optimiser state
    for name in NAMES:
        assert_same_run(resumed[name], trained["results"][name])
        assert_same_weights(checkpoint(tmp_path / name)["state_dict"],
                            checkpoint(trained["root"] / name)["state_dict"])  # fmt: skip


def test_held_out_validation_on_the_device(device, device_stores, tmp_path):
    """``--valid-fraction`` on the device: the train store resident once (both loaders share
    it) trains exactly as read on the host, and the epoch is chosen on the held-out samples."""
    specs = ["read:hidden=16", "linear"]
    resident = train_on(device, device_stores, tmp_path / "res", specs, valid_fraction=0.25)
    host = train_on(device, device_stores, tmp_path / "host", specs, valid_fraction=0.25,
                    device_budget_mb=0)  # fmt: skip
    for name in ("read", "linear"):
        assert_same_run(resident[name], host[name])
        assert resident[name]["valid"] == host[name]["valid"]
        assert resident[name]["eval"]["chosen_on"] == "valid"
        again = evaluate_run(tmp_path / "res" / name, device_stores["dev"], device=device)
        assert again == resident[name]["eval"]["best"]


def test_micro_rows_on_the_device(device, device_stores, trained, tmp_path):
    specs = ["read:hidden=16", "lst:r=4"]
    roomy = train_on(device, device_stores, tmp_path / "roomy", specs, micro_rows=10**6)
    split = train_on(device, device_stores, tmp_path / "split", specs, micro_rows=24)
    for name in ("read", "lst"):
        whole = trained["results"][name]
        assert_same_run(roomy[name], whole)  # a budget above every batch changes nothing
        assert split[name]["finished"] and split[name]["micro_rows"] == 24
        assert split[name]["train_loss"] == pytest.approx(whole["train_loss"], rel=0.05)
        again = evaluate_run(tmp_path / "split" / name, device_stores["dev"], device=device)
        assert again == split[name]["eval"]["best"]


@pytest.mark.parametrize("name", ["read-bf16", "lst-bf16"])
def test_bfloat16_networks_train_on_the_device(name, device, device_stores, trained):
    result = trained["results"][name]
    assert result["finished"] and result["epochs"] == EPOCHS
    assert np.isfinite(result["train_loss"]) and 0.0 <= result["eval"]["best"]["accuracy"] <= 1.0
    state = checkpoint(trained["root"] / name)
    assert all(
        t.dtype == torch.float32 for t in state["state_dict"].values() if t.is_floating_point()
    )
    memory = result["memory"]
    assert memory["device"] == torch.device(device).type
    if memory["device"] == "cuda":
        assert memory["peak_bytes"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_reproduces_the_recorded_metrics(name, device, device_stores, trained):
    folder = trained["root"] / name
    recorded = json.loads((folder / "metrics.json").read_text())["eval"]["best"]
    assert evaluate_run(folder, device_stores["dev"], device=device) == recorded


@pytest.mark.parametrize("name", ["read", "lst", "mlp", "read-bf16"])
def test_predict_from_raw_text_reproduces_the_recorded_metrics(name, device, device_stores,
                                                               trained):  # fmt: skip
    folder = trained["root"] / name
    loaded = load_predictor(folder, device)
    data = load_data(device_stores["data"], "dev")
    outputs = predict(loaded, data)
    recorded = json.loads((folder / "metrics.json").read_text())["eval"]["best"]
    assert metrics.compute(loaded.predictor.info.task, outputs, data.labels) == recorded


def dev_outputs(folder, store: str, device: str) -> np.ndarray:
    """The best checkpoint's outputs over the dev store, computed on ``device``."""
    state = checkpoint(folder)
    reader = open_store(store)
    model = build(parse_spec(state["spec"]), StoreInfo.from_meta(reader.meta))
    model.load_state_dict(state["state_dict"])
    loader = StoreLoader(reader, state["eval_batch_size"], shuffle=False)
    return store_outputs(model.to(device), loader, torch.device(device))[0]


@pytest.mark.parametrize("name", NAMES)
def test_device_checkpoints_load_and_run_on_the_cpu(name, device, device_stores, trained):
    folder = trained["root"] / name
    for file in ("best.pt", "last.pt"):
        state = checkpoint(folder, file)
        tensors = [t for t in state["state_dict"].values() if isinstance(t, torch.Tensor)]
        assert tensors and all(t.device.type == "cpu" for t in tensors)
    on_cpu = dev_outputs(folder, device_stores["dev"], "cpu")
    on_device = dev_outputs(folder, device_stores["dev"], device)
    if torch.device(device).type == "cpu":
        assert np.array_equal(on_cpu, on_device)
    else:  # other kernels (TF32 in cuDNN's RNNs; in bfloat16, other ops lowered): close only
        scale = float(np.abs(on_device).max())
        tol = 1e-1 if "bf16" in name else 1e-2  # a wrong load would be off by the whole scale
        np.testing.assert_allclose(on_cpu, on_device, rtol=0, atol=tol * scale)
    loaded = load_predictor(folder, device="cpu")
    assert all(p.device.type == "cpu" for p in loaded.predictor.parameters())
    data = load_data(device_stores["data"], "dev")
    outputs = predict(loaded, data)
    assert outputs.shape == (len(data.texts), 2) and np.isfinite(outputs).all()

"""Online methods end to end on a tiny BERT: online READ/LST reproduce stage two from a float32
store; full fine-tuning, LoRA and MEFT train and report stage two's metrics."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.loader import StoreLoader
from pipeline.online import OnlineConfig, run_online
from pipeline.online.batches import grouped_order
from pipeline.online.methods import parse_method
from pipeline.train import TrainConfig, run_train
from storage import open_store
from tests.conftest import small_cache


@pytest.fixture(scope="module")
def f32_stores(model_dir, glue_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("online")
    out = {"model": model_dir("bert"), "data": f"glue:{glue_dir}"}
    for split in ("train", "dev"):
        small_cache(out["model"], out["data"], root / split, split=split, dtype="float32")
        out[split] = str(root / split)
    return out


def history(path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.mark.parametrize("spec", ["read:hidden=16", "lst:r=4"])
def test_online_side_network_equals_cached_training(spec, f32_stores, tmp_path):
    """Same seed and batch order: every epoch's train loss and eval metrics agree with stage two
    trained from a float32 store, to float round-off."""
    cached = run_train(TrainConfig(train=f32_stores["train"], eval=f32_stores["dev"], specs=[spec],
                                   epochs=2, out=str(tmp_path / "c"), batch_size=16, seed=3,
                                   progress=False))  # fmt: skip
    loader = StoreLoader(open_store(f32_stores["train"]), 16, shuffle=True, seed=3)
    online = run_online(OnlineConfig(
        backbone=f32_stores["model"], data=f32_stores["data"], spec=spec, epochs=2,
        out=str(tmp_path / "o"), batch_size=16, seed=3, device="cpu", progress=False,
        order=lambda epoch: (b.samples.numpy() for b in loader.epoch(epoch)),
    ))  # fmt: skip
    name = spec.split(":")[0]
    ref = history(tmp_path / "c" / name / "history.csv")
    assert len(ref) == len(online["history"]) == 2
    for a, b in zip(ref, online["history"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-6 * abs(a["train_loss"])
        for key, value in b["eval"].items():
            assert abs(a[key] - value) <= 1e-6, (key, a[key], value)
    assert online["trainable_params"] == cached[name]["trainable_params"]


@pytest.mark.parametrize("spec", ["full:lr=1e-4", "lora:r=4,lr=1e-3", "meft:bottleneck=8"])
def test_online_methods_train_and_report_metrics(spec, f32_stores, tmp_path):
    result = run_online(OnlineConfig(
        backbone=f32_stores["model"], data=f32_stores["data"], spec=spec, epochs=2,
        out=str(tmp_path), batch_size=16, device="cpu", progress=False, limit=32, eval_limit=16,
    ))  # fmt: skip
    saved = json.loads((tmp_path / spec.split(":")[0] / "metrics.json").read_text())
    assert saved["epochs"] == 2 and len(saved["history"]) == 2
    assert set(saved["eval"]["best"]) == {"accuracy", "f1", "mcc", "score"}
    assert np.isfinite(saved["train_loss"]) and saved["train_loss"] > 0
    assert saved["eval"] == result["eval"]
    full_size = 30522 * 32  # the word embeddings alone
    if spec.startswith("full"):
        assert saved["trainable_params"] > full_size
    else:
        assert 0 < saved["trainable_params"] < full_size / 10


def test_grouped_order_covers_every_sample_once_per_epoch():
    lengths = np.random.default_rng(0).integers(1, 50, 1000)
    batches = list(grouped_order(lengths, 32, seed=1, epoch=0, group=5))
    assert len(batches) == -(-1000 // 32)
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.5 * np.mean([np.ptp(lengths[b]) for b in
                                   grouped_order(lengths, 32, 1, 0, group=1)])  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [("bitfit", "unknown online method"), ("linear", "train them from a store"),
     ("lora:rank=4", "unknown key 'rank'"), ("meft:lam=x", "is not a float")],
)  # fmt: skip
def test_bad_method_specs_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_method(text)

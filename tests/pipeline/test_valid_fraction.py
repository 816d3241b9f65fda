"""``--valid-fraction``: a fixed share of the training samples is held out, never trained on, and
chooses each network's best epoch; cached and online runs hold out the same samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, DataSpecError
from pipeline.holdout import holdout_samples
from pipeline.loader import StoreLoader
from pipeline.online import OnlineConfig, run_online
from pipeline.train import TrainConfig, make_loaders, run_train
from storage import open_store
from tests.conftest import cache_splits


@pytest.fixture(scope="module")
def stores(model_dir, glue_dir, tmp_path_factory) -> dict[str, str]:
    model, data = model_dir("bert"), f"glue:{glue_dir}"
    root = cache_splits(model, data, tmp_path_factory.mktemp("valid"), dtype="float32")
    return {"model": model, "data": data, "train": str(root / "train"), "dev": str(root / "dev")}


def test_holdout_is_a_fixed_draw_of_the_asked_share():
    held = holdout_samples(1000, 0.1)
    assert len(held) == 100 and len(np.unique(held)) == 100
    assert np.array_equal(held, np.sort(held)) and held.min() >= 0 and held.max() < 1000
    assert np.array_equal(held, holdout_samples(1000, 0.1))  # the same for every run
    assert len(holdout_samples(5, 0.01)) == 1  # at least one
    assert len(holdout_samples(50, 0.0)) == 0
    for bad in (-0.1, 1.0, 0.99):
        with pytest.raises(DataSpecError, match="--valid-fraction"):
            holdout_samples(5, bad)


def test_a_subset_loader_serves_exactly_its_samples_with_the_full_loaders_rows(stores):
    reader = open_store(stores["train"])
    n = reader.layout.n_samples
    held = holdout_samples(n, 0.3)
    fit = np.setdiff1d(np.arange(n), held)
    batches = list(StoreLoader(reader, 1000, shuffle=False).epoch(0))
    full = {}
    for b in batches:
        full.update(zip(b.samples.tolist(), b.hidden.split(b.lengths.tolist()), strict=True))
    for subset, shuffle in ((fit, True), (held, False)):
        loader = StoreLoader(reader, 7, shuffle=shuffle, seed=4, samples=subset, ram_budget=0,
                             pool_bytes=1 << 16)  # fmt: skip
        seen = []
        for batch in loader.epoch(1):
            rows = batch.hidden.split(batch.lengths.tolist())
            for s, mine in zip(batch.samples.tolist(), rows, strict=True):
                assert torch.equal(mine, full[s])
                seen.append(s)
        assert sorted(seen) == subset.tolist() and len(loader) == -(-len(subset) // 7)


def test_the_best_epoch_is_chosen_on_held_out_samples_never_trained_on(stores, tmp_path):
    cfg = TrainConfig(train=stores["train"], eval=stores["dev"], specs=["read:hidden=8,lr=3e-3",
                      "linear"], epochs=4, out=str(tmp_path), batch_size=8, progress=False,
                      valid_fraction=0.25)  # fmt: skip
    out = run_train(cfg)
    reader = open_store(stores["train"])
    held = set(holdout_samples(reader.layout.n_samples, 0.25).tolist())
    loaders = make_loaders(cfg, reader, open_store(stores["dev"]), 64, torch.device("cpu"))
    trained = {int(s) for e in range(4) for b in loaders.train.epoch(e) for s in b.samples}
    assert loaders.valid is not None
    assert not trained & held and trained | held == set(range(reader.layout.n_samples))
    assert {int(s) for b in loaders.valid.epoch(0) for s in b.samples} == held
    for name in ("read", "linear"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics == out[name] and metrics["eval"]["chosen_on"] == "valid"
        state = torch.load(tmp_path / name / "last.pt", weights_only=False)
        history = state["history"]
        valid_scores = [h["valid"]["score"] for h in history]
        chosen = int(np.argmax(valid_scores))  # the first of equals, as training keeps it
        assert metrics["eval"]["best_epoch"] == chosen + 1
        assert metrics["eval"]["best"] == history[chosen]["eval"]
        assert metrics["valid"]["best"] == history[chosen]["valid"]
        on_eval = int(np.argmax([h["eval"]["score"] for h in history]))
        assert metrics["eval"]["best_on_eval"] == history[on_eval]["eval"]
        header = (tmp_path / name / "history.csv").read_text().splitlines()[0]
        assert "valid_score" in header.split(",")


def test_resuming_with_another_valid_fraction_is_refused(stores, tmp_path):
    cfg = TrainConfig(train=stores["train"], eval=stores["dev"], specs=["linear"], epochs=1,
                      out=str(tmp_path), progress=False, valid_fraction=0.2)  # fmt: skip
    run_train(cfg)
    cfg.epochs, cfg.valid_fraction = 2, 0.0
    with pytest.raises(ConfigError, match=r"--valid-fraction 0\.2"):
        run_train(cfg)


def test_online_training_holds_out_the_same_samples_as_cached(stores, tmp_path):
    """Online READ fed stage two's batch order over the same training samples gives stage two's
    validation and eval scores every epoch, to float round-off."""
    spec, frac = "read:hidden=16", 0.25
    cached = TrainConfig(train=stores["train"], eval=stores["dev"], specs=[spec], epochs=2,
                         out=str(tmp_path / "c"), batch_size=16, seed=3, progress=False,
                         valid_fraction=frac)  # fmt: skip
    run_train(cached)
    reader = open_store(stores["train"])
    loaders = make_loaders(cached, reader, open_store(stores["dev"]), 64, torch.device("cpu"))
    fit = np.setdiff1d(np.arange(reader.layout.n_samples),
                       holdout_samples(reader.layout.n_samples, frac))  # fmt: skip
    online = run_online(OnlineConfig(
        backbone=stores["model"], data=stores["data"], spec=spec, epochs=2,
        out=str(tmp_path / "o"), batch_size=16, seed=3, device="cpu", progress=False,
        valid_fraction=frac,  # online numbers the training samples it keeps 0, 1, ...
        order=lambda e: (np.searchsorted(fit, b.samples.numpy()) for b in loaders.train.epoch(e)),
    ))  # fmt: skip
    ref = torch.load(tmp_path / "c" / "read" / "last.pt", weights_only=False)["history"]
    for a, b in zip(ref, online["history"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-6 * abs(a["train_loss"])
        for split in ("eval", "valid"):
            for key, value in b[split].items():
                assert abs(a[split][key] - value) <= 1e-6, (split, key, a[split][key], value)
    assert online["eval"]["chosen_on"] == "valid" and online["valid"]["fraction"] == frac

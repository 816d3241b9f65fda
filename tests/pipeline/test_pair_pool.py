"""``pool=pair``: each sentence of a pair pooled on its own from the rows' segments, which every
loader carries into the batch; trained, evaluated and predicted alike; refused without pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import metrics
from pipeline.data import load_data
from pipeline.evaluate import evaluate_run, store_outputs
from pipeline.loader import StoreLoader
from pipeline.predict import load_predictor, predict
from pipeline.resident import ResidentLoader
from pipeline.sidenets import SideBatch, StoreInfo, build, parse_spec
from pipeline.sidenets.base import pair_pool
from pipeline.sidenets.precision import padded
from pipeline.train import TrainConfig, run_train
from storage import StoreMismatchError, open_store
from tests.conftest import assert_evaluate_reproduces_training, sentences, small_cache

SPECS = {
    "linear": "linear:pool=pair",
    "mlp": "mlp:hidden=16,pool=pair",
    "read": "read:hidden=16,pool=pair",
    "read-bf16": "read:hidden=16,pool=pair,precision=bfloat16",
    "lst": "lst:r=2,pool=pair",
}


def write_glue_mrpc(root: Path, n_train: int = 60, n_dev: int = 20) -> Path:
    """A GLUE-layout MRPC folder: ``Quality, #1 ID, #2 ID, #1 String, #2 String``."""
    folder = root / "MRPC"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 3), ("dev", n_dev, 4)):
        first, second = sentences(n, seed), sentences(n, seed + 10)
        lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        for i, ((a, la), (b, lb)) in enumerate(zip(first, second, strict=True)):
            a, b = " ".join(a.split()[:10]), " ".join(b.split()[:10])
            lines.append(f"{int(la == lb)}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def stores(model_dir, glue_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    mrpc = write_glue_mrpc(root)
    bert = model_dir("bert")
    for split in ("train", "dev"):
        small_cache(bert, f"glue:{mrpc}", root / split, split=split)
    small_cache(bert, f"glue:{glue_dir}", root / "single")
    small_cache(bert, f"glue:{mrpc}", root / "first", positions="first")
    return root, mrpc


def _segments_of(reader, samples: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([reader.token_type_ids(int(s)) for s in samples]))


@pytest.mark.parametrize("shuffle", [True, False])
def test_segments_reach_the_batch_from_every_loader(stores, shuffle):
    reader = open_store(stores[0] / "train")
    streamed = StoreLoader(reader, 7, shuffle=shuffle, seed=2, ram_budget=0, pool_bytes=1 << 16)
    in_ram = StoreLoader(reader, 7, shuffle=shuffle, seed=2, pool_bytes=1 << 16)
    resident = ResidentLoader(streamed, torch.device("cpu"))
    seen = set()
    for epoch in (0, 1):
        for a, b, c in zip(streamed.epoch(epoch), in_ram.epoch(epoch), resident.epoch(epoch),
                           strict=True):  # fmt: skip
            assert a.segments is not None and b.segments is not None and c.segments is not None
            assert a.segments.dtype == b.segments.dtype == c.segments.dtype == torch.int8
            assert torch.equal(a.segments, b.segments) and torch.equal(a.segments, c.segments)
            assert torch.equal(a.segments, _segments_of(reader, a.samples))
            assert len(a.segments) == a.hidden.shape[0]
            seen.update(a.segments.tolist())
    assert seen == {0, 1}


@pytest.mark.parametrize("store", ["single", "first"])
def test_no_segments_without_pairs_of_tokens(stores, store):
    loader = StoreLoader(open_store(stores[0] / store), 8, shuffle=False)
    resident = ResidentLoader(loader, torch.device("cpu"))
    assert all(b.segments is None for b in loader.epoch(0))
    assert all(b.segments is None for b in resident.epoch(0))


def _random_batch(seed: int) -> SideBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 9, 3, 7, 4])
    segs = []
    for i, n in enumerate(lengths.tolist()):
        cut = {1: n, 3: 0}.get(i, int(torch.randint(1, n, (1,), generator=g)) if n > 1 else n)
        segs.append(torch.cat([torch.zeros(cut), torch.ones(n - cut)]).to(torch.int8))
    r = int(lengths.sum())
    hidden = torch.randn(r, 2, 6, generator=g)
    return SideBatch(hidden, lengths, torch.zeros(6, dtype=torch.long), torch.arange(6),
                     longest=9, segments=torch.cat(segs))  # fmt: skip


def _slow_pair_pool(batch: SideBatch, rows: torch.Tensor) -> torch.Tensor:
    assert batch.segments is not None
    out = []
    for start, n in zip(batch.starts.tolist(), batch.lengths.tolist(), strict=True):
        pooled = []
        for seg in (0, 1):
            total, count = torch.zeros(rows.shape[1:]), 0
            for r in range(start, start + n):
                if int(batch.segments[r]) == seg:
                    total, count = total + rows[r], count + 1
            pooled.append(total / max(count, 1))
        u, v = pooled
        cos = torch.nn.functional.cosine_similarity(u[None], v[None], dim=-1)
        out.append(torch.cat([u, v, (u - v).abs(), u * v, cos]))
    return torch.stack(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_pool_equals_a_sample_by_sample_reference(seed):
    batch = _random_batch(seed)
    rows = batch.hidden[:, 1]
    got = pair_pool(batch, rows)
    assert got.shape == (6, 4 * 6 + 1)
    assert torch.equal(got, _slow_pair_pool(batch, rows))
    assert torch.equal(got[1, 6:12], torch.zeros(6)) and torch.equal(got[3, :6], torch.zeros(6))
    assert torch.equal(batch.packed(batch.padded(rows)[0]), rows)  # LST's way back to rows


def test_pair_pool_keeps_segments_through_splits_and_padding():
    batch = _random_batch(0)
    whole = pair_pool(batch, batch.hidden[:, 0])
    parts = [pair_pool(b, b.hidden[:, 0]) for b in batch.split(10)]
    assert len(parts) > 1 and torch.equal(torch.cat(parts), whole)
    bucketed = padded(batch)
    assert bucketed.segments is not None and len(bucketed.segments) == bucketed.hidden.shape[0]
    assert torch.equal(pair_pool(bucketed, bucketed.hidden[:, 0])[:6], whole)
    assert batch.to(torch.device("cpu")).segments is not None


@pytest.fixture(scope="module")
def trained(stores):
    root, _ = stores
    specs = [f"{spec},name={name}" for name, spec in SPECS.items()]
    cfg = TrainConfig(train=str(root / "train"), eval=str(root / "dev"), specs=specs, epochs=2,
                      out=str(root / "out"), batch_size=8, progress=False)  # fmt: skip
    run_train(cfg)
    return root


@pytest.mark.parametrize("name", list(SPECS))
def test_pair_networks_train_and_evaluate_reproduces_training(trained, name):
    assert_evaluate_reproduces_training(trained / "out" / name, trained / "dev")


@pytest.mark.parametrize("name", list(SPECS))
def test_predict_reproduces_training_for_pairs(trained, stores, name):
    _, mrpc = stores
    run = trained / "out" / name
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    reader = open_store(trained / "dev")
    model = build(parse_spec(state["spec"]), StoreInfo.from_meta(reader.meta))
    model.load_state_dict(state["state_dict"])
    model.eval()
    loader = StoreLoader(reader, state["eval_batch_size"], shuffle=False)
    want = store_outputs(model, loader, torch.device("cpu"))[0]
    loaded = load_predictor(run, "cpu")
    data = load_data(f"glue:{mrpc}", "dev")
    outputs = predict(loaded, data)
    assert np.array_equal(outputs, want)
    recorded = json.loads((run / "metrics.json").read_text())["eval"]["best"]
    assert metrics.compute(loaded.predictor.info.task, outputs, data.labels) == recorded


def test_pair_pool_refused_on_a_single_sentence_store(stores, tmp_path):
    root, _ = stores
    cfg = TrainConfig(train=str(root / "single"), eval=str(root / "single"),
                      specs=["linear:pool=pair"], epochs=1, out=str(tmp_path / "out"),
                      batch_size=8, progress=False)  # fmt: skip
    with pytest.raises(StoreMismatchError, match="pool=pair"):
        run_train(cfg)


def test_pair_pool_refused_on_a_single_position_store(stores):
    info = StoreInfo.from_meta(open_store(stores[0] / "first").meta)
    for spec in ("linear:pool=pair", "read:pool=pair"):
        with pytest.raises(StoreMismatchError, match="--positions all"):
            build(parse_spec(spec), info)


def test_pair_stores_pool_pairs_by_default(stores):
    root, _ = stores
    pair = StoreInfo.from_meta(open_store(root / "train").meta)
    assert pair.pairs and pair.default_pool == "pair"
    for name in ("single", "first"):  # single sentences; pairs without every token stored
        info = StoreInfo.from_meta(open_store(root / name).meta)
        assert not info.pairs and info.default_pool == info.pooling
    for spec in ("linear", "mlp:hidden=8", "read:hidden=8", "lst:r=2"):
        assert build(parse_spec(spec), pair).pool == "pair"
        assert build(parse_spec(f"{spec.split(':')[0]}:pool=mean"), pair).pool == "mean"


def test_a_run_recorded_before_pair_defaults_is_rebuilt_as_it_trained(trained, tmp_path):
    """A checkpoint whose store info has no ``pairs`` (written when a pair store's default
    pooling was the backbone's) evaluates with that pooling, not with ``pair``."""
    root = trained
    cfg = TrainConfig(train=str(root / "train"), eval=str(root / "dev"),
                      specs=["linear:pool=first,name=old"], epochs=1, out=str(tmp_path),
                      batch_size=8, progress=False)  # fmt: skip
    recorded = run_train(cfg)["old"]["eval"]["best"]
    state = torch.load(tmp_path / "old" / "best.pt", weights_only=False)
    state["spec"] = "linear:name=old"  # the default pool of its time: the backbone's (first)
    del state["store_info"]["pairs"]
    torch.save(state, tmp_path / "old" / "best.pt")
    assert evaluate_run(tmp_path / "old", str(root / "dev")) == recorded

"""``--pairs separate``: each sentence of a pair through the backbone alone, both stored (A's rows
then B's, segments in ``token_type_ids``); verified, resumed, sharded, trained with ``pool=pair``
and predicted exactly as the joint path is."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import pipeline.cache as cache_mod
from pipeline.backbone import load_backbone
from pipeline.cache import CacheConfig, run_cache
from pipeline.cluster_cache import ClusterOptions, run_cache_on_cluster
from pipeline.data import TextData, load_data
from pipeline.errors import ConfigError, StoreCorruptError, VerifyError
from pipeline.extract import encode
from pipeline.loader import StoreLoader, row_segments
from pipeline.pairs import PairsError, join_rows, piece_offsets
from pipeline.predict import load_predictor, predict
from pipeline.train import TrainConfig, run_train
from pipeline.verify import run_verify, stored_tokens
from stages.cli import main as cli_main
from storage import StoreSchemaError, open_store
from tests.conftest import assert_evaluate_reproduces_training, best_outputs, small_cache
from tests.pipeline.test_cache import assert_same_store, fail_at_batch
from tests.pipeline.test_pair_pool import write_glue_mrpc

SEP = {"pairs": "separate"}
SPECS = {
    "linear": "linear:pool=pair",
    "mlp": "mlp:hidden=16,pool=pair",
    "read": "read:hidden=16,pool=pair",
    "lst": "lst:r=2,pool=pair",
}


@pytest.fixture(scope="module")
def stores(model_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pairs-separate")
    mrpc = write_glue_mrpc(root)
    for split in ("train", "dev"):
        small_cache(model_dir("bert"), f"glue:{mrpc}", root / split, split=split, **SEP)
    small_cache(model_dir("gpt2"), f"glue:{mrpc}", root / "gpt2", **SEP)
    small_cache(model_dir("bert"), f"glue:{mrpc}", root / "joint")
    return root, mrpc


def alone(bb: Any, text: str, max_length: int) -> tuple[list[int], list[np.ndarray]]:
    """One sentence through the backbone as a sequence of its own, in a batch of one, with
    transformers' own ``output_hidden_states``: its token ids and bfloat16 rows per layer."""
    ids = bb.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    kwargs: dict[str, Any] = {"input_ids": torch.tensor([ids])}
    if bb.takes_token_type_ids:
        kwargs["token_type_ids"] = torch.zeros(1, len(ids), dtype=torch.int64)
    with torch.inference_mode():
        states = bb.model(**kwargs, output_hidden_states=True).hidden_states
    return ids, [encode(h[0].float(), "bfloat16")[0] for h in states]


@pytest.mark.parametrize(("kind", "store"), [("bert", "train"), ("gpt2", "gpt2")])
def test_a_sample_is_its_first_sentence_alone_then_its_second(stores, model_dir, kind, store):
    root, mrpc = stores
    reader = open_store(root / store)
    bb = load_backbone(model_dir(kind), "cpu")
    data = load_data(f"glue:{mrpc}", "train")
    assert data.pairs is not None and reader.identity["extraction"]["pairs"] == "separate"
    assert reader.layout.has_token_type_ids and reader.layout.positions == "all"
    max_length = int(reader.identity["tokenizer"]["max_length"])
    for i in range(reader.layout.n_samples):
        ids_a, rows_a = alone(bb, data.texts[i], max_length)
        ids_b, rows_b = alone(bb, data.pairs[i], max_length)
        a, b = int(reader.offsets[i]), int(reader.offsets[i + 1])
        assert reader.token_ids(i).tolist() == ids_a + ids_b
        assert reader.token_type_ids(i).tolist() == [0] * len(ids_a) + [1] * len(ids_b)
        # pre-LN GPT-2: transformers' last hidden state is after the final norm, the store's
        # the block output (as in test_cache), so compare the layers before it
        for layer in reader.layout.layers[: None if kind == "bert" else -1]:
            want = np.concatenate([rows_a[layer], rows_b[layer]])
            assert np.array_equal(reader.raw_rows(layer, a, b), want), (i, layer)


@pytest.mark.parametrize("store", ["train", "gpt2"])
def test_row_segments_are_the_stored_sentences(stores, store):
    reader = open_store(stores[0] / store)
    segments = row_segments(reader)
    assert segments is not None and segments.dtype == np.int8
    assert np.array_equal(segments, reader.all_tokens()[1])
    assert set(segments.tolist()) == {0, 1}
    loader = StoreLoader(reader, 8, shuffle=True, seed=1)
    for batch in loader.epoch(0):
        assert batch.segments is not None and len(batch.segments) == batch.hidden.shape[0]


def test_joint_stores_record_no_pairs_key(stores):
    ex = open_store(stores[0] / "joint").identity["extraction"]
    assert "pairs" not in ex


@pytest.mark.parametrize("store", ["train", "gpt2"])
def test_verify_recomputes_a_separate_store_bit_for_bit(stores, store):
    path = stores[0] / store
    report = run_verify(str(path), samples=open_store(path).layout.n_samples, device="cpu")
    assert report["exact"] and report["mismatches"] == []


def test_verify_fails_after_tampering(stores, tmp_path):
    import zarr

    store = tmp_path / "tampered"
    shutil.copytree(stores[0] / "train", store)
    reader = open_store(store)
    pieces = piece_offsets(stored_tokens(reader))
    second = int(pieces[2 * 5 + 1])  # sample 5's second sentence, first row
    hidden = zarr.open_array(str(store / "hidden" / "2"), mode="r+")
    row = np.asarray(hidden[second])
    hidden[second] = row ^ np.uint16(1)  # one bit of every value: checksums stay valid
    with pytest.raises(VerifyError, match=r"sample 5 \(second sentence\) layer 2"):
        run_verify(str(store), samples=reader.layout.n_samples, device="cpu")
    shard = next((store / "hidden" / "1" / "c").rglob("*"))
    while shard.is_dir():
        shard = next(shard.iterdir())
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="hidden/1"):
        run_verify(str(store), samples=0)


def test_damaged_segment_ids_are_refused():
    from pipeline.tokens import Tokenized

    ids = np.arange(6, dtype=np.int32)
    offsets = np.array([0, 6])
    good = Tokenized(ids, np.array([0, 0, 1, 1, 1, 1], np.int8), offsets)
    assert piece_offsets(good).tolist() == [0, 2, 6]
    for bad in ([0, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]):
        with pytest.raises(StoreSchemaError, match="segment ids"):
            piece_offsets(Tokenized(ids, np.array(bad, np.int8), offsets))


@pytest.fixture(scope="module")
def trained(stores) -> Path:
    root, _ = stores
    specs = [f"{spec},name={name}" for name, spec in SPECS.items()]
    cfg = TrainConfig(train=str(root / "train"), eval=str(root / "dev"), specs=specs, epochs=2,
                      out=str(root / "out"), batch_size=8, progress=False)  # fmt: skip
    run_train(cfg)
    return root


@pytest.mark.parametrize("name", list(SPECS))
def test_pool_pair_trains_and_evaluate_reproduces_training(trained, name):
    assert_evaluate_reproduces_training(trained / "out" / name, trained / "dev")


@pytest.mark.parametrize("name", list(SPECS))
def test_predict_encodes_new_pairs_as_the_store_did(trained, stores, name):
    _, mrpc = stores
    run = trained / "out" / name
    loaded = load_predictor(run, "cpu")
    assert loaded.pairs == "separate"
    outputs = predict(loaded, load_data(f"glue:{mrpc}", "dev"))
    assert np.array_equal(outputs, best_outputs(run, trained / "dev"))


def test_the_predictor_module_takes_the_sentences_as_rows(trained, stores):
    _, mrpc = stores
    loaded = load_predictor(trained / "out" / "mlp", "cpu")
    data = load_data(f"glue:{mrpc}", "dev")
    tok = loaded.predictor.bb.tokenizer
    texts = [t for pair in zip(data.texts[:4], data.pairs[:4], strict=True) for t in pair]
    enc = tok(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = loaded.predictor(enc["input_ids"], enc["attention_mask"]).float().numpy()
    want = predict(loaded, _first(data, 4))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)  # other batches: not bit-exact
    with pytest.raises(ConfigError, match="odd number"):
        join_rows([np.zeros((2, 1))] * 3)


def _first(data: TextData, n: int) -> TextData:
    assert data.pairs is not None
    return TextData(data.spec, data.split, data.texts[:n], data.pairs[:n], data.labels[:n],
                    data.task)  # fmt: skip


def test_predict_refuses_single_texts_for_a_separate_run(trained):
    loaded = load_predictor(trained / "out" / "linear", "cpu")
    single = TextData("text", "predict", ["a fine film"], None, np.zeros(1, np.int64),
                      loaded.predictor.info.task)  # fmt: skip
    with pytest.raises(ConfigError, match="--pairs separate"):
        predict(loaded, single)


def test_resume_after_an_exception_gives_the_same_store(stores, model_dir, tmp_path,
                                                       monkeypatch):  # fmt: skip
    _, mrpc = stores
    model, data = model_dir("bert"), f"glue:{mrpc}"
    small = {"token_budget": 64, "window_mb": 0.05, **SEP}
    small_cache(model, data, tmp_path / "ref", **small)
    # the first shard is whole before batch 12 and the second before batch 22: failing at 16
    # leaves room for the streams' threads to start batches a little out of order
    real = fail_at_batch(monkeypatch, 16)
    with pytest.raises(RuntimeError, match="injected"):
        small_cache(model, data, tmp_path / "cut", **small)
    partial = open_store(tmp_path / "cut", allow_incomplete=True)
    done = np.isfinite(np.asarray(partial.group["progress"][...])).all(axis=(1, 2))
    assert not partial.complete and 0 < done.sum() < len(done), done
    monkeypatch.setattr(cache_mod, "extract_rows", real)
    small_cache(model, data, tmp_path / "cut", **small)
    assert_same_store(tmp_path / "ref", tmp_path / "cut")
    assert_same_segments(tmp_path / "ref", tmp_path / "cut")


def assert_same_segments(a: Path, b: Path) -> None:
    assert np.array_equal(open_store(a).all_tokens()[1], open_store(b).all_tokens()[1])


def test_shard_workers_and_a_dask_cluster_write_the_same_store(stores, model_dir, tmp_path):
    _, mrpc = stores
    model, data = model_dir("bert"), f"glue:{mrpc}"
    # one shard per window: the workers split the plan by windows, which cut between the two
    # sentences of some samples
    small = {"token_budget": 64, "window_mb": 0.05, **SEP}
    small_cache(model, data, tmp_path / "ref", **small)
    assert open_store(tmp_path / "ref").layout.n_shards >= 3
    for i in range(3):
        small_cache(model, data, tmp_path / "workers", shard=f"{i}/3", **small)
    assert_same_store(tmp_path / "ref", tmp_path / "workers")
    cfg = CacheConfig(backbone=model, data=data, split="train", out=str(tmp_path / "dask"),
                      device="cpu", chunk_mb=256 * 64 / (1 << 20), shard_chunks=2,
                      progress=False, **small)  # fmt: skip
    run_cache_on_cluster(cfg, ClusterOptions("local", 2, workers=1))
    assert_same_store(tmp_path / "ref", tmp_path / "dask")
    assert_same_segments(tmp_path / "ref", tmp_path / "dask")


def test_single_texts_are_refused(model_dir, glue_dir, tmp_path):
    with pytest.raises(PairsError, match="one text per sample"):
        small_cache(model_dir("bert"), f"glue:{glue_dir}", tmp_path / "s", **SEP)
    assert not (tmp_path / "s").exists()
    assert issubclass(PairsError, ConfigError) and issubclass(PairsError, ValueError)


@pytest.mark.parametrize("positions", ["first", "last", "mean"])
def test_single_positions_are_refused(stores, tmp_path, positions):
    cfg = CacheConfig(backbone="unused", data=f"glue:{stores[1]}", split="train",
                      out=str(tmp_path / "s"), positions=positions, **SEP)  # fmt: skip
    with pytest.raises(PairsError, match="--positions all"):
        run_cache(cfg)


def test_the_cli_exits_2_on_refused_pairs(model_dir, glue_dir, stores, tmp_path):
    base = ["cache", "--backbone", model_dir("bert"), "--device", "cpu", "--no-progress",
            "--pairs", "separate"]  # fmt: skip
    single = [*base, "--data", f"glue:{glue_dir}", "--out", str(tmp_path / "a")]
    assert cli_main(single) == 2
    first = [*base, "--data", f"glue:{stores[1]}", "--out", str(tmp_path / "b"),
             "--positions", "first"]  # fmt: skip
    assert cli_main(first) == 2
    with pytest.raises(SystemExit):
        cli_main([*base[:-1], "sideways", "--data", "bbc", "--out", str(tmp_path / "c")])


def test_auto_separates_pairs_for_a_sentence_encoder_only():
    from pipeline.data import TextData
    from pipeline.pairs import resolve

    task = {"name": "t", "type": "classification", "num_labels": 2}
    pairs = TextData("x", "train", ["a b"], ["c d"], np.zeros(1, np.int64), task)
    single = TextData("x", "train", ["a b"], None, np.zeros(1, np.int64), task)
    assert resolve("auto", pairs, "mean", "all") == "separate"  # MiniLM-like
    assert resolve("auto", pairs, "first", "all") == "joint"  # a cross-encoder (BERT)
    assert resolve("auto", pairs, "mean", "first") == "joint"  # one position stored
    assert resolve("auto", single, "mean", "all") == "joint"
    for given in ("joint", "separate"):
        assert resolve(given, pairs, "first", "all") == given

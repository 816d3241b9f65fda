"""Gather, finiteness and stats on the device side of stage one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import NonFiniteError
from pipeline.extract import DeviceBatch, check_finite, gather, in_streams, row_stats


def batch_of(lengths: list[int]) -> DeviceBatch:
    t = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (t - n) for n in lengths])
    return DeviceBatch(np.array([10, 11, 12]), mask * 5, mask, None, torch.tensor(lengths))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_name_the_layer_and_sample(bad):
    batch = batch_of([3, 1, 2])
    h = torch.randn(3, 3, 4)
    h[2, 1, 0] = bad  # sample 12, its second token
    rows = gather(h, batch, "all")
    with pytest.raises(NonFiniteError, match="layer 4 for sample 12"):
        check_finite(row_stats(rows), 4, batch, "all")
    h[2, 1, 0] = 0.0
    check_finite(row_stats(gather(h, batch, "all")), 4, batch, "all")


def test_gather_positions():
    batch = batch_of([3, 1, 2])
    h = torch.arange(3 * 3 * 2, dtype=torch.float32).view(3, 3, 2)
    assert gather(h, batch, "all").shape == (6, 2)
    assert torch.equal(gather(h, batch, "first"), h[:, 0])
    assert torch.equal(gather(h, batch, "last"), torch.stack([h[0, 2], h[1, 0], h[2, 1]]))
    assert torch.allclose(gather(h, batch, "mean")[0], h[0].mean(0))


def test_a_checkpoint_without_pooler_loads_the_same_every_time(tmp_path, caplog):
    """Weights missing from a checkpoint are initialised at random by transformers; stage one
    seeds that, so two loads (e.g. the train and the dev split) have one weights hash."""
    from transformers import BertConfig, BertModel

    from pipeline.backbone import load_backbone
    from tests.conftest import VOCAB, _save

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64)  # fmt: skip
    folder = _save(BertModel(cfg, add_pooling_layer=False), tmp_path / "no-pooler")
    before = torch.get_rng_state()
    with caplog.at_level("WARNING"):
        first = load_backbone(folder, "cpu").identity["weights_hash"]
    assert "pooler" in caplog.text and "initialised at random" in caplog.text
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is untouched
    assert load_backbone(folder, "cpu").identity["weights_hash"] == first


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_samples_rows_do_not_depend_on_its_place_in_the_batch(kind, model_dir):
    """Stage one runs each batch's samples in store order (the writer then hands each shard a
    slice of the batch); the rows must be the same, bit for bit, in any order."""
    from pipeline.backbone import load_backbone
    from pipeline.extract import extract_rows, make_batch
    from pipeline.tokens import Tokenized

    bb = load_backbone(model_dir(kind), "cpu")
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 12, size=9)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(5, 90, size=int(offsets[-1])).astype(np.int32)
    types = np.zeros_like(ids, dtype=np.int8) if bb.takes_token_type_ids else None
    tok = Tokenized(ids=ids, type_ids=types, offsets=offsets)
    layers = list(range(bb.n_layers))

    def per_sample(samples: np.ndarray) -> dict[int, list[np.ndarray]]:
        rows = extract_rows(bb, make_batch(tok, samples, bb.device), layers, "all", "float32")
        ends = np.cumsum(rows.rows_per_sample)
        return {
            int(s): [np.split(layer, ends[:-1])[i] for layer in rows.layers]
            for i, s in enumerate(rows.samples)
        }

    in_order = per_sample(np.arange(9))
    shuffled = per_sample(rng.permutation(9))
    for s in range(9):
        for a, b in zip(in_order[s], shuffled[s], strict=True):
            assert np.array_equal(a, b), f"{kind} sample {s}"


@pytest.mark.parametrize("ahead", [1, 3])
def test_streams_take_ahead_items_beyond_those_running_and_keep_the_order(ahead):
    """With 2 streams, ``streams + ahead`` items are handed to the streams before the first
    result comes back (work to go on with while the consumer is held up), never more, and
    the results come in the items' order."""
    taken: list[int] = []

    def items():
        for i in range(20):
            taken.append(i)
            yield i

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = in_streams(lambda x: x * x, items(), 2, ahead)
        first = next(results)
        assert first == 0 and len(taken) == 2 + ahead
        rest = list(results)
    finally:
        torch.set_num_threads(before)
    assert [first, *rest] == [i * i for i in range(20)]


def test_launched_rows_equal_extracted_rows(model_dir, glue_dir):
    """The pipelined path stage one takes on CUDA gives the rows, scales and statistics of the
    plain one (here on the CPU, where it waits for nothing)."""
    from pipeline.backbone import load_backbone
    from pipeline.data import load_data
    from pipeline.extract import extract_rows, in_flight, launch_rows, make_batch
    from pipeline.tokens import tokenize

    bb = load_backbone(model_dir("bert"), "cpu")
    data = load_data(f"glue:{glue_dir}", "train")
    tok = tokenize(bb.tokenizer, data, 64, bb.takes_token_type_ids)
    batches = [np.arange(0, 5), np.arange(5, 12), np.array([13])]
    for positions, dtype in (("all", "bfloat16"), ("mean", "int8"), ("first", "float16")):
        args = ([0, 1, 2], positions, dtype)
        want = [extract_rows(bb, make_batch(tok, b, bb.device), *args) for b in batches]
        got = list(in_flight(lambda b, a=args: launch_rows(bb, make_batch(tok, b, bb.device), *a),
                             batches, depth=2))  # fmt: skip
        for g, w in zip(got, want, strict=True):
            assert np.array_equal(g.samples, w.samples)
            assert np.array_equal(g.rows_per_sample, w.rows_per_sample)
            assert np.array_equal(g.stats, w.stats)
            for a, b in zip(g.layers, w.layers, strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b)
            assert (g.scales is None) == (w.scales is None)
            for a, b in zip(g.scales or [], w.scales or [], strict=True):
                assert np.array_equal(a, b)


@pytest.mark.parametrize("with_types", [False, True])
def test_make_batch_pads_each_sample_as_a_per_sample_copy_would(with_types):
    from pipeline.extract import make_batch
    from pipeline.tokens import Tokenized

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=200)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    types = rng.integers(0, 2, size=offsets[-1]).astype(np.int8) if with_types else None
    tok = Tokenized(rng.integers(1, 999, size=offsets[-1]).astype(np.int32), types, offsets)
    for samples in (np.array([3]), np.sort(rng.choice(200, 37, replace=False)), np.arange(200)):
        batch = make_batch(tok, samples, torch.device("cpu"))
        width = int(lengths[samples].max())
        for row, s in enumerate(samples):
            seq, seg = tok.sample(int(s))
            n = len(seq)
            assert np.array_equal(batch.input_ids[row].numpy(), np.pad(seq, (0, width - n)))
            assert batch.attention_mask[row].tolist() == [1] * n + [0] * (width - n)
            if seg is not None:
                assert batch.token_type_ids is not None
                assert np.array_equal(
                    batch.token_type_ids[row].numpy(), np.pad(seg, (0, width - n))
                )
        assert (batch.token_type_ids is None) == (not with_types)

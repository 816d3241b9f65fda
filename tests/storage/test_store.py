"""The store on its own: codecs, out-of-order writes, resume bookkeeping, checks on open."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.extract import encode
from storage import (
    BatchRows,
    ConfigError,
    Layout,
    StoreCorruptError,
    StoreMismatchError,
    create_store,
    open_store,
    parse_codec,
    parse_dtype,
)
from storage import writer as writer_mod
from storage.codecs import decode_rows, encode_rows
from storage.shardfile import ShardFile

DTYPES = ["float32", "float16", "bfloat16", "int8"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_reference_encoder_matches_the_torch_encoder(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, 48)) * rng.uniform(0.01, 50, size=(300, 1))).astype(np.float32)
    x[3] = 0.0  # an all-zero row (int8 scale 0)
    ref, ref_scale = encode_rows(x, dtype)
    got, got_scale = encode(torch.from_numpy(x), dtype)
    assert np.array_equal(ref, got)
    if dtype == "int8":
        assert np.array_equal(ref_scale, got_scale)
    back = decode_rows(got, dtype, got_scale)
    tol = {"float32": 0, "float16": 1e-3, "bfloat16": 8e-3, "int8": 8e-3}[dtype]
    assert np.all(np.abs(back - x) <= tol * np.abs(x).max(axis=1, keepdims=True) + 1e-12)


def test_parsers_name_the_bad_value():
    assert parse_dtype("bf16") == "bfloat16"
    assert parse_codec("zstd:7").level == 7
    with pytest.raises(ConfigError, match="float8"):
        parse_dtype("float8")
    with pytest.raises(ConfigError, match=r"0\.\.22"):
        parse_codec("zstd:99")
    with pytest.raises(ConfigError, match="multiple of chunk_rows"):
        Layout(1, 1, 1, [0], 4, "all", "float32", chunk_rows=3, shard_rows=4)


def make_store(tmp_path: Path, dtype: str = "bfloat16", seed: int = 0, n: int = 60, **writer: Any):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rows = int(offsets[-1])
    layers, d = [0, 2], 16
    values = {layer: rng.standard_normal((rows, d)).astype(np.float32) for layer in layers}
    layout = Layout(n, rows, rows, layers, d, "all", dtype, chunk_rows=32, shard_rows=128)
    arrays = {
        "offsets": offsets,
        "token_offsets": offsets,
        "token_ids": np.arange(rows, dtype=np.int32),
        "labels": rng.integers(0, 2, size=n),
    }
    path = str(tmp_path / f"store-{dtype}-{seed}")
    made = create_store(
        path, layout, {"backbone": {"name": "t"}}, {"type": "classification"}, arrays, **writer
    )
    assert made is not None
    return path, made, values, lengths, offsets


def batch_of(samples, values, lengths, offsets, dtype) -> BatchRows:
    parts = {
        k: np.concatenate([v[offsets[s] : offsets[s + 1]] for s in samples])
        for k, v in values.items()
    }
    enc = [encode_rows(parts[k], dtype) for k in sorted(parts)]
    stats = np.stack(
        [
            np.stack([p.sum(1), (p * p).sum(1), p.min(1), p.max(1)], 1)
            for _, p in sorted(parts.items())
        ],
        axis=1,
    )
    return BatchRows(
        np.asarray(samples),
        lengths[samples],
        [e[0] for e in enc],
        [e[1] for e in enc] if dtype == "int8" else None,  # type: ignore[misc]
        stats,
    )


@pytest.mark.parametrize("sort", [False, True], ids=["shuffled", "store-order"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_written_in_any_order_read_back_in_dataset_order(tmp_path, dtype, sort):
    """Batches of random samples, their samples shuffled or in store order (as stage one sends
    them: each shard then gets a slice of the batch) give the same store."""
    path, writer, values, lengths, offsets = make_store(tmp_path, dtype)
    order = np.random.default_rng(1).permutation(len(lengths))
    for samples in np.array_split(order, 9):
        samples = np.sort(samples) if sort else samples
        writer.put(batch_of(samples, values, lengths, offsets, dtype))
    meta = writer.close()
    assert meta["complete"]
    reader = open_store(path)
    for layer, want in values.items():
        stored, scale = encode_rows(want, dtype)
        assert np.array_equal(reader.raw_rows(layer, 0, len(want)), stored)
        assert np.array_equal(reader.rows(layer, 0, len(want)), decode_rows(stored, dtype, scale))
        stats = meta["stats"][str(layer)]
        assert stats["mean"] == pytest.approx(float(want.astype(np.float64).mean()), abs=1e-9)
        assert stats["max"] == pytest.approx(float(want.max()))
    s = reader.sample(5)
    assert s.shape == (lengths[5], 2, 16)


@pytest.mark.parametrize("cap", [None, 1])
def test_a_buffer_cap_reuses_written_shards_buffers(tmp_path, monkeypatch, cap):
    """With ``buffers`` set, a new shard waits for a written shard's buffer rather than taking
    fresh memory while writes are in flight (only the shorter last shard needs its own); the
    store is the same. Without the cap, slow writes make the writer allocate more."""
    made: list[int] = []
    real_init, real_write = writer_mod._Shard.__init__, ShardFile.write

    def counting(self: Any, rows: int, layout: Layout) -> None:
        made.append(rows)
        real_init(self, rows, layout)

    def slow(self: Any, *args: Any) -> None:
        time.sleep(0.02)
        real_write(self, *args)

    monkeypatch.setattr(writer_mod._Shard, "__init__", counting)
    monkeypatch.setattr(ShardFile, "write", slow)
    path, writer, values, lengths, offsets = make_store(tmp_path, buffers=cap)
    assert writer.layout.n_shards >= 5
    for samples in np.array_split(np.arange(len(lengths)), 40):  # in order: shard after shard
        writer.put(batch_of(samples, values, lengths, offsets, "bfloat16"))
    assert writer.close()["complete"]
    full = writer.layout.shard_rows
    if cap is None:
        assert made.count(full) > 1
    else:
        assert made.count(full) == 1 and len(made) <= 2
    reader = open_store(path)
    for layer, want in values.items():
        stored, _ = encode_rows(want, "bfloat16")
        assert np.array_equal(reader.raw_rows(layer, 0, len(want)), stored)


@pytest.mark.parametrize("shape", [(4096, 384), (7,), (0, 384), (3, 2, 4)])
def test_shard_buffers_are_plain_writable_arrays(shape):
    """small_pages hands back an ordinary C-contiguous, writable array of the asked shape and
    dtype (on its own mapping), which keeps its values and can be written through numpy."""
    for dtype in ("uint16", "float32", "int8"):
        buf = writer_mod.small_pages(shape, dtype)
        assert buf.shape == shape and buf.dtype == np.dtype(dtype)
        assert buf.flags.c_contiguous and buf.flags.writeable
        values = np.arange(buf.size).reshape(shape).astype(dtype)
        buf[...] = values
        assert np.array_equal(buf, values)


def test_a_resumed_writer_only_needs_the_missing_shards(tmp_path):
    path, writer, values, lengths, offsets = make_store(tmp_path)
    # first half of the samples, in order, then stop
    half = np.arange(len(lengths) // 2)
    writer.put(batch_of(half, values, lengths, offsets, "bfloat16"))
    writer.abort()
    again = create_store(
        path, writer.layout, {"backbone": {"name": "t"}}, {"type": "classification"}, {}
    )
    assert again is not None and 0 < again.done.sum() < writer.layout.n_shards
    needed = again.needed_samples()
    assert not needed[0] and needed[-1]
    again.put(batch_of(np.flatnonzero(needed), values, lengths, offsets, "bfloat16"))
    again.close()
    reader = open_store(path)
    assert np.array_equal(
        reader.raw_rows(2, 0, reader.layout.n_rows), encode_rows(values[2], "bfloat16")[0]
    )


def test_open_checks_expectations_and_layers(tmp_path):
    path, writer, values, lengths, offsets = make_store(tmp_path)
    writer.put(batch_of(np.arange(len(lengths)), values, lengths, offsets, "bfloat16"))
    writer.close()
    open_store(path, expect={"layout.hidden_size": 16, "identity.backbone.name": "t"}, layers=[2])
    with pytest.raises(StoreMismatchError, match=r"layout\.hidden_size is 16 but 384"):
        open_store(path, expect={"layout.hidden_size": 384})
    with pytest.raises(StoreMismatchError, match=r"layers \[1\] are needed"):
        open_store(path, layers=[1])


def test_a_flipped_byte_in_a_chunk_is_caught_on_read(tmp_path):
    path, writer, values, lengths, offsets = make_store(tmp_path)
    writer.put(batch_of(np.arange(len(lengths)), values, lengths, offsets, "bfloat16"))
    writer.close()
    shard = Path(path) / "hidden" / "0" / "c" / "0" / "0"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 3] ^= 0x5A
    shard.write_bytes(bytes(blob))
    reader = open_store(path)
    with pytest.raises(StoreCorruptError, match="hidden/0"):
        reader.rows(0, 0, 100)


def test_a_sample_handed_over_twice_is_refused(tmp_path):
    _, writer, values, lengths, offsets = make_store(tmp_path)
    writer.put(batch_of(np.array([3, 1]), values, lengths, offsets, "bfloat16"))
    with pytest.raises(ValueError, match="came twice"):
        writer.put(batch_of(np.array([1]), values, lengths, offsets, "bfloat16"))
    writer.abort()

"""The streaming loader's memory: one byte budget for every stored row it keeps, never exceeded.

Stores are real (stage one over a config-built tiny BERT, 256-row chunks, ~20 blocks); budgets
are a few blocks, so an epoch is many rounds and the edge cache has to give way to them.
"""

from __future__ import annotations

import shutil
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.budget import ByteBudget, Stopped
from pipeline.loader import StoreLoader
from storage import StoreCorruptError, StoreReader, open_store
from tests.conftest import small_cache, write_glue_sst2

BATCH = 7


@pytest.fixture(scope="module")
def stores(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loader-memory")
    glue = write_glue_sst2(root / "glue", n_train=400, n_dev=8)
    out = {}
    for name, over in {  # 256-row chunks: 32-wide rows of 2, 1 and 4 bytes per value
        "bfloat16": {},
        "int8": {"dtype": "int8", "chunk_mb": 256 * 32 / (1 << 20)},
        "first": {"positions": "first", "dtype": "float32", "chunk_mb": 256 * 128 / (1 << 20)},
    }.items():
        out[name] = root / name
        small_cache(model_dir("bert"), f"glue:{glue}", out[name], **over)
    big = write_glue_sst2(root / "glue-big", n_train=1500, n_dev=8)  # 1024-row chunks
    out["big"] = root / "big"
    small_cache(model_dir("bert"), f"glue:{big}", out["big"], chunk_mb=1024 * 64 / (1 << 20))
    return out


def block_bytes(reader: StoreReader) -> int:
    """Stored bytes of a chunk's rows: the nominal size of a block."""
    return reader.layout.chunk_rows * StoreLoader(reader, 1, shuffle=False, ram_budget=0).row_bytes


def same_batches(a: StoreLoader, b: StoreLoader, epoch: int) -> int:
    n = 0
    for x, y in zip(a.epoch(epoch), b.epoch(epoch), strict=True):
        assert torch.equal(x.samples, y.samples) and torch.equal(x.hidden, y.hidden)
        assert torch.equal(x.lengths, y.lengths) and torch.equal(x.labels, y.labels)
        n += 1
    return n


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "first"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_streaming_stays_within_its_budget_and_serves_the_ram_batches(stores, kind, shuffle):
    """Also the single-position store, whose blocks are far smaller than a chunk (the loader
    before the budget kept a whole chunk's rest as one block's edge there: wrong rows)."""
    reader = open_store(stores[kind])
    pool = 4 * block_bytes(reader) + 1  # rounds of 2 blocks; 2 rounds + leftovers fit
    ram = StoreLoader(reader, BATCH, shuffle=shuffle, seed=3, pool_bytes=pool)
    disk = StoreLoader(reader, BATCH, shuffle=shuffle, seed=3, pool_bytes=pool, ram_budget=0)
    assert ram.in_ram and not disk.in_ram
    assert reader.layout.chunk_rows == 256
    assert disk.shuffle_blocks == 2 and len(disk.blocks) >= 16  # 8 rounds or more
    assert disk.held_bound == pool
    for epoch in range(2):
        assert same_batches(ram, disk, epoch) == len(disk)
    assert 0 < disk.held_peak <= pool


def test_each_chunk_is_decoded_once_per_epoch_when_the_budget_has_room(stores):
    """Rounds of 2 blocks in a budget that holds the whole store: the edge cache keeps every
    neighbour's part of a shared chunk, so each chunk is decoded exactly once per epoch. In a
    budget of 2 rounds the cache gives way to the rounds: more decodes, the same batches."""
    reader = open_store(stores["bfloat16"])
    lay = reader.layout
    pool = 4 * block_bytes(reader) + 1
    decoded: list[int] = []
    real = reader.raw_rows

    def counting(layer, start, stop, out=None):
        if layer == lay.layers[0]:
            decoded.extend(range(start // lay.chunk_rows, (stop - 1) // lay.chunk_rows + 1))
        return real(layer, start, stop, out)

    reader.raw_rows = counting
    roomy = StoreLoader(reader, BATCH, shuffle=True, shuffle_blocks=2, pool_bytes=1 << 30,
                        ram_budget=0)  # fmt: skip
    tight = StoreLoader(reader, BATCH, shuffle=True, pool_bytes=pool, ram_budget=0)
    assert roomy.shuffle_blocks == tight.shuffle_blocks == 2
    n_chunks = -(-lay.n_rows // lay.chunk_rows)
    for epoch in range(2):
        decoded.clear()
        a = list(roomy.epoch(epoch))
        assert sorted(decoded) == list(range(n_chunks))
        decoded.clear()
        b = list(tight.epoch(epoch))
        assert n_chunks < len(decoded) < 2 * n_chunks
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.samples, y.samples) and torch.equal(x.hidden, y.hidden)
    assert tight.held_peak <= pool < roomy.held_peak


def test_what_the_loader_allocates_is_what_its_budget_counts(stores):
    """numpy's allocations, traced while a slow consumer lets the reader run ahead, stay within
    the budget's high-water mark plus what it does not count (batches, one chunk being decoded):
    no view keeps a given-back round alive."""
    reader = open_store(stores["big"])
    lay = reader.layout
    pool = 4 * block_bytes(reader) + 1
    loader = StoreLoader(reader, BATCH, shuffle=True, seed=2, pool_bytes=pool, ram_budget=0,
                         prefetch=1)  # fmt: skip
    assert len(loader.blocks) >= 16 and loader.shuffle_blocks == 2
    most = int(np.sort(np.diff(loader.offsets))[-BATCH:].sum())  # rows of a batch, at most
    decoded = most * len(lay.layers) * lay.hidden_size * 4  # a float32 batch
    chunk = lay.chunk_rows * lay.hidden_size * 2  # one chunk of one layer
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in loader.epoch(0):
            time.sleep(0.002)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    uncounted = (loader.prefetch + 1) * decoded + decoded // 2 + 3 * chunk
    assert loader.held_peak <= pool
    assert peak <= loader.held_peak + uncounted + (128 << 10), (peak, loader.held_peak, uncounted)


@pytest.mark.parametrize("prefetch", [1, 3])
def test_the_batcher_collates_at_most_prefetch_batches_ahead(stores, prefetch):
    """A batch is only built when it can be queued: with a slow consumer, the batches collated
    but not yet taken never exceed ``prefetch`` (none waits half-built for room in the queue)."""
    reader = open_store(stores["big"])
    loader = StoreLoader(reader, BATCH, shuffle=True, seed=2, ram_budget=0, prefetch=prefetch,
                         pool_bytes=4 * block_bytes(reader) + 1)  # fmt: skip
    collated, ahead = [0], []
    real = loader._collate

    def counting(items):
        collated[0] += 1
        return real(items)

    loader._collate = counting  # type: ignore[method-assign]
    for taken, _ in enumerate(loader.epoch(0), start=1):
        time.sleep(0.003)  # the batcher has all the time it wants
        ahead.append(collated[0] - taken)
    assert max(ahead) == prefetch and len(ahead) == len(loader)


def test_a_block_bigger_than_the_budget_streams_alone_without_deadlock(stores):
    reader = open_store(stores["bfloat16"])
    ram = StoreLoader(reader, BATCH, shuffle=True, seed=1, pool_bytes=1)
    disk = StoreLoader(reader, BATCH, shuffle=True, seed=1, pool_bytes=1, ram_budget=0)
    assert disk.shuffle_blocks == 1 and disk.held_bound > block_bytes(reader) // 2
    done: list[int] = []
    worker = threading.Thread(target=lambda: done.append(same_batches(ram, disk, 0)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "streaming under a budget smaller than one block hangs"
    assert done == [len(disk)]
    # one round at a time: its rows plus the leftovers, never the next round beside it
    assert 1 < disk.held_peak <= disk.held_bound


def test_a_failing_read_surfaces_and_the_workers_stop(stores, tmp_path):
    store = tmp_path / "damaged"
    shutil.copytree(stores["bfloat16"], store)
    shard = sorted((store / "hidden" / "1" / "c").rglob("*"), key=str)
    victim = [p for p in shard if p.is_file()][len(shard) // 3]
    blob = bytearray(victim.read_bytes())
    blob[8:40] = bytes(32)  # inside the first chunk's compressed body: its crc32c fails
    victim.write_bytes(bytes(blob))
    before = threading.active_count()
    loader = StoreLoader(open_store(store), BATCH, shuffle=True, ram_budget=0,
                         pool_bytes=4 * block_bytes(open_store(store)) + 1)  # fmt: skip
    with pytest.raises(StoreCorruptError, match="hidden/1"):
        for _ in loader.epoch(0):
            pass
    assert threading.active_count() == before


def test_leaving_an_epoch_early_stops_a_reader_waiting_for_the_budget(stores):
    reader = open_store(stores["bfloat16"])
    loader = StoreLoader(reader, BATCH, shuffle=True, ram_budget=0, prefetch=1,
                         pool_bytes=4 * block_bytes(reader) + 1)  # fmt: skip
    before = threading.active_count()
    batches = loader.epoch(0)
    next(batches)  # the reader fills the budget and waits for the batcher, which waits for us
    batches.close()
    assert threading.active_count() == before


def test_byte_budget_admits_evicts_and_records_its_peak():
    budget, stop = ByteBudget(100, reserve=10), threading.Event()
    cache = [30]

    def evict() -> bool:
        if not cache:
            return False
        budget.drop(cache.pop())
        return True

    assert budget.take(0, 50, stop, evict)
    assert budget.keep(30) and not budget.keep(11)  # 50 + 30 + reserve 10: 10 left
    assert budget.take(1, 40, stop, evict)  # fits once the cache rows are evicted
    assert (budget.rounds, budget.cache, budget.held, budget.peak) == ({0: 50, 1: 40}, 0, 90, 90)
    budget.pin(1, 0)
    budget.set_leftovers(10)  # within the reserve
    assert budget.held == budget.peak == 100


def test_byte_budget_waits_for_earlier_rounds_then_admits_an_oversized_one():
    budget, stop = ByteBudget(100, reserve=10), threading.Event()
    never = lambda: False  # noqa: E731
    assert budget.take(0, 60, stop, never)
    got: list[bool] = []
    late = threading.Thread(target=lambda: got.append(budget.take(1, 150, stop, never)))
    late.start()
    late.join(timeout=0.3)
    assert late.is_alive() and not got  # waits while round 0 holds its bytes
    budget.give(0)
    late.join(timeout=5)
    assert got == [True] and budget.rounds == {1: 150}  # alone: admitted whatever its size
    assert not budget.take(1, 1, stop, never, over=False)  # a round never waits on itself
    budget.set_leftovers(10)
    assert budget.peak == 160


def test_a_reader_waiting_for_the_budget_stops_with_the_consumer():
    budget, stop = ByteBudget(10), threading.Event()
    budget.take(0, 10, stop, lambda: False)
    stop.set()
    with pytest.raises(Stopped):
        budget.take(1, 5, stop, lambda: False)

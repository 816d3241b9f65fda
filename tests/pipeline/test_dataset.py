"""The store as a PyTorch dataset: exactly stage two's batches, and an own training loop on it
(``examples/own_loop.py``) that reproduces ``sidecache train``'s first-epoch loss bit for bit."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.dataset import StoreDataset
from pipeline.errors import ConfigError
from pipeline.loader import StoreLoader
from pipeline.settings import TrainConfig
from pipeline.sidenets import SideBatch
from pipeline.train import run_train
from storage import open_store
from tests.conftest import cache_splits

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stores(model_dir, glue_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    return cache_splits(model_dir("bert"), f"glue:{glue_dir}", root)


def same(a: list[SideBatch], b: list[SideBatch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.hidden, y.hidden) and torch.equal(x.lengths, y.lengths)
        and torch.equal(x.labels, y.labels) and torch.equal(x.samples, y.samples)
        for x, y in zip(a, b, strict=True)
    )  # fmt: skip


def stage_two_batches(store: Path, batch_size: int, seed: int, epoch: int) -> list[SideBatch]:
    """The train loader ``sidecache train`` builds on CPU, spelled out with its defaults."""
    cfg = TrainConfig(train="", eval="", specs=[], epochs=1, out="")
    memory = {"ram_budget": cfg.ram_budget_mb << 20, "pool_bytes": cfg.pool_mb << 20}
    loader = StoreLoader(open_store(store), batch_size, shuffle=True, seed=seed, **memory)
    return list(loader.epoch(epoch))


def test_batches_are_stage_twos_for_each_epoch(stores):
    ds = StoreDataset(stores / "train", 16, seed=3)
    assert len(ds) == 8 and ds.info.num_outputs == 2 and ds.config.pool_mb == 512
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        got = list(DataLoader(ds, batch_size=None))
        assert len(got) == len(ds)
        assert same(got, stage_two_batches(stores / "train", 16, 3, epoch))
    ds.set_epoch(0)
    assert not same(list(ds), stage_two_batches(stores / "train", 16, 3, 1))


def test_streamed_and_in_ram_give_the_same_batches(stores):
    in_ram = StoreDataset(stores / "train", 8, seed=1)
    streamed = StoreDataset(open_store(stores / "train"), 8, seed=1, ram_budget_mb=0, epoch=2)
    assert in_ram.loader.in_ram and not streamed.loader.in_ram
    in_ram.set_epoch(2)
    assert same(list(in_ram), list(streamed))


def test_unshuffled_is_store_order_and_workers_keep_the_order(stores):
    ds = StoreDataset(stores / "dev", 7, shuffle=False)
    samples = torch.cat([b.samples for b in ds])
    assert torch.equal(samples, torch.arange(40))
    shuffled = StoreDataset(stores / "train", 16, seed=5)
    workers = list(DataLoader(shuffled, batch_size=None, num_workers=2))
    assert same(workers, list(shuffled))


def test_bad_batch_size_is_refused(stores):
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        StoreDataset(stores / "train", 0)


@pytest.mark.parametrize("spec", ["examples.attention_pool.AttentionPool:dropout=0.2",
                                  "read:hidden=16,dropout=0.1"])  # fmt: skip
def test_own_loop_reproduces_the_first_epoch_train_loss(stores, tmp_path, spec):
    """Dropout on, so the random streams must match too; the schedule spans 2 epochs."""
    threads = torch.get_num_threads()
    result = run_train(TrainConfig(
        train=str(stores / "train"), eval=str(stores / "dev"), specs=[f"{spec},name=net"],
        epochs=2, out=str(tmp_path), batch_size=16, seed=7, threads=threads, progress=False,
    ))["net"]  # fmt: skip
    first = float((tmp_path / "net" / "history.csv").read_text().splitlines()[1].split(",")[1])
    assert result["epochs"] == 2
    example = runpy.run_path(str(REPO / "examples" / "own_loop.py"))
    loss = example["first_epoch_loss"](str(stores / "train"), spec, 16, 7, epochs=2)
    assert loss == first

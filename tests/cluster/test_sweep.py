"""``sidecache sweep`` on a 2-worker Dask LocalCluster equals sequential training; failures are
reported, never lost."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.sweep import SweepConfig, Task, balance, parse_task, plan_units, run_sweep
from pipeline.train import TrainConfig, run_train
from stages.sweep import main as sweep_main
from tests.conftest import small_cache

SPECS = [
    "linear",
    "linear:layer=1",
    "mlp:hidden=16",
    "read:hidden=8",
    "read:hidden=16,rnn=lstm,lr=3e-3",
    "lst:r=4",
]


@pytest.fixture(scope="module")
def stores(model_dir, glue_dir, tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("sweep-stores")
    model, data = model_dir("bert"), f"glue:{glue_dir}"
    small_cache(model, data, root / "train")
    small_cache(model, data, root / "dev", split="dev")
    return str(root / "train"), str(root / "dev")


def best(folder: Path) -> dict[str, dict[str, float]]:
    return {
        p.parent.name: json.loads(p.read_text())["eval"]["best"] for p in folder.glob("*/m*.json")
    }


@pytest.mark.slow  # ~60 s here: a LocalCluster starts 2 processes that import torch
def test_sweep_on_two_workers_equals_the_sequential_run(stores, tmp_path):
    train, dev = stores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on every sweep worker: the same float reductions
    try:
        seq = str(tmp_path / "seq")
        run_train(TrainConfig(train=train, eval=dev, specs=SPECS, epochs=2, out=seq, seed=3,
                              progress=False))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    reference = best(tmp_path / "seq")
    assert len(reference) == 6

    cfg = SweepConfig(
        tasks=[Task("sst2", train, dev), Task("broken", str(tmp_path / "no-such-store"), dev)],
        specs=SPECS, seeds=[3], epochs=2, out=str(tmp_path / "sweep"), workers=2, retries=1,
        per_pass=3,
    )  # fmt: skip
    units = plan_units(cfg)
    # at most 3 networks per pass: 2 groups, balanced by trainable parameters
    assert sorted(len(u.specs) for u in units if u.task.name == "sst2") == [3, 3]
    result = run_sweep(cfg)

    assert best(tmp_path / "sweep" / "sst2" / "seed3") == reference
    ok = [r for r in result.rows if r["task"] == "sst2"]
    assert [r["status"] for r in ok] == ["ok"] * 6
    assert {r["name"]: r["score"] for r in ok} == {k: v["score"] for k, v in reference.items()}
    assert len({r["worker"] for r in ok}) == 2, "both workers should have trained something"
    # the broken task: retried, then reported with its error; nothing silently lost
    failed = [r for r in result.rows if r["task"] == "broken"]
    assert len(failed) == 6 and all(r["status"] == "failed" for r in failed)
    assert all("StoreNotFoundError" in r["error"] for r in failed)
    assert not result.ok and {f["task"] for f in result.failures} == {"broken"}
    with (tmp_path / "sweep" / "sweep.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 12


def test_cli_exits_non_zero_and_prints_the_error_when_a_unit_fails(stores, tmp_path, capsys):
    train, dev = stores
    code = sweep_main([
        "--task", f"ok={train},{dev}", "--task", f"bad={tmp_path / 'missing'},{dev}",
        "--sidenet", "linear", "--epochs", "1", "--out", str(tmp_path / "o"),
        "--scheduler", "sequential",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 1
    assert "| ok | 0 | linear | ok |" in printed
    assert "| bad | 0 | linear | failed |" in printed and "StoreNotFoundError" in printed


def test_task_parsing_and_balancing():
    assert parse_task("sst2=s3://b/train,s3://b/dev") == Task("sst2", "s3://b/train", "s3://b/dev")
    assert parse_task("stores/train,stores/dev").name == "train"
    with pytest.raises(ConfigError, match="NAME=TRAIN_STORE,EVAL_STORE"):
        parse_task("only-one-store")
    groups = balance([100.0, 1.0, 50.0, 50.0, 2.0], 2)
    loads = sorted(sum([100.0, 1.0, 50.0, 50.0, 2.0][i] for i in g) for g in groups)
    assert loads == [101.0, 102.0]
    assert sorted(len(g) for g in balance([100.0, 1.0, 50.0, 50.0, 2.0], 2, cap=3)) == [2, 3]

"""Stage one as ``--shard I/N`` tasks on a Dask cluster (``--scheduler``, ``--shards``): the store
equals a single-process one bit for bit, also when a worker dies midway through its task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dask
import pytest

from pipeline.cache import CacheConfig
from pipeline.cluster_cache import ClusterOptions, check_options, local_size, task_resources
from stages.cache import main as cache_main
from stages.cli import main as cli_main
from storage import ConfigError, open_store
from tests.cluster.test_shards import FLAGS, SMALL, write_csv
from tests.conftest import small_cache
from tests.pipeline.test_cache import assert_same_store

KILLER = Path(__file__).with_name("kill_shard_worker.py")


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> tuple[str, str, Path]:
    """A tiny backbone, a csv of about 30 one-shard windows, and its single-process store."""
    root = tmp_path_factory.mktemp("cluster-cache")
    model, data = model_dir("bert"), write_csv(root / "train.csv", 1200)
    small_cache(model, data, root / "ref", **SMALL)
    return model, data, root / "ref"


def cache_args(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["--backbone", model, "--data", data, "--out", str(out), "--device", "cpu",
            "--no-progress", *FLAGS, *extra]  # fmt: skip


def without_path(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in ("path", "bytes_on_disk")}


def test_two_local_workers_write_the_single_process_store(reference, tmp_path, capsys):
    model, data, ref = reference
    out = tmp_path / "cluster"
    args = cache_args(model, data, out, "--scheduler", "local", "--shards", "2", "--json")
    assert cache_main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["complete"] and printed["path"] == open_store(out).path
    assert without_path(printed) == without_path(open_store(ref).summary())
    assert_same_store(ref, out)
    assert not (tmp_path / "cluster.claims").exists(), "every claim is released"


def test_a_worker_killed_midway_is_rerun_and_the_store_is_the_same(
    reference, tmp_path, monkeypatch
):
    model, data, ref = reference
    out, marker = tmp_path / "cluster", tmp_path / "killed.json"
    monkeypatch.setenv("SIDECACHE_KILL_STORE", str(out))
    monkeypatch.setenv("SIDECACHE_KILL_MARKER", str(marker))
    args = cache_args(model, data, out, "--scheduler", "local", "--shards", "2", "--workers", "2")
    with dask.config.set({"distributed.worker.preload": [str(KILLER)]}):
        assert cache_main(args) == 0
    killed = json.loads(marker.read_text())
    assert 0 < killed["done"] < killed["owned"], f"not killed midway through its task: {killed}"
    assert_same_store(ref, out)
    assert not (tmp_path / "cluster.claims").exists(), "the dead worker's stale claim is cleared"


def cfg(**overrides: Any) -> CacheConfig:
    return CacheConfig(backbone="b", data="d", split="train", out="o", **overrides)


@pytest.mark.parametrize(
    ("overrides", "options", "message"),
    [
        ({}, ClusterOptions(None, 2), "--shards needs --scheduler"),
        ({}, ClusterOptions("local", None), "needs --shards N"),
        ({}, ClusterOptions("local", 0), r"--shards N with N >= 1 .*found 0"),
        ({"shard": "0/2"}, ClusterOptions("local", 2), "--shard 0/2 runs one worker"),
        ({"overwrite": True}, ClusterOptions("tcp://h:8786", 2), "--overwrite cannot"),
        ({"finalize": True}, ClusterOptions("local", 2), "--finalize"),
        ({}, ClusterOptions("h:8786", 2), "expected 'local' .* or a scheduler address"),
        ({}, ClusterOptions("tcp://h:8786", 2, workers=3), "--workers sizes a local cluster"),
        ({}, ClusterOptions("local", 2, retries=-1), "found 0 and -1"),
    ],
)
def test_flag_combinations_a_cluster_run_refuses(overrides, options, message):
    with pytest.raises(ConfigError, match=message):
        check_options(cfg(**overrides), options)


def test_the_cli_exits_2_before_starting_a_cluster(tmp_path, caplog):
    for extra in (["--shards", "2"], ["--scheduler", "local", "--shard", "0/2"],
                  ["--scheduler", "local", "--shards", "2", "--overwrite"]):  # fmt: skip
        argv = ["cache", "--backbone", "b", "--data", "d", "--out", str(tmp_path / "s"), *extra]
        assert cli_main(argv) == 2
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.levelname == "ERROR"] == [
        "ConfigError"
    ] * 3
    assert not (tmp_path / "s").exists()


def test_a_local_cluster_shares_the_cores(monkeypatch):
    monkeypatch.setattr("pipeline.cluster_cache.usable_cores", lambda: 8)
    assert local_size(ClusterOptions("local", 2)) == (2, 4)
    assert local_size(ClusterOptions("local", 16)) == (8, 1)
    assert local_size(ClusterOptions("local", 16, workers=3)) == (3, 2)


class FakeClient:
    def __init__(self, *resources: dict[str, float]):
        self.workers = {f"tcp://w{i}": {"resources": r} for i, r in enumerate(resources)}

    def scheduler_info(self, n_workers: int = -1) -> dict[str, Any]:
        return {"workers": self.workers}


def test_tasks_ask_for_a_gpu_only_where_workers_declare_gpus():
    assert task_resources(FakeClient({}, {})) is None
    assert task_resources(FakeClient({"memory": 4.0})) is None
    assert task_resources(FakeClient({"GPU": 1.0}, {"GPU": 1.0})) == {"GPU": 1}

"""params.yaml: the repository's own file loads; every mistake names the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.params import (
    CACHE_KEYS,
    TRAIN_KEYS,
    ParamsError,
    glue_tasks,
    load_params,
    sidenet_specs,
)
from pipeline.settings import CacheConfig, ColumnOptions, TrainConfig
from stages.cli import main as cli
from stages.stage import cache_config, train_config
from tests.conftest import write_glue_sst2

REPO = Path(__file__).resolve().parents[2]


def test_repository_params_load() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.tasks == ["bbc"] and params.dataset("bbc").data == "bbc"
    assert params.cache["backbone"] == "minilm"
    assert set(params.sidenets) == {"read", "lst", "linear", "mlp"}
    assert sidenet_specs(params.sidenets) == [
        "read:name=read",
        "lst:name=lst",
        "linear:name=linear",
        "mlp:name=mlp",
    ]


def test_glue_tasks_are_found_by_folder(tmp_path: Path) -> None:
    write_glue_sst2(tmp_path / "glue")
    (tmp_path / "glue" / "QNLI").mkdir()  # dev only: not a task one can train on
    (tmp_path / "glue" / "QNLI" / "dev.tsv").write_text("x\n")
    assert list(glue_tasks(tmp_path / "glue")) == ["sst2"]
    (tmp_path / "params.yaml").write_text("tasks: [sst2, SST-2]\nglue_dir: glue\n")
    params = load_params(tmp_path / "params.yaml")
    assert params.dataset("sst2").data == f"glue:{tmp_path / 'glue' / 'SST-2'}"
    assert params.dataset("SST-2").data == params.dataset("sst2").data


BASE = {"tasks": ["bbc"], "datasets": {"bbc": {"data": "bbc"}}}
CASES = {
    "unknown task": ({"tasks": ["nope"]}, "task 'nope' is neither a key of `datasets`"),
    "tasks not a list": ({"tasks": "bbc"}, "`tasks` must be a non-empty list"),
    "empty tasks": ({"tasks": []}, "`tasks` must be a non-empty list"),
    "unknown section": ({"trian": {}}, "unknown section(s) trian"),
    "unknown cache key": ({"cache": {"dtpye": "int8"}}, "unknown key(s) dtpye in `cache`"),
    "wrong type": ({"train": {"epochs": "three"}}, "`train.epochs` must be int"),
    "bool is not int": ({"train": {"epochs": True}}, "`train.epochs` must be int"),
    "sidenets as list": (
        {"train": {"sidenets": ["read"]}},
        "`train.sidenets` must be dict[str, str] (like {'read': 'read'}), found list ['read']",
    ),
    "sidenet spec not str": (
        {"train": {"sidenets": {"read": 3}}},
        "`train.sidenets` must be dict[str, str]",
    ),
    "no sidenets": ({"train": {"sidenets": {}}}, "`train.sidenets` must map names to specs"),
    "unknown train key": (
        {"train": {"pool_mb": 64}},
        "unknown key(s) pool_mb in `train`; expected some of epochs, batch_size",
    ),
    "datasets not a mapping": ({"datasets": ["bbc"]}, "`datasets` must map task names"),
    "dataset limit not int": (
        {"datasets": {"bbc": {"data": "bbc", "train_limit": "10"}}},
        "`datasets.bbc.train_limit` must be int or null, found str '10'",
    ),
    "report title not str": ({"report": {"title": 3}}, "`report.title` must be str"),
    "dataset without data": ({"datasets": {"bbc": {"limit": 3}}}, "`datasets.bbc` must be"),
    "dataset unknown key": (
        {"datasets": {"bbc": {"data": "bbc", "limt": 3}}},
        "unknown key(s) limt in `datasets.bbc`",
    ),
    "section not a mapping": ({"report": "x"}, "`report` must be a mapping"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_params_are_named(tmp_path: Path, name: str) -> None:
    change, message = CASES[name]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**BASE, **change}))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_name_in_spec_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**BASE, "train": {"sidenets": {"r": "read:name=x"}}}))
    with pytest.raises(ParamsError, match=r"the key .* is the name"):
        sidenet_specs(load_params(path).sidenets)


def test_stage_cli_exits_2_without_params(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "params.yaml"
    assert cli(["stage", "--params", str(missing), "train", "bbc"]) == 2
    (tmp_path / "bad.yaml").write_text("tasks: [bbc\n")
    assert cli(["stage", "--params", str(tmp_path / "bad.yaml"), "report"]) == 2
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(BASE))
    # train before the stores exist: refused, naming the missing manifest and what to run
    assert cli(["stage", "--params", str(path), "--root", str(tmp_path), "train", "bbc"]) == 2
    assert not (tmp_path / "outputs").exists()


# a wrong type for every key params.yaml may set in `cache:` and `train:`, settings whose
# default is null included: each is refused naming the key, the type it takes and the value
WRONG_TYPES = {
    "cache.backbone": (3, "must be str (like 'minilm'), found int 3"),
    "cache.revision": (3, "must be str or null, found int 3"),
    "cache.max_length": ("128", "must be int or null, found str '128'"),
    "cache.layers": ([0, 1], "must be str (like 'all'), found list [0, 1]"),
    "cache.positions": (None, "must be str (like 'all'), found NoneType None"),
    "cache.dtype": (16, "must be str (like 'bfloat16'), found int 16"),
    "cache.codec": (False, "must be str (like 'blosc-lz4:5'), found bool False"),
    "cache.device": (0, "must be str (like 'auto'), found int 0"),
    "cache.token_budget": (4096.0, "must be int (like 0), found float 4096.0"),
    "cache.lst_prune": ("8", "must be int or null, found str '8'"),
    "cache.pairs": (2, "must be str (like 'auto'), found int 2"),
    "train.epochs": ("3", "must be int (like 3), found str '3'"),
    "train.batch_size": (True, "must be int (like 32), found bool True"),
    "train.seed": (None, "must be int (like 0), found NoneType None"),
    "train.device": (["cpu"], "must be str (like 'auto'), found list ['cpu']"),
    "train.ram_budget_mb": (1.5, "must be int (like 4096), found float 1.5"),
}


def test_the_wrong_type_table_covers_every_key() -> None:
    keys = [f"cache.{k}" for k in CACHE_KEYS] + [f"train.{k}" for k in TRAIN_KEYS]
    assert sorted(WRONG_TYPES) == sorted(keys)


@pytest.mark.parametrize("key", list(WRONG_TYPES))
def test_a_wrong_type_is_refused_naming_the_key(tmp_path: Path, key: str) -> None:
    section, name = key.split(".")
    value, message = WRONG_TYPES[key]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**BASE, section: {name: value}}))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert f"{path}: `{key}` {message}" in str(err.value)


def test_null_where_the_setting_takes_it(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    nulls = {"revision": None, "max_length": None, "lst_prune": None}
    path.write_text(yaml.safe_dump({**BASE, "cache": nulls, "train": {"epochs": 2}}))
    params = load_params(path)
    assert {k: params.cache[k] for k in nulls} == nulls
    # keys left out take the defaults `sidecache cache` / `sidecache train` have
    assert params.cache["token_budget"] == CacheConfig.token_budget
    assert params.train == {"epochs": 2, "batch_size": 32, "seed": 0, "device": "auto",
                            "ram_budget_mb": 4096}  # fmt: skip


def test_repository_params_build_the_same_configs_as_before() -> None:
    """What `dvc repro` runs for the committed params.yaml, written out field by field."""
    params, root = load_params(REPO / "params.yaml"), Path("proj")
    assert cache_config(params, root, "bbc", "train", progress=True) == CacheConfig(
        backbone="minilm", data="bbc", split="train", out="proj/stores/bbc-train",
        layers="all", positions="all", dtype="bfloat16", codec="blosc-lz4:5", max_length=128,
        device="auto", overwrite=False, revision=None, limit=None, lst_prune=None,
        columns=ColumnOptions(None, None, None), token_budget=4096, max_batch=0,  # 0: 256 on CPU
        batch_cost=-1, window_mb=0.0, chunk_mb=4.0, shard_chunks=8, writer_threads=0,  # by device
        streams=2, progress=True, shard=None, finalize=False,
    )  # fmt: skip
    dev = cache_config(params, root, "bbc", "dev", progress=False)
    assert (dev.split, dev.out, dev.progress) == ("dev", "proj/stores/bbc-dev", False)
    assert train_config(params, root, "bbc", progress=True) == TrainConfig(
        train="proj/stores/bbc-train", eval="proj/stores/bbc-dev",
        specs=["read:name=read", "lst:name=lst", "linear:name=linear", "mlp:name=mlp"],
        epochs=3, out="proj/outputs/bbc", batch_size=32, seed=0, device="auto",
        ram_budget_mb=4096, progress=True, threads=0, pool_mb=512, low_memory=False,
        micro_rows=0, device_budget_mb=-1,
    )  # fmt: skip

"""params.yaml: the repository's own file loads; every mistake names the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.cli import main as cli
from pipeline.params import ParamsError, glue_tasks, load_params, sidenet_specs
from tests.conftest import write_glue_sst2

REPO = Path(__file__).resolve().parents[2]


def test_repository_params_load() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.tasks == ["bbc"] and params.dataset("bbc").data == "bbc"
    assert params.cache.backbone == "minilm"
    assert set(params.train.sidenets) == {"read", "lst", "linear", "mlp"}
    assert sidenet_specs(params.train) == [
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
    "sidenets as list": ({"train": {"sidenets": ["read"]}}, "`train.sidenets` must be dict"),
    "sidenet spec not str": (
        {"train": {"sidenets": {"read": 3}}},
        "`train.sidenets` must map names to specs",
    ),
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
        sidenet_specs(load_params(path).train)


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

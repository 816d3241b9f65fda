"""Settings declared once (pipeline/config.py): the commands' flags come from the config
dataclasses, keep their names, and default to exactly the dataclasses' defaults."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any

import pytest

from pipeline.bench import BenchConfig
from pipeline.cache import CacheConfig
from pipeline.cluster_cache import ClusterOptions
from pipeline.config import (
    ParamsError,
    add_flags,
    check_settings,
    default_of,
    from_args,
    setting,
    setting_of,
    type_hints,
)
from pipeline.settings import ColumnOptions
from pipeline.sweep import SweepConfig, Task
from pipeline.train import TrainConfig
from stages import bench, cache, sweep, train

# every flag of `sidecache cache|train|bench|sweep -h` before the flags were built from the
# config classes: each must still be there
FLAGS = {
    "cache": "--backbone --batch-cost --chunk-mb --codec --data --device --dtype --finalize "
    "--json --label-column --layers --limit --lst-prune --max-batch --max-length --no-progress "
    "--out --overwrite --positions --retries --revision --scheduler --shard --shard-chunks "
    "--shards --split --streams --text-column --text-pair-column --token-budget --window-mb "
    "--workers --writer-threads",
    "train": "--batch-size --device --epochs --eval --low-memory --micro-rows --no-progress "
    "--out --pool-mb --ram-budget-mb --seed --sidenet --threads --train",
    "bench": "--backbone --batch-size --chunk-mb --data --device --dtype --epochs --eval-limit "
    "--eval-split --limit --low-memory --max-length --methods --micro-rows --out --pool-mb "
    "--positions --ram-budget-mb --seeds --threads",
    "sweep": "--batch-size --device --epochs --out --per-pass --ram-budget-mb --retries "
    "--scheduler --seeds --sidenet --task --threads --workers",
}
# each command's parser, its config classes and the flags it requires
COMMANDS: dict[str, tuple[Any, tuple[type, ...], list[str]]] = {
    "cache": (cache.parser, (CacheConfig, ClusterOptions), ["--out", "o"]),
    "train": (train.parser, (TrainConfig,), ["--train", "a", "--eval", "b", "--out", "o"]),
    "bench": (bench.parser, (BenchConfig,), ["--data", "bbc", "--out", "o"]),
    "sweep": (sweep.parser, (SweepConfig,), ["--out", "o"]),
}


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


@pytest.mark.parametrize("command", list(FLAGS))
def test_every_flag_is_still_there(command: str) -> None:
    missing = set(FLAGS[command].split()) - option_strings(COMMANDS[command][0]())
    assert not missing, f"sidecache {command} lost {sorted(missing)}"


def settings_of(cls: type) -> list[tuple[type, str]]:
    """(class, field) of every setting, nested config classes (ColumnOptions) included."""
    found = []
    for f in fields(cls):
        hint = type_hints(cls)[f.name]
        if setting_of(f) is None and isinstance(hint, type) and is_dataclass(hint):
            found += settings_of(hint)
        else:
            found.append((cls, f.name))
    return found


@pytest.mark.parametrize("command", list(COMMANDS))
def test_flag_defaults_are_the_dataclass_defaults(command: str) -> None:
    parser, classes, required = COMMANDS[command]
    args = parser().parse_args(required)
    given = dict(zip(required[::2], required[1::2], strict=True))
    for cls in classes:
        built = from_args(cls, args)
        for owner, name in settings_of(cls):
            value = built.columns if owner is ColumnOptions else built  # type: ignore[attr-defined]
            flag = f"--{name.replace('_', '-')}"
            want = given[flag] if flag in given else default_of(owner, name)
            assert want is not MISSING, f"{owner.__name__}.{name} has no default"
            assert getattr(value, name) == want, f"{command} {owner.__name__}.{name}"


@pytest.mark.parametrize(
    "cls", [CacheConfig, ColumnOptions, TrainConfig, BenchConfig, SweepConfig, ClusterOptions]
)
def test_every_setting_has_help(cls: type) -> None:
    for owner, name in settings_of(cls):
        s = setting_of(next(f for f in fields(owner) if f.name == name))
        assert s is not None and s.help.strip(), f"{owner.__name__}.{name}: no help text"


def test_flags_build_the_config() -> None:
    args = cache.parser().parse_args(
        ["--out", "o", "--batch-cost", "fill", "--no-progress", "--text-column", "t",
         "--lst-prune", "4", "--window-mb", "64", "--overwrite"]
    )  # fmt: skip
    cfg = from_args(CacheConfig, args)
    assert (cfg.batch_cost, cfg.progress, cfg.lst_prune, cfg.window_mb) == (None, False, 4, 64.0)
    assert cfg.columns == ColumnOptions(text="t") and cfg.overwrite
    assert cache.cluster_options(args) is None
    args = cache.parser().parse_args(["--out", "o", "--scheduler", "local", "--shards", "3"])
    assert cache.cluster_options(args) == ClusterOptions("local", 3, workers=0, retries=1)

    args = sweep.parser().parse_args(
        ["--out", "o", "--task", "a=x,y", "--task", "p,q", "--seeds", "1,2", "--sidenet", "read"]
    )
    cfg_s = from_args(SweepConfig, args)
    assert cfg_s.tasks == [Task("a", "x", "y"), Task("p", "p", "q")]
    assert (cfg_s.seeds, cfg_s.specs) == ([1, 2], ["read"])

    args = bench.parser().parse_args(
        ["--data", "d", "--out", "o", "--methods", "cached:read:hidden=4;lr=1e-3,online:lora"]
    )
    assert from_args(BenchConfig, args).methods == ["cached:read:hidden=4,lr=1e-3", "online:lora"]


@pytest.mark.parametrize(
    ("command", "argv", "message"),
    [
        ("cache", ["--out", "o", "--batch-cost", "many"], "a number of token slots or 'fill'"),
        ("sweep", ["--out", "o", "--seeds", "x"], "expected a comma list of integers"),
        ("sweep", ["--out", "o", "--task", "one"], "expected NAME=TRAIN_STORE,EVAL_STORE"),
        ("train", ["--train", "a", "--eval", "b", "--out", "o", "--epochs", "2.5"], "invalid int"),
        ("bench", ["--data", "d"], "required: --out"),
    ],
)
def test_bad_flags_name_the_flag(
    command: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        COMMANDS[command][0]().parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@dataclass
class Example:
    name: str = setting(help="required")
    count: int = setting(3, "a count")
    ratio: float = setting(0.5, "a ratio")
    limit: int | None = setting(None, "optional")
    tags: list[str] = setting(["a"], "a list", append=True)
    table: dict[str, str] = setting({}, "a mapping")
    on: bool = setting(True, "on unless --no-on")
    mode: str = setting("a", "a or b", choices=["a", "b"])
    secret: int = setting(0, "not in -h", hidden=True)


def test_list_defaults_are_copied_per_instance() -> None:
    one, two = Example("x"), Example("y")
    one.tags.append("b")
    assert two.tags == ["a"] and default_of(Example, "tags") == ["a"]


def test_flags_from_a_dataclass() -> None:
    p = argparse.ArgumentParser()
    add_flags(p, Example, skip=["table"])
    assert option_strings(p) >= {"--name", "--count", "--ratio", "--limit", "--tags", "--no-on"}
    assert "--table" not in option_strings(p)
    built = from_args(Example, p.parse_args(["--name", "n", "--no-on", "--limit", "2"]))
    assert built == Example("n", limit=2, on=False)
    assert from_args(Example, p.parse_args(["--name", "n", "--secret", "4"])).secret == 4
    assert "--secret" not in p.format_help() and "--no-on" in p.format_help()
    for argv in ([], ["--name", "n", "--mode", "c"]):  # --name is required; c is no choice
        with pytest.raises(SystemExit):
            p.parse_args(argv)


GOOD: dict[str, Any] = {
    "name": "x", "count": 2, "ratio": 1, "limit": None, "tags": ["a", "b"], "table": {"k": "v"},
    "on": False, "mode": "b", "secret": 1,
}  # fmt: skip
WRONG = [
    ("count", "3", "must be int (like 3), found str '3'"),
    ("count", True, "must be int (like 3), found bool True"),
    ("count", None, "must be int (like 3), found NoneType None"),
    ("ratio", "0.5", "must be float (like 0.5), found str"),
    ("ratio", False, "must be float"),
    ("limit", "8", "must be int or null, found str '8'"),
    ("limit", 1.5, "must be int or null, found float 1.5"),
    ("tags", "a", "must be list[str] (like ['a']), found str"),
    ("tags", ["a", 1], "must be list[str]"),
    ("table", {"k": 1}, "must be dict[str, str]"),
    ("table", ["k"], "must be dict[str, str]"),
    ("on", "yes", "must be bool (like True), found str 'yes'"),
    ("name", 3, "must be str, found int 3"),
]


def test_check_settings_takes_the_right_types() -> None:
    assert check_settings(Example, GOOD, "ex") == GOOD
    assert check_settings(Example, {}, "ex") == {}


@pytest.mark.parametrize(("key", "value", "message"), WRONG)
def test_check_settings_names_key_type_and_value(key: str, value: Any, message: str) -> None:
    with pytest.raises(ParamsError) as err:
        check_settings(Example, {**GOOD, key: value}, "ex", source="f.yaml")
    assert f"f.yaml: `ex.{key}` {message}" in str(err.value)


def test_check_settings_refuses_unknown_keys_and_non_mappings() -> None:
    with pytest.raises(ParamsError, match=r"unknown key\(s\) ratio in `ex`; expected some of name"):
        check_settings(Example, {"ratio": 1.0}, "ex", keys=["name", "count"])
    with pytest.raises(ParamsError, match="`ex` must be a mapping of settings, found list"):
        check_settings(Example, ["name"], "ex")

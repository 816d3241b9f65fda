"""Bad input, table-driven: each case exits 2 with a named error and a message that says what
was expected, and leaves nothing that looks like a complete store."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zarr

from pipeline.cli import main
from storage import StoreError, open_store
from tests.conftest import build_bert, small_cache


@dataclass
class Case:
    name: str
    argv: Callable[[Path, dict[str, str]], list[str]]
    error: str  # exception class name
    text: str  # a fragment of the message


def cache(env: dict[str, str], out: Path, *extra: str, data: str | None = None) -> list[str]:
    return ["cache", "--backbone", env["model"], "--data", data or env["data"], "--out", str(out),
            "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def csv_file(root: Path, name: str, text: str) -> str:
    path = root / name
    path.write_text(text)
    return f"csv:{path}"


CASES = [
    Case(
        "missing glue folder",
        lambda t, e: cache(e, t / "o", data="glue:/nonexistent/SST-2"),
        "DataSpecError",
        "does not exist",
    ),
    Case(
        "unknown data spec",
        lambda t, e: cache(e, t / "o", data="ftp:whatever"),
        "DataSpecError",
        "unknown data spec",
    ),
    Case(
        "unknown glue task folder",
        lambda t, e: cache(e, t / "o", data=f"glue:{t}"),
        "DataSpecError",
        "cannot tell the GLUE task",
    ),
    Case(
        "empty dataset",
        lambda t, e: cache(e, t / "o", data=csv_file(t, "e.csv", "text,label\n")),
        "DataSpecError",
        "has no rows",
    ),
    Case(
        "missing text column",
        lambda t, e: cache(e, t / "o", data=csv_file(t, "b.csv", "body,label\nhi,1\n")),
        "DataSpecError",
        "--text-column",
    ),
    Case(
        "missing label column",
        lambda t, e: cache(e, t / "o", data=csv_file(t, "n.csv", "text,stars\nhi,1\n")),
        "DataSpecError",
        "--label-column",
    ),
    Case(
        "named column absent",
        lambda t, e: cache(
            e, t / "o", "--text-column", "body", data=csv_file(t, "c.csv", "text,label\nhi,1\n")
        ),
        "DataSpecError",
        "no column 'body'",
    ),
    Case(
        "missing labels",
        lambda t, e: cache(e, t / "o", data=csv_file(t, "m.csv", "text,label\nhi,0.5\nho,\n")),
        "DataSpecError",
        "NaN or missing",
    ),
    Case(
        "unlabelled glue test split",
        lambda t, e: cache(e, t / "o", "--split", "test"),
        "DataSpecError",
        "has no labels",
    ),
    Case(
        "bbc split that does not exist",
        lambda t, e: cache(e, t / "o", "--split", "test", data="bbc"),
        "DataSpecError",
        "bbc has splits train, dev and all",
    ),
    Case(
        "layer out of range",
        lambda t, e: cache(e, t / "o", "--layers", "0,9"),
        "ConfigError",
        "layer 9 is out of range",
    ),
    Case(
        "layers not numbers",
        lambda t, e: cache(e, t / "o", "--layers", "last"),
        "ConfigError",
        "--layers must be",
    ),
    Case(
        "unknown dtype",
        lambda t, e: cache(e, t / "o", "--dtype", "float8"),
        "ConfigError",
        "unknown stored dtype",
    ),
    Case(
        "unknown positions",
        lambda t, e: cache(e, t / "o", "--positions", "middle"),
        "ConfigError",
        "unknown positions",
    ),
    Case(
        "unknown codec",
        lambda t, e: cache(e, t / "o", "--codec", "gzip"),
        "ConfigError",
        "unknown codec",
    ),
    Case(
        "max length too small",
        lambda t, e: cache(e, t / "o", "--max-length", "1"),
        "ConfigError",
        "--max-length must be at least 2",
    ),
    Case(
        "missing backbone folder",
        lambda t, e: cache(dict(e, model="./no/such/model"), t / "o"),
        "BackboneError",
        "does not exist",
    ),
    Case(
        "non-empty output without --overwrite",
        lambda t, e: cache(e, t / "full"),
        "StoreExistsError",
        "--overwrite",
    ),
    Case(
        "existing store from other settings",
        lambda t, e: cache(e, t / "good", "--dtype", "int8"),
        "StoreExistsError",
        "layout.dtype",
    ),
    Case(
        "verify a missing store",
        lambda t, e: ["verify", str(t / "none")],
        "StoreNotFoundError",
        "no store at",
    ),
    Case(
        "verify an incomplete store",
        lambda t, e: ["verify", str(t / "incomplete")],
        "StoreIncompleteError",
        "re-run the same 'sidecache cache' command",
    ),
    Case(
        "verify a plain zarr group",
        lambda t, e: ["verify", str(t / "plain")],
        "StoreSchemaError",
        "not a sidecache store",
    ),
    Case(
        "store from a newer schema",
        lambda t, e: ["verify", str(t / "newer")],
        "StoreSchemaError",
        "upgrade sidecache",
    ),
    Case(
        "verify with another backbone",
        lambda t, e: ["verify", str(t / "good"), "--backbone", e["other"], "--device", "cpu"],
        "StoreMismatchError",
        "weights_hash",
    ),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, model_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    glue = root / "SST-2"
    glue.mkdir()
    (glue / "train.tsv").write_text("sentence\tlabel\na fine film\t1\na dull film\t0\n")
    (glue / "test.tsv").write_text("index\tsentence\n0\ta film\n")
    model = model_dir("bert")
    good = root / "good"
    small_cache(model, f"glue:{glue}", good)
    (root / "full").mkdir()
    (root / "full" / "notes.txt").write_text("keep me")
    zarr.open_group(str(root / "plain"), mode="w")
    small_cache(model, f"glue:{glue}", root / "newer")
    group = zarr.open_group(str(root / "newer"), mode="r+")
    group.attrs["sidecache"] = dict(group.attrs["sidecache"], schema_version=99)  # type: ignore[arg-type]
    small_cache(model, f"glue:{glue}", root / "incomplete")
    group = zarr.open_group(str(root / "incomplete"), mode="r+")
    group.attrs["sidecache"] = dict(group.attrs["sidecache"], complete=False)  # type: ignore[arg-type]
    return {
        "root": str(root),
        "model": model,
        "data": f"glue:{glue}",
        "other": build_bert(root / "other", seed=1),
    }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    root = Path(env["root"])
    argv = case.argv(root, env)
    before = json.dumps(sorted(str(p) for p in root.rglob("*")))
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    message = caplog.text
    assert case.error in message and case.text in message, message
    if "--out" in argv:
        out = argv[argv.index("--out") + 1]
        if out.endswith(("/o",)):
            with pytest.raises((StoreError, FileNotFoundError)):
                open_store(out)
    if case.name == "non-empty output without --overwrite":
        assert (root / "full" / "notes.txt").read_text() == "keep me"
        assert before == json.dumps(sorted(str(p) for p in root.rglob("*")))


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 12

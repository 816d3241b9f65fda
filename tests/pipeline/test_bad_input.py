"""Bad input, table-driven: each case exits 2 with a named error and a message that says what
was expected (and what was found, and what to change), and leaves nothing that looks like a
complete output: no complete store, no finished run, no predictions file.

Stage one, stage two, predict, verify and the DVC ``stage`` command are covered. Text longer than
the backbone's limit is not an error: it is truncated and the count is logged (last test)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zarr

from pipeline.train import TrainConfig, run_train
from stages.cli import main
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


def train(env: dict[str, str], out: Path, *specs: str, tr: str = "good", ev: str = "good",
          extra: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    root = Path(env["root"])
    nets = [x for spec in (specs or ("linear",)) for x in ("--sidenet", spec)]
    return ["train", "--train", str(root / tr), "--eval", str(root / ev), *nets, "--epochs", "1",
            "--out", str(out), "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def predict(env: dict[str, str], *extra: str, run: str | None = None) -> list[str]:
    return ["predict", "--run", run or str(Path(env["root"]) / "run" / "linear"), "--device",
            "cpu", *extra]  # fmt: skip


def stage(t: Path, params: str, *args: str) -> list[str]:
    (t / "params-bad.yaml").write_text(params)
    return ["stage", "--params", str(t / "params-bad.yaml"), "--root", str(t / "dvc"), *args]


def jsonl_file(root: Path, name: str, rows: list[dict[str, object]]) -> str:
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{path}"


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
        "negative batch cost",
        lambda t, e: cache(e, t / "o", "--batch-cost", "-5"),
        "ConfigError",
        "--batch-cost must be 0 or more",
    ),
    Case(
        "no backbone streams",
        lambda t, e: cache(e, t / "o", "--streams", "0"),
        "ConfigError",
        "--streams must be 1 or more and --writer-threads 0 (auto) or more, found 0",
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
    # -- stage one: what the backbone produces and what the data holds ---------------------
    Case(
        "NaN in hidden states at write time",
        lambda t, e: cache(dict(e, model=e["nan"]), t / "o"),
        "NonFiniteError",
        "NaN/inf at layer 0 for sample 2",
    ),
    Case(
        "labels of an unusable type",
        lambda t, e: cache(
            e,
            t / "o",
            data=jsonl_file(
                t,
                "l.jsonl",
                [{"text": "a film", "label": [1, 2]}, {"text": "a dull film", "label": [0]}],
            ),
        ),
        "DataSpecError",
        "unusable types",
    ),
    Case(
        "labels mixing numbers and names",
        lambda t, e: cache(
            e,
            t / "o",
            data=jsonl_file(
                t,
                "x.jsonl",
                [{"text": "a film", "label": 1}, {"text": "a dull film", "label": "neg"}],
            ),
        ),
        "DataSpecError",
        "expected class names, integer class ids or numbers",
    ),
    Case(
        "negative class ids",
        lambda t, e: cache(e, t / "o", data=csv_file(t, "neg.csv", "text,label\nhi,1\nho,-3\n")),
        "DataSpecError",
        "negative class ids",
    ),
    Case(
        "empty split (no rows after the header)",
        lambda t, e: cache(e, t / "o", data=csv_file(t, "h.csv", "text,label\n")),
        "DataSpecError",
        "has no rows",
    ),
    Case(
        "--limit 0",
        lambda t, e: cache(e, t / "o", "--limit", "0"),
        "DataSpecError",
        "--limit must be at least 1",
    ),
    # -- stage two: stores that do not fit the side networks or each other -----------------
    Case(
        "unknown side network kind",
        lambda t, e: train(e, t / "r", "transformer"),
        "ConfigError",
        "unknown side network 'transformer'",
    ),
    Case(
        "negative micro-batch rows",
        lambda t, e: train(e, t / "r", extra=("--micro-rows", "-1")),
        "ConfigError",
        "--micro-rows must be 0 (whole batches) or a number of rows; found -1",
    ),
    Case(
        "unknown side network key",
        lambda t, e: train(e, t / "r", "read:width=64"),
        "ConfigError",
        "unknown key 'width'",
    ),
    Case(
        "side network key of the wrong type",
        lambda t, e: train(e, t / "r", "read:hidden=big"),
        "ConfigError",
        "hidden='big' is not a int",
    ),
    Case(
        "unknown READ recurrence",
        lambda t, e: train(e, t / "r", "read:rnn=transformer"),
        "ConfigError",
        "rnn must be one of",
    ),
    Case(
        "LST width that does not divide the store's hidden size",
        lambda t, e: train(e, t / "r", "lst:r=5"),
        "StoreMismatchError",
        "does not divide the store's hidden size 32",
    ),
    Case(
        "probe on a layer the store lacks",
        lambda t, e: train(e, t / "r", "linear:layer=7"),
        "StoreMismatchError",
        "layer 7 is not in the store",
    ),
    Case(
        "LST on a first-position store",
        lambda t, e: train(e, t / "r", "lst", tr="first", ev="first"),
        "StoreMismatchError",
        "LST attends over tokens",
    ),
    Case(
        "mean pooling on a first-position store",
        lambda t, e: train(e, t / "r", "read:pool=mean", tr="first", ev="first"),
        "StoreMismatchError",
        "pools 'mean' but the store holds only 'first'",
    ),
    Case(
        "eval store from another backbone",
        lambda t, e: train(e, t / "r", ev="other-store"),
        "StoreMismatchError",
        "train and eval stores do not match",
    ),
    Case(
        "eval store with other positions",
        lambda t, e: train(e, t / "r", ev="first"),
        "StoreMismatchError",
        "layout.positions is 'first' but 'all' was expected",
    ),
    Case(
        "eval store with other layers",
        lambda t, e: train(e, t / "r", ev="layers02"),
        "StoreMismatchError",
        "layout.layers is [0, 2] but [0, 1, 2] was expected",
    ),
    Case(
        "eval store with another hidden size",
        lambda t, e: train(e, t / "r", ev="wide"),
        "StoreMismatchError",
        "train and eval stores do not match",
    ),
    Case(
        "train on an incomplete store",
        lambda t, e: train(e, t / "r", tr="incomplete"),
        "StoreIncompleteError",
        "re-run the same 'sidecache cache' command",
    ),
    Case(
        "train on a store from a newer schema",
        lambda t, e: train(e, t / "r", tr="newer"),
        "StoreSchemaError",
        "upgrade sidecache",
    ),
    Case(
        "train on a store with a flipped byte",
        lambda t, e: train(e, t / "r", tr="corrupt", ev="corrupt"),
        "StoreCorruptError",
        "array 'hidden/1' has 1 damaged chunk(s): chunk (0, 0)",
    ),
    Case(
        "train with --epochs 0",
        lambda t, e: train(e, t / "r", extra=("--epochs", "0")),
        "ConfigError",
        "--epochs and --batch-size must be at least 1",
    ),
    Case(
        "resume a run folder trained on another store",
        lambda t, e: train(e, t / "run", tr="wide", ev="wide"),
        "ConfigError",
        "holds a run of 'linear' on another store",
    ),
    # -- predict and verify -------------------------------------------------------------
    Case(
        "predict from a run folder without a checkpoint",
        lambda t, e: predict(e, "--text", "a film", run=str(t / "empty-run")),
        "ConfigError",
        "no checkpoint at",
    ),
    Case(
        "predict with both --text and --data",
        lambda t, e: predict(
            e, "--text", "a film", "--data", e["data"], "--out", str(t / "p.jsonl")
        ),
        "ConfigError",
        "give either --text",
    ),
    Case(
        "predict with unpaired --text-pair",
        lambda t, e: predict(e, "--text", "a", "--text", "b", "--text-pair", "c"),
        "ConfigError",
        "2 --text but 1 --text-pair",
    ),
    Case(
        "predict with another backbone",
        lambda t, e: predict(e, "--text", "a film", "--backbone", e["other"]),
        "StoreMismatchError",
        "the side network was trained on hidden states of backbone",
    ),
    Case(
        "verify a store with a flipped byte",
        lambda t, e: ["verify", str(t / "corrupt"), "--samples", "0"],
        "StoreCorruptError",
        "hidden/1/c/0/0",
    ),
    # -- DVC params --------------------------------------------------------------------
    Case(
        "params.yaml with an unknown key",
        lambda t, e: stage(t, "tasks: [bbc]\ncache: {dtipe: int8}\n", "tasks"),
        "ParamsError",
        "unknown key(s) dtipe in `cache`",
    ),
    Case(
        "params.yaml that is not YAML",
        lambda t, e: stage(t, "tasks: [bbc\ncache: {\n", "tasks"),
        "ParamsError",
        "is not valid YAML",
    ),
    Case(
        "params.yaml naming an unknown task",
        lambda t, e: stage(t, "tasks: [nope]\n", "cache", "nope", "train"),
        "ParamsError",
        "task 'nope' is neither a key of `datasets`",
    ),
]


def nan_backbone(path: Path, word: str = "terrible") -> str:
    """A tiny BERT whose embedding of ``word`` is NaN: only samples holding it go non-finite."""
    import torch
    from transformers import AutoTokenizer, BertModel

    build_bert(path)
    model = BertModel.from_pretrained(path)
    ids = AutoTokenizer.from_pretrained(path)(word, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[ids] = float("nan")
    model.save_pretrained(path)
    return str(path)


def wide_bert(path: Path) -> str:
    """Like the tiny BERT but 48 wide: a store of another hidden size."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.backbone import resolve_source

    torch.manual_seed(3)
    cfg = BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64)  # fmt: skip
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_source("minilm")).save_pretrained(path)
    return str(path)


def flip_byte(store: Path, rel: str = "hidden/1/c/0/0", pos: int = 9) -> None:
    path = store / rel
    blob = bytearray(path.read_bytes())
    blob[pos] ^= 0x24
    path.write_bytes(bytes(blob))


def set_meta(store: Path, **changes: object) -> None:
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["sidecache"] = dict(group.attrs["sidecache"], **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, model_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    glue = root / "SST-2"
    glue.mkdir()
    rows = ["a fine film", "a dull film", "a terrible film", "a good plot"] * 3
    (glue / "train.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(rows))
    )
    (glue / "test.tsv").write_text("index\tsentence\n0\ta film\n")
    model, data = model_dir("bert"), f"glue:{glue}"
    other = build_bert(root / "other", seed=1)
    small_cache(model, data, root / "good")
    small_cache(model, data, root / "first", positions="first")
    small_cache(model, data, root / "layers02", layers="0,2")
    small_cache(other, data, root / "other-store")
    small_cache(wide_bert(root / "wide-model"), data, root / "wide")
    (root / "full").mkdir()
    (root / "full" / "notes.txt").write_text("keep me")
    zarr.open_group(str(root / "plain"), mode="w")
    for name in ("newer", "incomplete", "corrupt"):
        shutil.copytree(root / "good", root / name)
    set_meta(root / "newer", schema_version=99)
    set_meta(root / "incomplete", complete=False)
    flip_byte(root / "corrupt")
    (root / "empty-run").mkdir()
    good = str(root / "good")
    cfg = TrainConfig(good, good, ["linear"], 1, str(root / "run"), device="cpu", progress=False)
    run_train(cfg)
    return {
        "root": str(root),
        "model": model,
        "data": data,
        "other": other,
        "nan": nan_backbone(root / "nan"),
    }


def finished_runs(out: Path) -> list[Path]:
    return [p for p in out.glob("*/metrics.json") if json.loads(p.read_text()).get("finished")]


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
        out = Path(argv[argv.index("--out") + 1])
        if argv[0] == "cache" and out.name == "o":
            with pytest.raises((StoreError, FileNotFoundError)):
                open_store(out)
        if argv[0] == "train" and out.name == "r":
            assert not finished_runs(out)
        if argv[0] == "predict":
            assert not out.exists()
    if case.name == "non-empty output without --overwrite":
        assert (root / "full" / "notes.txt").read_text() == "keep me"
        assert before == json.dumps(sorted(str(p) for p in root.rglob("*")))
    if case.name == "resume a run folder trained on another store":
        state = json.loads((root / "run" / "linear" / "metrics.json").read_text())
        assert state["epochs"] == 1  # the earlier run is left as it was


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 30


def test_text_longer_than_the_model_limit_is_truncated_and_logged(
    env: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not an error: samples are cut to the backbone's limit (64 positions here, or
    --max-length) and the number of truncated samples is logged as a warning."""
    long_text = " ".join(["very"] * 200)
    data = csv_file(tmp_path, "long.csv", f"text,label\n{long_text},1\na film,0\n")
    with caplog.at_level(logging.WARNING):
        assert main(cache(env, tmp_path / "long", data=data)) == 0
    assert "1 of 2 samples were longer than 64 tokens and were truncated" in caplog.text
    reader = open_store(tmp_path / "long")
    assert reader.complete and int(reader.offsets[1]) == 64

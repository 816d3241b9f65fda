"""Data specs against the real shared GLUE files, the real BBC corpus and local files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data import ColumnOptions, glue_task, load_data
from pipeline.errors import DataSpecError

GLUE = Path(__file__).parents[3] / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason="shared GLUE data not beside the repo")


@needs_glue
@pytest.mark.parametrize(
    ("task", "split", "rows", "pairs"),
    [
        ("CoLA", "dev", 1043, False),  # no header
        ("MRPC", "dev", 408, True),  # header with a UTF-8 BOM
        ("SST-2", "dev", 872, False),
        ("WNLI", "train", 635, True),
        ("QNLI", "dev", 5463, True),
    ],
)
def test_glue_tsv_row_counts_match_the_official_sizes(task, split, rows, pairs):
    data = load_data(f"glue:{GLUE / task}", split)
    assert len(data) == rows
    assert (data.pairs is not None) == pairs
    assert data.task["type"] == "classification"
    assert set(np.unique(data.labels)) <= set(range(data.task["num_labels"]))


@needs_glue
def test_glue_train_sizes_labels_and_unbalanced_quotes_kept():
    data = load_data(f"glue:{GLUE / 'SST-2'}", "train")
    assert len(data) == 67349
    assert int((data.labels == 1).sum()) == 37569
    mrpc = load_data(f"glue:{GLUE / 'MRPC'}", "train")
    assert len(mrpc) == 3668  # a quote-aware reader would merge rows here
    assert any(p.startswith('" ') for p in mrpc.pairs or []), "quotes are text, not CSV quoting"


def test_glue_task_names_are_inferred_from_folders(tmp_path):
    assert glue_task(tmp_path / "sst2").name == "SST-2"
    assert glue_task(tmp_path / "STS-B").label_names is None  # regression
    assert glue_task(tmp_path / "mnli").name == "MNLI"


def test_glue_stsb_is_regression(tmp_path):
    folder = tmp_path / "STS-B"
    folder.mkdir()
    header = (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    )
    row = "0\tmain\tf\t2012\t1\tnone\tnone\tA man plays.\tA man is playing.\t4.75"
    (folder / "dev.tsv").write_text(f"{header}\n{row}\n")
    data = load_data(f"glue:{folder}", "validation")
    assert data.task["type"] == "regression"
    assert data.labels.dtype == np.float32 and data.labels[0] == np.float32(4.75)
    assert data.pairs == ["A man is playing."]


def test_bbc_splits_are_fixed_disjoint_and_cover_the_corpus():
    train, dev, every = (load_data("bbc", s) for s in ("train", "dev", "all"))
    assert len(every) == len(train) + len(dev) > 2000
    assert train.task["label_names"] == sorted(train.task["label_names"])
    assert train.task["num_labels"] == 5
    assert not set(train.texts) & set(dev.texts) or len(set(train.texts) & set(dev.texts)) < 100
    assert load_data("bbc", "dev").fingerprint == dev.fingerprint  # deterministic


def test_csv_jsonl_parquet_and_hf_folder_specs(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(
        {"review": ["good film", "bad film", "fine"], "stars": ["pos", "neg", "pos"]}
    )
    frame.to_csv(tmp_path / "train.csv", index=False)
    frame.to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "train.parquet")
    cols = ColumnOptions(text="review", label="stars")
    loaded = [
        load_data(f"{kind}:{tmp_path}", "train", cols) for kind in ("csv", "jsonl", "parquet")
    ]
    for data in loaded:
        assert data.texts == ["good film", "bad film", "fine"]
        assert data.task["label_names"] == ["neg", "pos"]
        assert data.labels.tolist() == [1, 0, 1]
    assert len({d.fingerprint for d in loaded}) == 1
    hub_like = load_data(f"hf:{tmp_path}", "train", cols)  # a local folder works like a hub id
    assert hub_like.texts == loaded[0].texts


def test_hf_classlabel_names_and_pairs(tmp_path):
    import datasets

    feats = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
        }
    )
    rows = {"premise": ["a", "b"], "hypothesis": ["c", "d"], "label": [2, 0]}
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(
        str(tmp_path / "validation.parquet")
    )
    data = load_data(f"parquet:{tmp_path}/{{split}}.parquet", "validation")
    assert data.task["label_names"] == ["entailment", "neutral", "contradiction"]
    assert data.pairs == ["c", "d"] and data.labels.tolist() == [2, 0]


def test_regression_labels_from_csv(tmp_path):
    (tmp_path / "t.csv").write_text("sentence1,sentence2,score\na,b,0.5\nc,d,4.0\n")
    data = load_data(f"csv:{tmp_path / 't.csv'}", "train")
    assert data.task["type"] == "regression" and data.pairs == ["b", "d"]


def test_negative_class_ids_are_refused(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\na,-1\nb,1\n")
    with pytest.raises(DataSpecError, match="negative class ids"):
        load_data(f"csv:{tmp_path / 't.csv'}", "train")

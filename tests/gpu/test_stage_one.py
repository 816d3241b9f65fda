"""Stage one on the device: every backbone family, positions mode and dtype; a store written
twice is the same; a run killed part-way resumes to the same store; NaN is refused."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import load_data
from pipeline.errors import NonFiniteError
from pipeline.extract import DeviceBatch, check_finite, gather, row_stats
from pipeline.verify import run_verify
from storage import open_store
from tests.conftest import small_cache, write_glue_sst2
from tests.gpu.conftest import build_poisoned_bert
from tests.pipeline.test_cache import assert_same_store, fail_at_batch
from tests.pipeline.test_kill_resume import FLAGS, cli, shards_done

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "int8"])
@pytest.mark.parametrize("positions", ["all", "first", "last", "mean"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5"])
def test_stage_one_on_the_device_is_recomputed_exactly_there(
    kind, positions, dtype, device, model_dir, glue_dir, tmp_path
):
    out = tmp_path / "s"
    summary = small_cache(model_dir(kind), f"glue:{glue_dir}", out, device=device,
                          positions=positions, dtype=dtype, limit=48)  # fmt: skip
    assert summary["complete"]
    reader = open_store(out)
    lay = reader.layout
    extraction = reader.identity["extraction"]
    assert extraction["device"] == torch.device(device).type
    assert extraction["autocast"] == ("bfloat16" if extraction["device"] == "cuda" else None)
    assert lay.n_samples == 48 and lay.positions == positions and lay.dtype == dtype
    assert lay.n_rows == (lay.n_tokens if positions == "all" else lay.n_samples)
    report = run_verify(str(out), samples=lay.n_samples, device=device)
    assert report["exact"] and report["inexact_reason"] is None
    assert report["mismatches"] == []
    errors = report["max_abs_error_vs_float32"]
    assert sorted(errors) == sorted(str(layer) for layer in lay.layers)
    assert all(np.isfinite(e) and e >= 0 for e in errors.values())
    if dtype == "float32":  # the very rows that were stored
        assert max(errors.values()) == 0.0


@pytest.mark.parametrize("positions", ["all", "mean"])
def test_a_store_written_twice_on_the_device_is_the_same(positions, device, model_dir, glue_dir,
                                                         tmp_path):  # fmt: skip
    model, data = model_dir("bert"), f"glue:{glue_dir}"
    for name in ("one", "two"):
        small_cache(model, data, tmp_path / name, device=device, positions=positions)
    assert_same_store(tmp_path / "one", tmp_path / "two")


def test_a_run_failing_mid_store_resumes_to_the_same_store(device, model_dir, glue_dir,
                                                           tmp_path, monkeypatch):  # fmt: skip
    model, data = model_dir("bert"), f"glue:{glue_dir}"
    settings = dict(device=device, token_budget=64, window_mb=0.05)
    small_cache(model, data, tmp_path / "ref", **settings)
    fail_at_batch(monkeypatch, 25)
    with pytest.raises(RuntimeError, match="injected"):
        small_cache(model, data, tmp_path / "cut", **settings)
    partial = open_store(tmp_path / "cut", allow_incomplete=True)
    assert not partial.complete
    done = np.isfinite(np.asarray(partial.group["progress"][...])).all(axis=(1, 2))
    assert 0 < done.sum() < len(done), "the failure should land between shards"
    monkeypatch.undo()  # the real extract_rows again
    small_cache(model, data, tmp_path / "cut", **settings)
    assert_same_store(tmp_path / "ref", tmp_path / "cut")


def test_a_sigkilled_device_run_resumes_to_the_same_store(device, model_dir, tmp_path):
    # GLUE files: read without the datasets package (the device check does not carry it)
    glue = write_glue_sst2(tmp_path / "data", n_train=3000)
    model, data, out = model_dir("bert"), f"glue:{glue}", tmp_path / "killed"
    args = ["--backbone", model, "--data", data, "--out", str(out), "--device", device, *FLAGS,
            "--no-progress"]  # fmt: skip
    env, root = dict(os.environ, SIDECACHE_LOG="WARNING"), Path(__file__).parents[2]
    proc = subprocess.Popen(cli(*args), env=env, cwd=root)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and shards_done(out) == 0:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "stage one finished before it could be killed"
    assert not open_store(out, allow_incomplete=True).complete
    assert subprocess.run(cli(*args), env=env, cwd=root).returncode == 0
    small_cache(model, data, tmp_path / "ref", device=device, token_budget=128, window_mb=0.1,
                chunk_mb=0.015, shard_chunks=2)  # fmt: skip
    assert_same_store(tmp_path / "ref", out)


@pytest.mark.parametrize("positions", ["all", "first", "last", "mean"])
def test_nan_hidden_states_are_refused_naming_layer_and_sample(positions, device, glue_dir,
                                                               tmp_path):  # fmt: skip
    model = build_poisoned_bert(tmp_path / "poisoned", "cat")
    with pytest.raises(NonFiniteError, match="NaN/inf at layer") as err:
        small_cache(model, f"glue:{glue_dir}", tmp_path / "s", device=device, positions=positions)
    found = re.search(r"at layer (\d+) for sample (\d+)", str(err.value))
    assert found is not None, str(err.value)
    layer, sample = int(found[1]), int(found[2])
    # the poisoned token's own row is NaN at the embeddings; attention spreads it to the rest
    assert layer == (0 if positions in ("all", "mean") else 1)
    assert "cat" in load_data(f"glue:{glue_dir}", "train").texts[sample].split()


@pytest.mark.parametrize("positions", ["all", "first", "last", "mean"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_names_the_sample_from_device_tensors(positions, bad, device):
    lengths = [3, 1, 2]
    mask = torch.tensor([[1] * n + [0] * (3 - n) for n in lengths], device=device)
    batch = DeviceBatch(np.array([10, 11, 12]), mask * 5, mask, None,
                        torch.tensor(lengths, device=device))  # fmt: skip
    h = torch.randn(3, 3, 4, device=device)
    check_finite(row_stats(gather(h, batch, positions)), 4, batch, positions)
    h[2, 0, 0] = bad  # sample 12: its first token, so every positions mode sees it except last
    h[2, 1, 1] = bad  # and its last token
    with pytest.raises(NonFiniteError, match="layer 4 for sample 12"):
        check_finite(row_stats(gather(h, batch, positions)), 4, batch, positions)

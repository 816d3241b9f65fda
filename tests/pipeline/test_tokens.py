"""The batch plan: every sample once, budgets kept, deterministic, little padding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.tokens import PlanSettings, padding_fraction, plan_batches


@pytest.mark.parametrize("batch_cost", [None, 0, 64])
@pytest.mark.parametrize("window_rows", [1, 50, 10_000])
def test_plan_covers_every_sample_once_within_budget(window_rows, batch_cost):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=2000)
    settings = PlanSettings(token_budget=512, max_batch=32, window_rows=window_rows,
                            batch_cost=batch_cost)  # fmt: skip
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


@pytest.mark.parametrize("batch_cost", [None, 64])
def test_oversized_sample_gets_its_own_batch(batch_cost):
    lengths = np.array([5, 900, 5])
    batches = plan_batches(lengths, lengths, PlanSettings(512, 8, 100, batch_cost=batch_cost))
    assert [1] in [b.tolist() for b in batches]


def _cost(batches: list[np.ndarray], lengths: np.ndarray, per_batch: int) -> int:
    return sum(per_batch + len(b) * int(lengths[b].max()) for b in batches)


def _cheapest_by_search(lengths: np.ndarray, budget: int, cap: int, per_batch: int) -> int:
    """Least cost over every way of cutting the sorted lengths, by exhaustive recursion."""
    s = np.sort(lengths)

    def best(i: int) -> int:
        if i == len(s):
            return 0
        options = []
        for j in range(i + 1, len(s) + 1):
            size = j - i
            if size > 1 and (size > cap or size * s[j - 1] > budget):
                break
            options.append(per_batch + size * int(s[j - 1]) + best(j))
        return min(options)

    return best(0)


@pytest.mark.parametrize("seed", range(6))
def test_batch_cost_plan_is_the_cheapest_cut(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 40, size=11)
    per_batch = int(rng.choice([0, 8, 64]))
    settings = PlanSettings(120, 5, 10_000, batch_cost=per_batch)
    batches = plan_batches(lengths, lengths, settings)
    assert _cost(batches, lengths, per_batch) == _cheapest_by_search(lengths, 120, 5, per_batch)
    greedy = plan_batches(lengths, lengths, PlanSettings(120, 5, 10_000))
    assert _cost(batches, lengths, per_batch) <= _cost(greedy, lengths, per_batch)


def _cut_cheapest_plainly(order: np.ndarray, lengths: np.ndarray, budget: int, cap: int,
                          per_batch: int) -> list[list[int]]:  # fmt: skip
    """The batch-cost programme written the plain way (gather every candidate start), as
    :func:`plan_batches` once computed it: a store planned that way resumes with the same plan."""
    s = lengths[order].astype(np.int64)
    best, start = np.zeros(len(s) + 1, np.int64), np.zeros(len(s) + 1, np.int64)
    for i in range(1, len(s) + 1):
        size = min(cap, max(1, budget // max(1, int(s[i - 1]))), i)
        firsts = np.arange(i - size, i)
        cost = best[firsts] + (i - firsts) * int(s[i - 1])
        k = int(np.argmin(cost))
        best[i], start[i] = cost[k] + per_batch, firsts[k]
    ends = [len(s)]
    while ends[-1] > 0:
        ends.append(int(start[ends[-1]]))
    return [order[a:b].tolist() for a, b in itertools.pairwise(ends[::-1])]


@pytest.mark.parametrize("seed", range(8))
def test_batch_cost_plan_is_the_same_as_the_plain_programme(seed):
    """Resuming a store re-plans its batches: the plan must not change, ties included (few
    distinct lengths, so many cuts cost the same)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    lengths = rng.choice(rng.integers(1, 90, size=int(rng.integers(1, 40))), size=n)
    budget, cap = int(rng.choice([64, 512, 4096])), int(rng.choice([1, 7, 256]))
    per_batch = int(rng.choice([0, 1, 64, 500]))
    settings = PlanSettings(budget, cap, 1 << 20, batch_cost=per_batch)
    order = np.argsort(lengths, kind="stable")
    planned = [b.tolist() for b in plan_batches(lengths, lengths, settings)]
    assert planned == _cut_cheapest_plainly(order, lengths, budget, cap, per_batch)


def test_batch_cost_cuts_padding_of_a_small_dataset():
    """500 samples fill only a few budget-sized batches, each spanning a wide length range."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(4, 40, size=500)
    greedy = plan_batches(lengths, lengths, PlanSettings(4096, 256, 1 << 20))
    costed = plan_batches(lengths, lengths, PlanSettings(4096, 256, 1 << 20, batch_cost=64))
    assert padding_fraction(greedy, lengths) > 0.2
    assert padding_fraction(costed, lengths) < 0.1
    assert _cost(costed, lengths, 64) < _cost(greedy, lengths, 64)


def test_plan_settings_round_trip_through_the_recorded_extraction():
    settings = PlanSettings(4096, 256, 1000, aligned=True, batch_cost=64)
    ex = {"token_budget": 4096, "max_batch": 256, "window_rows": 1000, "windows": "aligned",
          "batch_cost": 64}  # fmt: skip
    assert PlanSettings.from_extraction(ex) == settings
    del ex["batch_cost"]  # a store written before the setting: the budget-filling cut
    assert PlanSettings.from_extraction(ex).batch_cost is None

"""SIGKILL stage one and stage two at random points, resume, and compare with unbroken runs.

The fast tests kill a few times; ``-m slow`` runs more kills; ``python -m benchmarks.faults``
runs the full 20 + 10 and prints the summary reported in BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.faults import make_workload, stage_one_kills, stage_two_kills, summary


def check(result: dict, kills: int) -> None:
    report = summary(result)
    assert report["kills"] == kills and report["survived"] == kills, report["failures"]


def test_stage_one_and_two_survive_a_few_kills(model_dir, tmp_path: Path) -> None:
    work = make_workload(tmp_path, samples=600, model=model_dir("bert"))
    work.dev_args = []  # evaluate on the training store: one subprocess fewer
    check(stage_one_kills(work, tmp_path, kills=2, seed=3), 2)
    check(stage_two_kills(work, tmp_path, tmp_path / "ref", kills=1, seed=3, epochs=2), 1)


@pytest.mark.slow
def test_stage_one_and_two_survive_many_kills(model_dir, tmp_path: Path) -> None:
    work = make_workload(tmp_path, samples=1000, model=model_dir("bert"))
    check(stage_one_kills(work, tmp_path, kills=8, seed=11), 8)
    check(stage_two_kills(work, tmp_path, tmp_path / "ref", kills=4, seed=11), 4)

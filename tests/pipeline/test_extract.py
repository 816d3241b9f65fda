"""Gather, finiteness and stats on the device side of stage one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import NonFiniteError
from pipeline.extract import DeviceBatch, check_finite, gather, row_stats


def batch_of(lengths: list[int]) -> DeviceBatch:
    t = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (t - n) for n in lengths])
    return DeviceBatch(np.array([10, 11, 12]), mask * 5, mask, None, torch.tensor(lengths))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_name_the_layer_and_sample(bad):
    batch = batch_of([3, 1, 2])
    h = torch.randn(3, 3, 4)
    h[2, 1, 0] = bad  # sample 12, its second token
    rows = gather(h, batch, "all")
    with pytest.raises(NonFiniteError, match="layer 4 for sample 12"):
        check_finite(row_stats(rows), 4, batch, "all")
    h[2, 1, 0] = 0.0
    check_finite(row_stats(gather(h, batch, "all")), 4, batch, "all")


def test_gather_positions():
    batch = batch_of([3, 1, 2])
    h = torch.arange(3 * 3 * 2, dtype=torch.float32).view(3, 3, 2)
    assert gather(h, batch, "all").shape == (6, 2)
    assert torch.equal(gather(h, batch, "first"), h[:, 0])
    assert torch.equal(gather(h, batch, "last"), torch.stack([h[0, 2], h[1, 0], h[2, 1]]))
    assert torch.allclose(gather(h, batch, "mean")[0], h[0].mean(0))

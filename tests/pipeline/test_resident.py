"""A store resident on the training device serves the host loader's batches, value for value
(here on the CPU; the GPU tier runs the same on CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.holdout import holdout_samples
from pipeline.loader import StoreLoader
from pipeline.resident import ResidentLoader, resident_bytes
from storage import open_store
from tests.conftest import small_cache


@pytest.fixture(scope="module", params=["bfloat16", "int8", "float16"])
def store(request, model_dir, glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("res") / request.param
    small_cache(model_dir("bert"), f"glue:{glue_dir}", out, dtype=request.param)
    return str(out)


@pytest.mark.parametrize("shuffle", [True, False])
def test_resident_batches_equal_the_host_loaders(store, shuffle):
    reader = open_store(store)
    host = StoreLoader(reader, 7, shuffle=shuffle, seed=3, ram_budget=0, pool_bytes=1 << 16)
    resident = ResidentLoader(host, torch.device("cpu"))
    held = [t for t in (resident.rows, resident.scales) if t is not None]
    assert resident_bytes(host) == sum(t.numel() * t.element_size() for t in held)
    for epoch in (0, 1):
        got, want = list(resident.epoch(epoch)), list(host.epoch(epoch))
        assert len(got) == len(want) == len(host)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g.samples, w.samples) and torch.equal(g.lengths, w.lengths)
            assert torch.equal(g.labels, w.labels) and torch.equal(g.hidden, w.hidden)


def test_plan_is_what_the_host_loader_serves(store):
    reader = open_store(store)
    for ram in (0, 1 << 30):  # streamed and in RAM
        loader = StoreLoader(reader, 5, shuffle=True, seed=1, ram_budget=ram, pool_bytes=1 << 16)
        planned = [cut.tolist() for _, cuts in loader.plan(2) for cut in cuts]
        assert planned == [b.samples.tolist() for b in loader.epoch(2)]


def test_held_out_subsets_share_one_resident_copy_and_serve_the_host_batches(store):
    """``--valid-fraction`` builds two loaders over the train store: on the device they share
    one copy of its rows, and each serves its host loader's batches."""
    reader = open_store(store)
    n = reader.layout.n_samples
    held = holdout_samples(n, 0.3)
    fit = np.setdiff1d(np.arange(n), held)
    hosts = [StoreLoader(reader, 7, shuffle=s, seed=3, ram_budget=0, pool_bytes=1 << 16,
                         samples=ids) for ids, s in ((fit, True), (held, False))]  # fmt: skip
    first = ResidentLoader(hosts[0], torch.device("cpu"))
    second = ResidentLoader(hosts[1], torch.device("cpu"), first)
    assert second.rows is first.rows
    for host, resident in zip(hosts, (first, second), strict=True):
        for g, w in zip(resident.epoch(1), host.epoch(1), strict=True):
            assert torch.equal(g.samples, w.samples) and torch.equal(g.hidden, w.hidden)

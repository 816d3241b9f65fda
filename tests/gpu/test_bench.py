"""``bench`` on the device: a cached run reports its peak GPU memory and its GPU energy (a number
of joules, or "unavailable" where NVML has no energy counter), and the table carries both."""

from __future__ import annotations

import json
import numbers

import pytest
import torch

from pipeline.bench import BenchConfig, plan_jobs, summarise, to_markdown
from pipeline.bench.worker import worker

pytestmark = pytest.mark.gpu


def test_a_cached_run_reports_gpu_memory_and_energy(device, device_stores, tmp_path):
    cfg = BenchConfig(backbone=device_stores["model"], data=device_stores["data"],
                      out=str(tmp_path), methods=["cached:linear"], seeds=[0], epochs=1,
                      batch_size=16, device=device)  # fmt: skip
    job = next(j for j in plan_jobs(cfg, tmp_path) if j["kind"] == "cached")
    job["stores"] = {"train": device_stores["train"], "dev": device_stores["dev"]}
    job["result"] = str(tmp_path / "result.json")
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert worker(str(tmp_path / "job.json")) == 0  # in this process, not a subprocess
    result = json.loads((tmp_path / "result.json").read_text())
    costs = result["costs"]
    on_cuda = torch.device(device).type == "cuda"
    assert {"gpu_peak_bytes", "gpu_energy_j"} <= set(costs)
    if on_cuda:
        assert isinstance(costs["gpu_peak_bytes"], int) and costs["gpu_peak_bytes"] > 0
    else:
        assert costs["gpu_peak_bytes"] is None and costs["gpu_energy_j"] is None
    energy = costs["gpu_energy_j"]
    assert energy is None or (isinstance(energy, numbers.Real) and energy >= 0)

    record = {**{k: job[k] for k in ("kind", "name", "method", "spec", "seed")}, **result,
              "others_cpu_s": 0.0, "load_before": 0.0, "load_after": 0.0}  # fmt: skip
    report = summarise(cfg, [record])
    row = report["table"][0]
    assert row["runs"] == 1 and not row["failed"]
    assert row["peak_kind"] == ("gpu_allocated" if on_cuda else "rss")
    assert row["peak_mb_above_idle"] > 0
    shown = row["gpu_energy_j"]
    assert shown == "unavailable" or (isinstance(shown, numbers.Real) and shown >= 0)
    assert (shown == "unavailable") == (energy is None)
    assert "GPU energy J" in to_markdown(report)

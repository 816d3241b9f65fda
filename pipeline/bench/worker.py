"""One bench job in its own process: run it, measure its costs, write the result file.

``python -m pipeline.bench.worker JOB.json``: the parent (:mod:`pipeline.bench.runner`) starts
one per job, so the peak memory of one method never mixes with another's.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.config import BenchConfig
from pipeline.logs import configure_logging


def _vmhwm() -> int:
    """Peak resident set of this process in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _gpu_energy_mj(device: torch.device | None) -> int | None:
    """Total energy of ``device`` since the driver loaded (mJ), or None without a GPU, NVML
    (``nvidia-ml-py``) or an energy counter. NVML numbers GPUs physically, ignoring
    ``CUDA_VISIBLE_DEVICES``: the GPU is found by its UUID, which both sides share."""
    if device is None or device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = f"GPU-{torch.cuda.get_device_properties(device).uuid}"
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    except Exception:  # no pynvml, no driver, or a GPU without an energy counter
        return None


def _job_cache(job: dict[str, Any]) -> dict[str, Any]:
    from pipeline.cache import CacheConfig, run_cache

    cfg, out = BenchConfig(**job["config"]), {}
    for split, limit in (("train", cfg.limit), (cfg.eval_split, cfg.eval_limit)):
        summary = run_cache(
            CacheConfig(
                backbone=cfg.backbone,
                data=cfg.data,
                split=split,
                out=job["stores"][split],
                dtype=cfg.dtype,
                positions=cfg.positions,
                chunk_mb=cfg.chunk_mb,
                max_length=cfg.max_length,
                device=cfg.device,
                limit=limit,
                overwrite=True,
                progress=False,
            )
        )
        out[split] = {k: summary.get(k) for k in ("samples", "tokens", "bytes_on_disk")}
    return {"stores": out}


def _job_cached(job: dict[str, Any]) -> dict[str, Any]:
    from pipeline.train import TrainConfig, run_train

    cfg = BenchConfig(**job["config"])
    results = run_train(
        TrainConfig(
            train=job["stores"]["train"],
            eval=job["stores"][cfg.eval_split],
            specs=[job["spec"]],
            epochs=cfg.epochs,
            out=job["out"],
            batch_size=cfg.batch_size,
            seed=job["seed"],
            device=cfg.device,
            ram_budget_mb=cfg.ram_budget_mb,
            pool_mb=cfg.pool_mb,
            low_memory=cfg.low_memory,
            micro_rows=cfg.micro_rows,
            threads=cfg.threads,
            valid_fraction=cfg.valid_fraction,
            progress=False,
        )
    )
    return next(iter(results.values()))


def _job_online(job: dict[str, Any]) -> dict[str, Any]:
    from pipeline.online import OnlineConfig, run_online

    cfg = BenchConfig(**job["config"])
    return run_online(
        OnlineConfig(
            backbone=cfg.backbone,
            data=cfg.data,
            spec=job["spec"],
            epochs=cfg.epochs,
            out=job["out"],
            batch_size=cfg.batch_size,
            seed=job["seed"],
            device=cfg.device,
            limit=cfg.limit,
            eval_limit=cfg.eval_limit,
            max_length=cfg.max_length,
            dtype=cfg.dtype,
            eval_split=cfg.eval_split,
            valid_fraction=cfg.valid_fraction,
            progress=False,
        )
    )


JOBS = {"idle": lambda job: {}, "cache": _job_cache, "cached": _job_cached, "online": _job_online}


def worker(job_path: str) -> int:
    """Run one job and write its result (with its costs) next to the job file."""
    from pipeline.backbone import pick_device  # torch only; transformers is never imported

    configure_logging()  # into the job's log file: each epoch's line shows how far it got
    job = json.loads(Path(job_path).read_text())
    device = pick_device(job["config"]["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    energy0, wall0, cpu0 = _gpu_energy_mj(device), time.perf_counter(), _cpu_seconds()
    payload = JOBS[job["kind"]](job)
    energy1 = _gpu_energy_mj(device)
    costs = {
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": _cpu_seconds() - cpu0,
        "peak_rss_bytes": _vmhwm(),
        "gpu_peak_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "gpu_energy_j": None if energy0 is None or energy1 is None else (energy1 - energy0) / 1e3,
        # stage two sets its own thread count and restores the caller's when it returns
        "torch_threads": payload.get("torch_threads", torch.get_num_threads()),
    }
    Path(job["result"]).write_text(json.dumps({"payload": payload, "costs": costs}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))

"""The parent of ``sidecache bench``: plan the jobs, run each in a fresh subprocess, tabulate."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.bench.config import BenchConfig, split_method
from pipeline.bench.report import summarise, to_markdown
from pipeline.errors import ConfigError
from storage import parse_positions

log = logging.getLogger(__name__)


def _busy_seconds() -> float:
    """CPU time every process of the machine has used since boot (``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def plan_jobs(cfg: BenchConfig, root: Path) -> list[dict[str, Any]]:
    methods = [split_method(m) for m in cfg.methods]
    stores = {s: str(root / "stores" / s) for s in ("train", cfg.eval_split)}
    base = {"config": asdict(cfg), "stores": stores}
    jobs: list[dict[str, Any]] = [{"kind": "idle", "name": "idle-0", **base}]
    if any(mode == "cached" for mode, _ in methods):
        jobs.append({"kind": "cache", "name": "stage-one", **base})
    for i, seed in enumerate(cfg.seeds):
        for k in range(len(methods)):  # rotate the order each seed
            mode, spec = methods[(k + i) % len(methods)]
            method = cfg.methods[(k + i) % len(methods)]
            name = f"{method.replace(':', '-').replace(',', '_')}-s{seed}"
            jobs.append(
                {
                    "kind": mode,
                    "name": name,
                    "method": method,
                    "spec": spec,
                    "seed": seed,
                    "out": str(root / "runs" / name),
                    **base,
                }
            )
    jobs.append({"kind": "idle", "name": "idle-1", **base})
    return jobs


def run_job(job: dict[str, Any], root: Path) -> dict[str, Any]:
    folder = root / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    job_path, job["result"] = (
        folder / f"{job['name']}.json",
        str(folder / f"{job['name']}.out.json"),
    )
    job_path.write_text(json.dumps(job))
    busy0, wall0, load0 = _busy_seconds(), time.perf_counter(), os.getloadavg()[0]
    with (folder / f"{job['name']}.log").open("w") as logf:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.bench.worker", str(job_path)],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    wall = time.perf_counter() - wall0
    record = {k: job.get(k) for k in ("kind", "name", "method", "spec", "seed")}
    record.update(returncode=done.returncode, load_before=load0, load_after=os.getloadavg()[0])
    if done.returncode != 0 or not Path(job["result"]).is_file():
        log.error(
            "%s failed (exit %d); see %s",
            job["name"],
            done.returncode,
            folder / f"{job['name']}.log",
        )
        return record
    result = json.loads(Path(job["result"]).read_text())
    record.update(result)
    record["others_cpu_s"] = max(0.0, _busy_seconds() - busy0 - result["costs"]["cpu_s"])
    record["subprocess_wall_s"] = wall
    c = result["costs"]
    log.info(
        "%s: wall %.1f s, CPU %.1f s, peak RSS %.0f MB, others' CPU %.1f s",
        job["name"],
        c["wall_s"],
        c["cpu_s"],
        c["peak_rss_bytes"] / 1e6,
        record["others_cpu_s"],
    )
    return record


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run every job, write ``bench.json``, ``bench.csv`` and ``bench.md`` under ``cfg.out``."""
    if cfg.epochs < 1 or not cfg.seeds or not cfg.methods:
        raise ConfigError("bench needs --epochs >= 1, at least one --seeds and one --methods")
    parse_positions(cfg.positions)  # before any job runs
    if cfg.chunk_mb <= 0:
        raise ConfigError(f"--chunk-mb must be positive; found {cfg.chunk_mb}")
    if not 0.0 <= cfg.valid_fraction < 1.0:
        raise ConfigError(
            "--valid-fraction: expected a share of the training samples, at least 0 and below 1; "
            f"found {cfg.valid_fraction}"
        )
    from pipeline.train import check_micro_rows  # the parent only: idle workers stay lean

    check_micro_rows(cfg.micro_rows)
    root = Path(cfg.out)
    jobs = plan_jobs(cfg, root)
    log.info(
        "bench: %d jobs (%d methods x %d seeds), results in %s; each job logs its epochs to "
        "%s/NAME.log",
        len(jobs),
        len(cfg.methods),
        len(cfg.seeds),
        root,
        root / "jobs",
    )
    records = [run_job(job, root) for job in jobs]
    report = summarise(cfg, records)
    (root / "bench.json").write_text(json.dumps(report, indent=2, default=str))
    with (root / "bench.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(report["table"][0]))
        w.writeheader()
        w.writerows(report["table"])
    (root / "bench.md").write_text(to_markdown(report))
    return report

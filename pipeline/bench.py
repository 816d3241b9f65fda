"""``sidecache bench``: cached side networks and online baselines, side by side, on one task.

Every measured unit runs in a fresh subprocess (``sidecache bench --worker JOB.json``), so the
peak memory of one method never mixes with another's:

* ``idle`` — the worker with torch imported and nothing run: the memory baseline (run first and
  last; the smaller peak is used);
* ``cache`` — stage one over the train and eval splits (once; a fresh store every bench run);
* ``cached`` — stage two for one side network and one seed (``sidecache train`` with one spec);
* ``online`` — :func:`pipeline.online.run_online` for one method and one seed.

Methods are run interleaved (seed by seed, the method order rotated each seed) so that a change
of machine load hits every method alike. Per run the worker reports wall time and CPU-seconds
(its own user + system time) from the start of the job, after the interpreter and torch are
loaded; peak memory (CPU: ``VmHWM`` of ``/proc/self/status``, the peak resident set; GPU:
``torch.cuda.max_memory_allocated``); GPU energy from NVML when ``pynvml`` and a GPU are there,
else ``unavailable``. The parent also records the CPU time the *other* processes of the machine
used during each run (``/proc/stat``), to say how loaded the machine was.

The table: score mean ± std over seeds (best epoch and final epoch), trainable parameters, median
peak memory above idle, wall time and CPU-seconds; for cached methods the one-off stage-one cost
separately and amortised over every side network trained from that store in this bench run.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError
from storage import parse_positions

log = logging.getLogger(__name__)
MB = 1e6
DEFAULT_METHODS = [
    "cached:read",
    "cached:lst",
    "cached:linear",
    "cached:mlp",
    "online:read",
    "online:lst",
    "online:full",
    "online:lora",
    "online:meft",
]


@dataclass
class BenchConfig:
    backbone: str
    data: str
    out: str
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 3
    batch_size: int = 32
    limit: int | None = None  # first N training samples
    eval_limit: int | None = None
    eval_split: str = "dev"
    max_length: int | None = 128
    dtype: str = "bfloat16"  # the store's dtype; online READ/LST round to it too
    positions: str = "all"  # the stores' positions (first/last: single-position side networks)
    chunk_mb: float = 4.0  # the stores' chunk size: the streaming loader's unit of decoding
    device: str = "auto"
    ram_budget_mb: int = 4096  # cached runs: stores up to this size are held in RAM
    pool_mb: int = 512  # cached runs: the loader's budget for stored rows (sidecache train)
    low_memory: bool = False  # cached runs: ``sidecache train --low-memory``
    micro_rows: int = 0  # cached runs: ``sidecache train --micro-rows``
    threads: int = 0  # cached runs: ``sidecache train --threads`` (0: half the cores)


def split_method(text: str) -> tuple[str, str]:
    """``cached:read:hidden=64`` -> ``("cached", "read:hidden=64")``; validated."""
    mode, _, spec = text.partition(":")
    if mode not in ("cached", "online") or not spec:
        raise ConfigError(
            f"--methods: expected cached:KIND[...] or online:KIND[...]; found {text!r}"
        )
    if mode == "cached":
        from pipeline.sidenets import parse_spec

        parse_spec(spec)
    else:
        from pipeline.online.methods import parse_method

        parse_method(spec)
    return mode, spec


# ---------------------------------------------------------------- worker (one subprocess per job)


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


def _nvml_energy_mj() -> int | None:
    """Total energy of GPU 0 since the driver loaded (mJ), or None without NVML or a GPU."""
    if not torch.cuda.is_available():
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(0)))
    except Exception:  # no pynvml, or a GPU without an energy counter
        return None


def _job_cache(job: dict[str, Any]) -> dict[str, Any]:
    from pipeline.cache import CacheConfig, run_cache

    cfg, out = job["config"], {}
    for split, limit in (("train", cfg["limit"]), (cfg["eval_split"], cfg["eval_limit"])):
        summary = run_cache(
            CacheConfig(
                backbone=cfg["backbone"],
                data=cfg["data"],
                split=split,
                out=job["stores"][split],
                dtype=cfg["dtype"],
                positions=cfg.get("positions", "all"),
                chunk_mb=cfg.get("chunk_mb", 4.0),
                max_length=cfg["max_length"],
                device=cfg["device"],
                limit=limit,
                overwrite=True,
                progress=False,
            )
        )
        out[split] = {k: summary.get(k) for k in ("samples", "tokens", "bytes_on_disk")}
    return {"stores": out}


def _job_cached(job: dict[str, Any]) -> dict[str, Any]:
    from pipeline.train import TrainConfig, run_train

    cfg = job["config"]
    results = run_train(
        TrainConfig(
            train=job["stores"]["train"],
            eval=job["stores"][cfg["eval_split"]],
            specs=[job["spec"]],
            epochs=cfg["epochs"],
            out=job["out"],
            batch_size=cfg["batch_size"],
            seed=job["seed"],
            device=cfg["device"],
            ram_budget_mb=cfg["ram_budget_mb"],
            pool_mb=cfg.get("pool_mb", 512),
            low_memory=cfg.get("low_memory", False),
            micro_rows=cfg.get("micro_rows", 0),
            threads=cfg.get("threads", 0),
            progress=False,
        )
    )
    return next(iter(results.values()))


def _job_online(job: dict[str, Any]) -> dict[str, Any]:
    from pipeline.online import OnlineConfig, run_online

    cfg = job["config"]
    return run_online(
        OnlineConfig(
            backbone=cfg["backbone"],
            data=cfg["data"],
            spec=job["spec"],
            epochs=cfg["epochs"],
            out=job["out"],
            batch_size=cfg["batch_size"],
            seed=job["seed"],
            device=cfg["device"],
            limit=cfg["limit"],
            eval_limit=cfg["eval_limit"],
            max_length=cfg["max_length"],
            dtype=cfg["dtype"],
            eval_split=cfg["eval_split"],
            progress=False,
        )
    )


JOBS = {"idle": lambda job: {}, "cache": _job_cache, "cached": _job_cached, "online": _job_online}


def worker(job_path: str) -> int:
    """Run one job and write its result (with its costs) next to the job file."""
    job = json.loads(Path(job_path).read_text())
    cuda = torch.cuda.is_available() and job["config"]["device"] != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    energy0, wall0, cpu0 = _nvml_energy_mj(), time.perf_counter(), _cpu_seconds()
    payload = JOBS[job["kind"]](job)
    energy1 = _nvml_energy_mj()
    costs = {
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": _cpu_seconds() - cpu0,
        "peak_rss_bytes": _vmhwm(),
        "gpu_peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "gpu_energy_j": None if energy0 is None or energy1 is None else (energy1 - energy0) / 1e3,
        # stage two sets its own thread count and restores the caller's when it returns
        "torch_threads": payload.get("torch_threads", torch.get_num_threads()),
    }
    Path(job["result"]).write_text(json.dumps({"payload": payload, "costs": costs}, default=str))
    return 0


# ---------------------------------------------------------------- parent: plan, run, tabulate


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
    env = dict(os.environ, SIDECACHE_LOG=os.environ.get("SIDECACHE_LOG", "WARNING"))
    with (folder / f"{job['name']}.log").open("w") as logf:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "bench", "--worker", str(job_path)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
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
    from pipeline.train import check_micro_rows  # the parent only: idle workers stay lean

    check_micro_rows(cfg.micro_rows)
    root = Path(cfg.out)
    jobs = plan_jobs(cfg, root)
    log.info(
        "bench: %d jobs (%d methods x %d seeds), results in %s",
        len(jobs),
        len(cfg.methods),
        len(cfg.seeds),
        root,
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


# ---------------------------------------------------------------- the table and the ratios


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _peak(r: dict[str, Any]) -> float:
    c = r["costs"]
    return float(c["gpu_peak_bytes"] if c["gpu_peak_bytes"] is not None else c["peak_rss_bytes"])


def method_row(
    method: str,
    runs: list[dict[str, Any]],
    idle: float,
    stage_one: dict[str, Any] | None,
    n_cached: int,
) -> dict[str, Any]:
    ok = [r for r in runs if "payload" in r]
    best = [r["payload"]["eval"]["best"]["score"] for r in ok]
    final = [r["payload"]["eval"]["final"]["score"] for r in ok]
    gpu = bool(ok) and ok[0]["costs"]["gpu_peak_bytes"] is not None
    energy = [r["costs"]["gpu_energy_j"] for r in ok if r["costs"]["gpu_energy_j"] is not None]
    row: dict[str, Any] = {
        "method": method,
        "runs": len(ok),
        "failed": len(runs) - len(ok),
        "score_best_mean": _mean_std(best)[0],
        "score_best_std": _mean_std(best)[1],
        "score_final_mean": _mean_std(final)[0],
        "score_final_std": _mean_std(final)[1],
        "trainable_params": ok[0]["payload"]["trainable_params"] if ok else None,
        "peak_mb_above_idle": _median([(_peak(r) - (0 if gpu else idle)) / MB for r in ok]),
        "peak_kind": "gpu_allocated" if gpu else "rss",
        "wall_s": _median([r["costs"]["wall_s"] for r in ok]),
        "cpu_s": _median([r["costs"]["cpu_s"] for r in ok]),
        "others_cpu_s": _median([r["others_cpu_s"] for r in ok]),
        "gpu_energy_j": _median(energy) if energy else "unavailable",
        "stage_one_wall_s": None,
        "stage_one_cpu_s": None,
        "amortised_wall_s": None,
        "amortised_cpu_s": None,
    }
    if method.startswith("cached:") and stage_one is not None and ok and n_cached:
        s1 = stage_one["costs"]
        row.update(
            stage_one_wall_s=s1["wall_s"],
            stage_one_cpu_s=s1["cpu_s"],
            amortised_wall_s=row["wall_s"] + s1["wall_s"] / n_cached,
            amortised_cpu_s=row["cpu_s"] + s1["cpu_s"] / n_cached,
        )
    return row


def ratios(rows: dict[str, dict[str, Any]], stage_one: dict[str, Any] | None) -> dict[str, Any]:
    """The headline figures, where the bench ran the methods they need: for every cached READ,
    against online READ of the same spec and against the first full fine-tuning. Keys name the
    spec unless it is plain ``read``."""
    out: dict[str, Any] = {}
    if stage_one is None:
        return out
    s1 = stage_one["costs"]
    full = next((r for m, r in rows.items() if m.split(":")[:2] == ["online", "full"]), None)
    for method, read in rows.items():
        mode, _, spec = method.partition(":")
        if mode != "cached" or spec.split(":")[0] != "read" or read["wall_s"] is None:
            continue
        tag = "" if spec == "read" else f" ({spec})"
        alone_wall, alone_cpu = s1["wall_s"] + read["wall_s"], s1["cpu_s"] + read["cpu_s"]
        online_read = rows.get(f"online:{spec}")
        if online_read and online_read["wall_s"]:
            out["cache_plus_read_over_online_read_wall" + tag] = alone_wall / online_read["wall_s"]
            out["cache_plus_read_over_online_read_cpu" + tag] = alone_cpu / online_read["cpu_s"]
            out["score_final_cached_read" + tag] = read["score_final_mean"], read["score_final_std"]
            out["score_final_online_read" + tag] = (
                online_read["score_final_mean"],
                online_read["score_final_std"],
            )
        if full and full["wall_s"]:
            out["cache_plus_read_over_full_ft_cpu" + tag] = alone_cpu / full["cpu_s"]
            out["cache_plus_read_over_full_ft_wall" + tag] = alone_wall / full["wall_s"]
            if full["peak_mb_above_idle"]:
                out["peak_cached_read_over_full_ft" + tag] = (
                    read["peak_mb_above_idle"] / full["peak_mb_above_idle"]
                )
    return out


def summarise(cfg: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    idles = [r["costs"]["peak_rss_bytes"] for r in records if r["kind"] == "idle" and "costs" in r]
    idle = float(min(idles)) if idles else 0.0
    stage_one = next((r for r in records if r["kind"] == "cache" and "costs" in r), None)
    n_cached = sum(1 for r in records if r["kind"] == "cached" and "payload" in r)
    rows = {
        m: method_row(m, [r for r in records if r.get("method") == m], idle, stage_one, n_cached)
        for m in cfg.methods
    }
    loads = [r["load_before"] for r in records] + [r["load_after"] for r in records]
    return {
        "config": asdict(cfg),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available(),
            "idle_peak_rss_mb": [x / MB for x in idles],
            "load_average_1min_range": [min(loads), max(loads)] if loads else None,
            "others_cpu_s_total": sum(r.get("others_cpu_s", 0.0) for r in records),
        },
        "stage_one": stage_one,
        "n_cached_networks": n_cached,
        "table": list(rows.values()),
        "ratios": ratios(rows, stage_one),
        "runs": records,
    }


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return f"{x:,.{digits}f}"


def store_extras(cfg: dict[str, Any]) -> str:
    """The stores' layout where it is not stage one's default (older reports lack the keys)."""
    out = ""
    if cfg.get("positions", "all") != "all":
        out += f", positions {cfg['positions']}"
    if cfg.get("chunk_mb", 4.0) != 4.0:
        out += f", chunks of {_fmt(cfg['chunk_mb'])} MB"
    return out


def to_markdown(report: dict[str, Any]) -> str:
    cfg, env = report["config"], report["environment"]
    lines = [
        f"Backbone `{cfg['backbone']}`, data `{cfg['data']}` (train limit {cfg['limit']}, eval "
        f"`{cfg['eval_split']}` limit {cfg['eval_limit']}), {cfg['epochs']} epochs, batch "
        f"{cfg['batch_size']}, max length {cfg['max_length']}, store dtype {cfg['dtype']}"
        f"{store_extras(cfg)}, "
        f"seeds {cfg['seeds']}; cached runs: RAM budget {cfg['ram_budget_mb']} MB, pool "
        f"{cfg.get('pool_mb', 512)} MB{', --low-memory' if cfg.get('low_memory') else ''}"
        f"{', --micro-rows ' + str(cfg['micro_rows']) if cfg.get('micro_rows') else ''}"
        f"{', --threads ' + str(cfg['threads']) if cfg.get('threads') else ''}. "
        f"{env['cpus']} CPUs, CUDA {env['cuda']}, idle peak RSS "
        f"{_fmt(min(env['idle_peak_rss_mb'] or [0]))} MB, "
        f"1-min load {env['load_average_1min_range']}"
        f", other processes' CPU during the runs {_fmt(env['others_cpu_s_total'])} s.",
        "",
        "| method | runs | score best (mean ± std) | score final (mean ± std) | trainable params "
        "| peak MB above idle | wall s | CPU-s | others' CPU-s | GPU energy J | stage one wall / "
        "CPU-s (once) | per network + amortised stage one: wall / CPU-s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["table"]:
        score_b = f"{_fmt(r['score_best_mean'], 4)} ± {_fmt(r['score_best_std'], 4)}"
        score_f = f"{_fmt(r['score_final_mean'], 4)} ± {_fmt(r['score_final_std'], 4)}"
        s1 = (
            f"{_fmt(r['stage_one_wall_s'])} / {_fmt(r['stage_one_cpu_s'])}"
            if r["stage_one_wall_s"] is not None
            else "–"
        )
        am = (
            f"{_fmt(r['amortised_wall_s'])} / {_fmt(r['amortised_cpu_s'])}"
            if r["amortised_wall_s"] is not None
            else "–"
        )
        params = _fmt(r["trainable_params"], 0)
        failed = f" (+{r['failed']} failed)" if r["failed"] else ""
        lines.append(
            f"| {r['method']} | {r['runs']}{failed}"
            f" | {score_b} | {score_f} | {params} | {_fmt(r['peak_mb_above_idle'])} "
            f"| {_fmt(r['wall_s'])} | {_fmt(r['cpu_s'])} | {_fmt(r['others_cpu_s'])} "
            f"| {_fmt(r['gpu_energy_j'])} | {s1} | {am} |"
        )
    lines += ["", f"Amortised over {report['n_cached_networks']} cached side networks. Ratios:", ""]
    for key, value in report["ratios"].items():
        shown = (
            f"{value[0]:.4f} ± {value[1]:.4f}"
            if isinstance(value, tuple | list)
            else f"{value:.3f}"
        )
        lines.append(f"* `{key}`: {shown}")
    return "\n".join(lines) + "\n"

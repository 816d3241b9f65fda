"""The bench table: score and cost per method, stage one amortised, the headline ratios."""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import asdict
from typing import Any

import torch

from pipeline.bench.config import BenchConfig

MB = 1e6


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
    if cfg.get("positions", BenchConfig.positions) != BenchConfig.positions:
        out += f", positions {cfg['positions']}"
    if cfg.get("chunk_mb", BenchConfig.chunk_mb) != BenchConfig.chunk_mb:
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
        f"{cfg.get('pool_mb', BenchConfig.pool_mb)} MB"
        f"{', --low-memory' if cfg.get('low_memory') else ''}"
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

"""The bench table: score and cost per method, stage one amortised, the headline ratios, and
the learning rate chosen per family of methods (:mod:`pipeline.bench.select`)."""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import asdict
from typing import Any

import torch

from pipeline.bench.config import BenchConfig
from pipeline.bench.select import choose, dev_best_on_eval, mean_std, valid_scores

MB = 1e6


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
    valid = [v["score"] for v in (valid_scores(r) for r in ok) if v is not None]
    papers = [s["score"] for s in (dev_best_on_eval(r) for r in ok) if s is not None]
    gpu = bool(ok) and ok[0]["costs"]["gpu_peak_bytes"] is not None
    energy = [r["costs"]["gpu_energy_j"] for r in ok if r["costs"]["gpu_energy_j"] is not None]
    row: dict[str, Any] = {
        "method": method,
        "runs": len(ok),
        "failed": len(runs) - len(ok),
        "chosen_on": "valid" if ok and len(valid) == len(ok) else "eval",
        "score_best_mean": mean_std(best)[0],
        "score_best_std": mean_std(best)[1],
        "score_final_mean": mean_std(final)[0],
        "score_final_std": mean_std(final)[1],
        "valid_best_mean": mean_std(valid)[0],
        "valid_best_std": mean_std(valid)[1],
        "score_best_on_eval_mean": mean_std(papers)[0],
        "score_best_on_eval_std": mean_std(papers)[1],
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
        "chosen": choose(list(cfg.methods), records),
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


def _pm(mean: Any, std: Any, digits: int = 4) -> str:
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def settings_line(cfg: dict[str, Any], env: dict[str, Any]) -> str:
    held = cfg.get("valid_fraction") or 0.0
    return (
        f"Backbone `{cfg['backbone']}`, data `{cfg['data']}` (train limit {cfg['limit']}"
        f"{f', {held:g} of it held out for validation' if held else ''}, eval "
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
        f", other processes' CPU during the runs {_fmt(env['others_cpu_s_total'])} s."
    )


def method_lines(table: list[dict[str, Any]], held: bool) -> list[str]:
    """The per-method table; with held-out validation, dev is at the epoch chosen on it, and
    two more columns: the validation score there, and dev at the epoch dev itself picks."""
    best = "dev score, epoch chosen on validation" if held else "score best"
    extra = " | validation score | dev score, epoch chosen on dev" if held else ""
    lines = [
        f"| method | runs | {best} (mean ± std) | score final (mean ± std){extra} | trainable "
        "params | peak MB above idle | wall s | CPU-s | others' CPU-s | GPU energy J | stage one "
        "wall / CPU-s (once) | per network + amortised stage one: wall / CPU-s |",
        "|---|---|---|---|" + ("---|---|" if held else "") + "---|---|---|---|---|---|---|---|",
    ]
    for r in table:
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
        failed = f" (+{r['failed']} failed)" if r["failed"] else ""
        cols = (
            f" | {_pm(r.get('valid_best_mean'), r.get('valid_best_std'))} | "
            f"{_pm(r.get('score_best_on_eval_mean'), r.get('score_best_on_eval_std'))}"
            if held
            else ""
        )
        lines.append(
            f"| {r['method']} | {r['runs']}{failed}"
            f" | {_pm(r['score_best_mean'], r['score_best_std'])} "
            f"| {_pm(r['score_final_mean'], r['score_final_std'])}{cols} "
            f"| {_fmt(r['trainable_params'], 0)} | {_fmt(r['peak_mb_above_idle'])} "
            f"| {_fmt(r['wall_s'])} | {_fmt(r['cpu_s'])} | {_fmt(r['others_cpu_s'])} "
            f"| {_fmt(r['gpu_energy_j'])} | {s1} | {am} |"
        )
    return lines


def _metrics(scores: dict[str, Any] | None) -> str:
    """``accuracy 0.8000 ± 0.0100, f1 ...``: every metric but ``score``."""
    if not scores:
        return "–"
    return ", ".join(f"{k} {_pm(v['mean'], v['std'])}" for k, v in scores.items() if k != "score")


def _score(scores: dict[str, Any] | None) -> str:
    s = (scores or {}).get("score")
    return _pm(s["mean"], s["std"]) if s else "–"


def chosen_lines(chosen: list[dict[str, Any]]) -> list[str]:
    """The learning rate chosen per family of methods, and dev there."""
    if not chosen:
        return []
    lines = [
        "",
        "Learning rate chosen per family (methods that differ only in `lr=`): the highest mean "
        "over seeds of the validation score (samples held out of training; ties: the first "
        "listed), each run's epoch chosen on them too; dev at that choice, mean ± sample std over "
        "seeds. Chosen on dev (no held-out samples) marks an optimistic figure: lr and epoch "
        "picked on the split reported.",
        "",
        "| family | chosen on | chosen lr | lrs tried (mean validation score, else dev) | runs "
        "| validation score | dev score | dev metrics | dev score, epoch chosen on dev "
        "| trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in chosen:
        on = "validation" if c["chosen_on"] == "valid" else "dev (optimistic)"
        key = "valid_score_mean" if c["chosen_on"] == "valid" else "dev_score_mean"
        tried = ", ".join(f"{x['lr']}: {_fmt(x[key], 4)}" for x in c["candidates"]) or "–"
        if c["method"] is None:
            lines.append(f"| {c['family']} | {on} | – | {tried} | 0 | – | – | – | – | – |")
            continue
        lr = c["lr"] if c["lr_value"] is None else f"{c['lr']} ({c['lr_value']:g})"
        lines.append(
            f"| {c['family']} | {on} | {lr} | {tried} | {c['runs']} | {_score(c['valid'])} "
            f"| {_score(c['dev'])} | {_metrics(c['dev'])} | {_score(c['dev_best_on_eval'])} "
            f"| {_fmt(c['trainable_params'], 0)} |"
        )
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    cfg, env = report["config"], report["environment"]
    held = any(r.get("chosen_on") == "valid" for r in report["table"])
    lines = [settings_line(cfg, env), "", *method_lines(report["table"], held)]
    lines += chosen_lines(report.get("chosen", []))
    lines += ["", f"Amortised over {report['n_cached_networks']} cached side networks. Ratios:", ""]
    for key, value in report["ratios"].items():
        shown = _pm(value[0], value[1]) if isinstance(value, tuple | list) else f"{value:.3f}"
        lines.append(f"* `{key}`: {shown}")
    return "\n".join(lines) + "\n"

"""The GPU targets of the performance work, read off a ``benchmarks.gpu_check`` report.

    python -m benchmarks.gpu_targets benchmarks/results/gpu_check-2026-12-04.json \
        [--out benchmarks/results/gpu-h200.json]

Prints (and writes) each target's figure, its bound and whether it is met; a figure the report
does not hold is ``null`` with the reason. Nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# key: (bound, "<=" or ">=", what it is)
TARGETS = {
    "stage_one.minilm.roofline_ratio": (1.25, "<=", "stage-one wall / max(forward, disk write)"),
    "stage_one.bert-base.roofline_ratio": (1.25, "<=", "the same, BERT-base-shaped"),
    "stage_two.resident_speedup": (5.0, ">=", "READ epoch host-streamed wall / GPU-resident"),
    "stage_two.streamed_over_resident": (0.8, ">=", "streamed epoch speed / resident speed"),
    "stage_two.k8_over_k1": (2.5, "<=", "8 side networks in one pass / 1 READ, wall"),
    "stage_two.cache_plus_10ep_over_online": (0.2, "<=", "stage one + 10 cached epochs / online"),
}


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """The target keys (and the reported ones beside them) from one gpu_check report."""
    one, two = report.get("stage_one", {}), report.get("stage_two", {})
    out: dict[str, Any] = {"device": report.get("environment", {}).get("cuda", {}).get("name")}
    for name, key in (("minilm", "minilm"), ("bert", "bert-base")):
        model = one.get(name, {})
        out[f"stage_one.{key}.roofline_ratio"] = model.get("roofline_ratio")
        out[f"stage_one.{key}.tokens_per_s"] = {
            arm: model[arm]["tokens_per_s"]
            for arm in ("forward", "extract", "stage")
            if arm in model
        }
        out[f"stage_one.{key}.cores_used"] = model.get("stage", {}).get("cores_used")
        out[f"stage_one.{key}.gpu_util_pct"] = model.get("stage", {}).get("gpu_util_pct")
    streamed = two.get("stream_over_resident_k1")
    out["stage_two.resident_speedup"] = streamed
    out["stage_two.streamed_over_resident"] = None if not streamed else 1 / streamed
    out["stage_two.k8_over_k1"] = two.get("k8_over_k1")
    out["stage_two.ms_per_step"] = {"k1": two.get("ms_per_step"), "k8": two.get("ms_per_step_k8")}
    out["stage_two.peak_gpu_mb"] = two.get("peak_gpu_mb")
    out.update(online_figures(report))
    return out


def online_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The online phase's figures (BERT-base-shaped, 10 epochs of READ): the target ratio, wall
    and peak GPU memory per arm, the dev accuracies; ``null`` with the reason where the report
    has no such figures (reports from before the phase existed, or the phase failed)."""
    on = report.get("online", {})
    ratio = on.get("cache_plus_10ep_over_online")
    out: dict[str, Any] = {
        "stage_two.cache_plus_10ep_over_online": ratio,
        "stage_two.online.wall_s": on.get("wall_s"),
        "stage_two.online.dev_accuracy": on.get("dev_accuracy"),
        "stage_two.online.peak_gpu_mb": on.get("peak_gpu_mb"),
        "stage_two.online.samples": on.get("limit"),
    }
    if ratio is None:
        phase = report.get("phases", {}).get("online")
        out["stage_two.online.missing"] = (
            "the report has no online phase (gpu_check --phases ...,online)"
            if phase is None
            else f"online phase {phase.get('status')}: {phase.get('error') or 'no ratio'}"
        )
    return out


def verdicts(found: dict[str, Any]) -> dict[str, Any]:
    rows = {}
    for key, (bound, op, what) in TARGETS.items():
        value = found.get(key)
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        rows[key] = {"value": value, "target": f"{op} {bound}", "met": met, "what": what}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", help="gpu_check.json")
    p.add_argument("--out", help="write the figures and verdicts here as JSON")
    args = p.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    found = figures(report)
    result = {"source": args.report, "started_utc": report.get("started_utc"),
              "figures": found, "targets": verdicts(found)}  # fmt: skip
    for key, row in result["targets"].items():
        value = "n/a" if row["value"] is None else f"{row['value']:.3f}"
        print(f"{key:42} {value:>8}  target {row['target']:>7}  met: {row['met']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

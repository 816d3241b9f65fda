"""Combine several ``sidecache bench`` folders into one table (runs measured side by side).

On a loaded machine it can pay to run each method as its own ``sidecache bench`` process at the
same time (every method then sees the same contention) instead of one after the other; this
script joins their runs: the idle baseline is the smallest idle peak of all folders, the stage
one is the first folder's that has one (amortised over the cached networks of the folders given).
A folder whose bench is still running contributes the runs that have finished.

    .venv/bin/python -m benchmarks.methods OUT.md DIR [DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.bench import BenchConfig, summarise, to_markdown


def load_runs(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    report = folder / "bench.json"
    if report.is_file():
        data = json.loads(report.read_text())
        return data["config"], data["runs"]
    runs, config = [], None
    for job_file in sorted((folder / "jobs").glob("*.json")):
        if job_file.name.endswith(".out.json"):
            continue
        job = json.loads(job_file.read_text())
        config = job["config"]
        out = job_file.with_name(job_file.name[: -len(".json")] + ".out.json")
        if out.is_file():
            record = {k: job.get(k) for k in ("kind", "name", "method", "spec", "seed")}
            record.update(json.loads(out.read_text()), others_cpu_s=float("nan"),
                          load_before=float("nan"), load_after=float("nan"))  # fmt: skip
            runs.append(record)
    if config is None:
        raise SystemExit(f"{folder}: no bench jobs found")
    return config, runs


def main(argv: list[str]) -> int:
    out, folders = Path(argv[0]), [Path(a) for a in argv[1:]]
    configs, records, have_stage_one = [], [], False
    for folder in folders:
        config, runs = load_runs(folder)
        configs.append(config)
        for r in runs:
            if r["kind"] == "cache" and "costs" in r:
                if have_stage_one:
                    continue
                have_stage_one = True
            records.append(r)
    methods = list(dict.fromkeys(m for c in configs for m in c["methods"]))
    seeds = sorted({s for c in configs for s in c["seeds"]})
    first = dict(configs[0], methods=methods, seeds=seeds, out=str(out.parent))
    report = summarise(BenchConfig(**first), records)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    out.write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``sidecache inspect``: what a store holds and how well it compressed."""

from __future__ import annotations

import argparse
import json
from typing import Any

from storage import open_store


def format_summary(s: dict[str, Any]) -> str:
    def mb(x: int | None) -> str:
        return "unknown" if x is None else f"{x / 1e6:,.1f} MB"

    ratio = s["compression_ratio"]
    lines = [
        f"store        {s['path']}  ({'complete' if s['complete'] else 'INCOMPLETE'})",
        f"backbone     {s['backbone']}",
        f"data         {s['dataset']}  split {s['split']}  task {s['task'].get('name')} "
        f"({s['task'].get('type')}, {s['task'].get('num_labels')} labels)",
        f"samples      {s['samples']:,}    tokens {s['tokens']:,}    rows {s['rows']:,}",
        f"layers       {s['layers']}  hidden size {s['hidden_size']}  positions {s['positions']}",
        f"stored dtype {s['dtype']}  codec {s['codec']['name']}:{s['codec']['level']}  "
        f"shards {s['shards']}",
        f"raw bytes    {mb(s['raw_bytes'])}    on disk {mb(s['bytes_on_disk'])}    "
        f"ratio {'unknown' if ratio is None else f'{ratio:.2f}x'}",
    ]
    if s["bytes_per_token"]:
        lines.append(f"bytes/token  {s['bytes_per_token']:,.0f} on disk")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sidecache inspect", description="Describe a store.")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    reader = open_store(args.store, allow_incomplete=True)
    summary = reader.summary()
    if args.json:
        summary["identity"] = reader.identity
        summary["stats"] = reader.meta.get("stats")
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0 if reader.complete else 1

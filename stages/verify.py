"""``sidecache verify``: recompute random samples with the recorded backbone and compare."""

from __future__ import annotations

import argparse
import json

from pipeline.verify import run_verify


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sidecache verify", description="Check a store against its backbone."
    )
    p.add_argument("store")
    p.add_argument(
        "--samples", type=int, default=8, help="random samples to recompute (0: checksums only)"
    )
    p.add_argument(
        "--no-checksums", action="store_true", help="skip reading every chunk's checksum"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--backbone", default=None, help="load the backbone from here instead")
    args = p.parse_args(argv)
    report = run_verify(
        args.store, args.samples, args.device, args.seed, args.backbone,
        checksums=not args.no_checksums,
    )  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0

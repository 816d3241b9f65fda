"""Benchmarks for sidecache (run as modules, e.g. ``python -m benchmarks.stage_one``)."""

"""Benchmarks for sidecache (run as modules, e.g. ``python -m benchmarks.stage_one``)."""

import pipeline  # noqa: F401  (first: it sets MKL_CBWR before torch runs anything)

"""Thin entry points, one per stage: ``main(argv) -> int`` parses flags, calls the library."""

import pipeline  # noqa: F401  (first: it sets MKL_CBWR before torch runs anything)

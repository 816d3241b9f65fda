"""sidecache's tests."""

import pipeline  # noqa: F401  (first: it sets MKL_CBWR before torch runs anything)

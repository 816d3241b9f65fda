"""``--valid-fraction``: which training samples are held out to choose epochs and settings on.

Stage two (:mod:`pipeline.train`, by sample id in the train store) and the online baselines
(:mod:`pipeline.online.train`, by position in the training split) hold out the same samples, as a
store keeps its split's samples in source order.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import DataSpecError

# the draw does not follow a run's seed: every run, seed and method (cached or online) of a
# training split holds out the same samples, so their validation scores compare
HOLDOUT_SEED = 7919


def holdout_samples(n: int, fraction: float) -> np.ndarray:
    """The sample ids (sorted) that a training split of ``n`` samples holds out for validation
    at ``fraction`` (``--valid-fraction``): a seeded draw of ``round(fraction * n)`` samples, at
    least one, the same for every run. Empty when ``fraction`` is 0."""
    if not 0.0 <= fraction < 1.0:
        raise DataSpecError(
            f"--valid-fraction must be at least 0 and below 1 (a share of the training samples); "
            f"found {fraction}"
        )
    if fraction == 0.0:
        return np.empty(0, dtype=np.int64)
    k = max(1, round(fraction * n))
    if k >= n:
        raise DataSpecError(
            f"--valid-fraction {fraction} holds out {k} of {n} training samples and leaves none "
            "to train on; lower it or use more data"
        )
    return np.sort(np.random.default_rng(HOLDOUT_SEED).permutation(n)[:k]).astype(np.int64)
